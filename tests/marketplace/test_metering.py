"""Relay and metering against fake nodes, on SQLite and (marked ``postgres``) PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select

from marketplace.db import JobRecord, SpendVoucherRecord
from marketplace.escrows import EscrowUnfunded
from protocol import envelope
from protocol.api import RelayRequest
from protocol.envelope import FrameDecoder, FrameType
from protocol.signed import Receipt, SpendVoucher
from protocol.tickets import ticket_message
from tests.marketplace.conftest import admit
from tests.marketplace.fakes import ESCROW, MARKER, MODEL

JOBS = JobRecord.__table__
VOUCHERS = SpendVoucherRecord.__table__


async def jobs(matcher) -> dict[str, dict]:
    rows = await matcher.ledger.call(lambda c: c.execute(select(JOBS)).mappings().all())
    return {row["job_id"]: dict(row) for row in rows}


async def setup(start_matcher, start_node, session, database_url, *modes, price=100, **config):
    matcher = await start_matcher(database_url=database_url, **config)
    nodes = []
    for i, mode in enumerate(modes):
        # Ascending prices: the matcher prefers the nodes in the order given.
        node = await start_node(mode=mode, models={MODEL: (price + i, 2 * price + i)})
        assert await admit(session, matcher.url, node) == 200
        nodes.append(node)
    return matcher, nodes


async def test_relay_passes_frames_byte_for_byte_and_meters(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "ok")
    client = client_for(matcher)
    result = await client.relay([node])
    assert result.status == 200
    assert result.raw == bytes(node.sent[result.job_id])  # verbatim, END included
    assert [t for t, _ in result.frames] == [FrameType.DATA] * 3 + [FrameType.END]
    assert all(MARKER in text for text in result.texts)  # the client can open it all
    receipt = Receipt.from_boc(base64.b64decode(result.end.receipt))
    job = (await jobs(matcher))[result.job_id]
    assert job["status"] == "completed"
    assert job["node_id"] == node.node_id and job["escrow"] == ESCROW.to_str(False)
    assert job["model"] == MODEL
    assert (job["prompt_tokens"], job["completion_tokens"]) == (
        receipt.prompt_tokens,
        receipt.completion_tokens,
    )
    assert job["amount"] == receipt.amount > 0
    assert job["receipt_boc"] == result.end.receipt
    assert job["response_bytes"] == len(result.raw) and job["request_bytes"] > 0
    assert job["ttft_ms"] > 0 and job["duration_ms"] >= job["ttft_ms"]
    assert matcher.ledger.counts["completed"] == 1 and matcher.ledger.counts["in_flight"] == 0


@pytest.mark.parametrize("failure", ["error500", "busy", "die", "slow"])
async def test_failover_before_first_byte(
    session, start_matcher, start_node, client_for, database_url, failure
):
    matcher, (bad, good) = await setup(
        start_matcher, start_node, session, database_url, failure, "ok", first_byte_timeout_s=1.0
    )
    result = await client_for(matcher).relay([bad, good])
    assert result.status == 200 and result.relay_error is None
    assert result.raw == bytes(good.sent[result.job_id])
    assert bad.jobs_seen == [result.job_id]
    job = (await jobs(matcher))[result.job_id]
    assert job["status"] == "completed"
    assert job["node_id"] == good.node_id  # the failed node is charged nothing
    assert job["failed_nodes"] == bad.node_id
    receipt = Receipt.from_boc(base64.b64decode(result.end.receipt))
    assert job["amount"] == receipt.amount and receipt.price_prompt == 101


async def test_every_node_fails_before_first_byte(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, nodes = await setup(
        start_matcher, start_node, session, database_url, "error500", "die"
    )
    result = await client_for(matcher).relay(nodes)
    assert result.status == 200
    assert [t for t, _ in result.frames] == [FrameType.RELAY_ERROR]
    assert result.relay_error["code"] == "no_node_available"
    job = (await jobs(matcher))[result.job_id]
    assert job["status"] == "failed_before_first_byte" and job["amount"] == 0
    assert job["node_id"] is None


async def test_every_node_at_capacity_is_a_429_the_caller_may_retry(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, nodes = await setup(start_matcher, start_node, session, database_url, "busy", "busy")
    result = await client_for(matcher).relay(nodes)
    assert [t for t, _ in result.frames] == [FrameType.RELAY_ERROR]
    assert result.relay_error["status"] == 429
    assert (result.relay_error["code"], result.relay_error["type"]) == (
        "nodes_busy",
        "rate_limit_error",
    )
    job = (await jobs(matcher))[result.job_id]
    assert job["status"] == "failed_before_first_byte" and job["amount"] == 0
    for node in nodes:  # being busy is not held against a node
        assert matcher.registry.nodes[node.node_id].stats.success == 1.0


async def test_an_accepted_job_may_take_longer_than_the_first_byte_timeout(
    session, start_matcher, start_node, client_for, database_url
):
    """The timeout bounds acceptance (the node's headers), not generation: a whole
    non-streaming answer comes as one first frame."""
    matcher, (node,) = await setup(
        start_matcher, start_node, session, database_url, "slow_after_headers",
        first_byte_timeout_s=0.5,
    )  # fmt: skip
    result = await client_for(matcher).relay([node])
    assert result.status == 200 and result.relay_error is None
    assert (await jobs(matcher))[result.job_id]["status"] == "completed"


async def test_midstream_failure_appends_relay_error(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "midstream")
    client = client_for(matcher)
    result = await client.relay([node])
    types = [t for t, _ in result.frames]
    assert types == [FrameType.DATA, FrameType.RELAY_ERROR]
    assert result.raw.startswith(bytes(node.sent[result.job_id]))
    assert result.relay_error["status"] == 502
    assert result.relay_error["code"] == "node_failed_midstream"
    job = (await jobs(matcher))[result.job_id]
    assert job["status"] == "failed_midstream" and job["node_id"] == node.node_id
    # The client pays for what it received; the matcher learns the amount from the voucher.
    resp = await client.post_voucher(7, [result.job_id])
    assert resp.status == 200
    job = (await jobs(matcher))[result.job_id]
    assert job["amount"] == 7 and job["voucher_cumulative"] == 7


async def test_forged_receipt_marks_job_errored(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (forger, liar, foreign) = await setup(
        start_matcher, start_node, session, database_url, "forge", "bad_hash", "wrong_network"
    )
    client = client_for(matcher)
    for node in (forger, liar, foreign):
        result = await client.relay([node])
        types = [t for t, _ in result.frames]
        assert types == [FrameType.DATA] * 3 + [FrameType.RELAY_ERROR]
        assert result.end is None and result.relay_error["code"] == "invalid_receipt"
        job = (await jobs(matcher))[result.job_id]
        assert job["status"] == "errored" and job["receipt_boc"] is None
        assert "receipt does not verify" in job["error"]


async def test_duplicate_job_id_refused(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "ok")
    client = client_for(matcher)
    job_id = envelope.new_job_id()
    first = await client.relay([node], job_id=job_id)
    assert first.status == 200
    again = await client.relay([node], job_id=job_id)
    assert again.status == 409
    assert json.loads(again.raw)["error"]["code"] == "duplicate_job"
    assert node.jobs_seen == [job_id.hex()]  # the node never saw the replay
    # Concurrent duplicates: exactly one wins.
    job_id = envelope.new_job_id()
    results = await asyncio.gather(*(client.relay([node], job_id=job_id) for _ in range(4)))
    assert sorted(r.status for r in results) == [200, 409, 409, 409]


async def test_a_voucher_encoded_unlike_what_was_signed_is_refused(
    session, start_matcher, start_node, client_for, database_url
):
    """The Escrow checks the signature over the hash of the cell it receives. The same
    fields with a non-minimal Coins length are another cell: the matcher must not store
    such a voucher as good, since on-chain it would fail."""
    from pytoniq_core import begin_cell

    from protocol.signed import TAG_SPEND

    matcher, (node,) = await setup(
        start_matcher, start_node, session, database_url, "ok", price=10**6
    )
    client = client_for(matcher)
    a = await client.relay([node])
    amount = Receipt.from_boc(base64.b64decode(a.end.receipt)).amount
    voucher, _, _ = client.voucher(amount)
    padded = (
        begin_cell()
        .store_uint(TAG_SPEND, 32)
        .store_int(voucher.global_id, 32)
        .store_address(voucher.escrow)
        .store_address(voucher.vault)
        .store_uint(15, 4)  # 15 bytes for a value that needs fewer
        .store_uint(voucher.cumulative, 120)
        .end_cell()
    )
    assert SpendVoucher.from_cell(padded) == voucher and padded.hash != voucher.hash
    resp = await client.post_voucher(amount, [a.job_id], boc=padded.to_boc())
    assert resp.status == 403
    assert (await client.post_voucher(amount, [a.job_id])).status == 200


async def test_vouchers(session, start_matcher, start_node, client_for, database_url):
    matcher, (node,) = await setup(
        start_matcher, start_node, session, database_url, "ok", price=10**6
    )
    client = client_for(matcher)
    a = await client.relay([node])
    b = await client.relay([node])
    amount_a = Receipt.from_boc(base64.b64decode(a.end.receipt)).amount
    amount_b = Receipt.from_boc(base64.b64decode(b.end.receipt)).amount
    assert (await client.post_voucher(amount_a, [a.job_id])).status == 200
    stored_before = client.cumulative
    # Replays and lower cumulatives are refused; so are bad signatures and other keys.
    assert (await client.post_voucher(0, [b.job_id])).status == 409
    assert (await client.post_voucher(0, [b.job_id], cumulative=stored_before - 1)).status == 409

    other = Ed25519PrivateKey.generate()
    resp = await client.post_voucher(amount_b, [b.job_id], key=other)
    assert resp.status == 403  # signed by a key that is not this escrow's spend key
    # A voucher that does not cover its receipts, one that adds more than its jobs, a job
    # stated at another amount than its receipt, an unknown job.
    assert (await client.post_voucher(amount_b - 1, [(b.job_id, amount_b)])).status == 402
    resp = await client.post_voucher(amount_b + 1, [(b.job_id, amount_b)])
    assert resp.status == 400 and "voucher_unexplained" in await resp.text()
    resp = await client.post_voucher(amount_b - 1, [(b.job_id, amount_b - 1)])
    assert resp.status == 400 and "amount_mismatch" in await resp.text()
    assert (await client.post_voucher(amount_b, ["00" * 32])).status == 404
    # A job listed again (a lost acknowledgement) stays with the voucher that covered it.
    resp = await client.post_voucher(amount_b, [(a.job_id, amount_a), (b.job_id, amount_b)])
    assert resp.status == 200
    rows = await matcher.ledger.call(lambda c: c.execute(select(VOUCHERS)).mappings().all())
    assert len(rows) == 1 and rows[0]["cumulative"] == amount_a + amount_b
    table = await jobs(matcher)
    assert table[a.job_id]["voucher_cumulative"] == amount_a
    assert table[b.job_id]["voucher_cumulative"] == amount_a + amount_b
    async with session.post(
        f"{matcher.url}/v1/vouchers",
        json={"voucher": "AAAA", "signature": "00", "spend_public": "11", "jobs": []},
    ) as resp:
        assert resp.status == 400 and "error" in await resp.json()


async def test_a_voucher_for_another_network_is_refused(
    session, start_matcher, start_node, client_for, database_url
):
    """Signed by the right key for the right escrow and vault, but for mainnet: a devnet
    matcher does not hold it (the Escrow would refuse it too)."""
    from protocol.signed import MAINNET_GLOBAL_ID

    matcher, (node,) = await setup(
        start_matcher, start_node, session, database_url, "ok", price=10**6
    )
    client = client_for(matcher)
    a = await client.relay([node])
    amount = Receipt.from_boc(base64.b64decode(a.end.receipt)).amount
    resp = await client.post_voucher(amount, [a.job_id], global_id=MAINNET_GLOBAL_ID)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "wrong_network"
    assert (await client.post_voucher(amount, [a.job_id])).status == 200


async def test_bad_voucher_signature_refused(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "ok")
    client = client_for(matcher)
    voucher, signature, _ = client.voucher(5)
    body = {
        "voucher": base64.b64encode(voucher.to_boc()).decode(),
        "signature": (bytes([signature[0] ^ 1]) + signature[1:]).hex(),
        "spend_public": client.spend_key.public_key().public_bytes_raw().hex(),
        "jobs": [],
    }
    async with session.post(f"{matcher.url}/v1/vouchers", json=body) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "bad_signature"


async def test_client_disconnect_cancels_node_request(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "hang")
    client = client_for(matcher)
    job_id = envelope.new_job_id()
    _, sealed = client.seal([node], "hello", job_id)
    body = RelayRequest(job_id=job_id.hex(), model=MODEL, escrow=ESCROW.to_str(), sealed=sealed)
    resp = await session.post(f"{matcher.url}/v1/relay", data=body.model_dump_json())
    frames = []
    decoder = FrameDecoder()
    while not frames:
        frames += list(decoder.feed(await resp.content.readany()))
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(node.cancelled.wait(), 15)
    for _ in range(200):
        job = (await jobs(matcher))[job_id.hex()]
        if job["status"] != "in_flight":
            break
        await asyncio.sleep(0.05)
    assert job["status"] == "failed_midstream" and "client disconnected" in job["error"]


async def test_node_refusal_is_relayed_as_an_error(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "refuse")
    result = await client_for(matcher).relay([node])
    assert result.relay_error["status"] == 409
    assert "already seen" in result.relay_error["message"]
    assert (await jobs(matcher))[result.job_id]["status"] == "errored"


async def test_relay_request_errors_record_nothing(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "ok")
    client = client_for(matcher)
    unknown = await client.relay([node], model="unknown-model")
    assert unknown.status == 404
    for bad in ("zz", "0x" + "11" * 31):
        body = {"job_id": bad, "model": MODEL, "escrow": "x", "sealed": {}}
        async with session.post(f"{matcher.url}/v1/relay", json=body) as resp:
            assert resp.status == 400
    job_id = envelope.new_job_id().hex()
    body = {"job_id": job_id, "model": MODEL, "escrow": "not-an-address", "sealed": {}}
    async with session.post(f"{matcher.url}/v1/relay", json=body) as resp:
        assert resp.status == 400
    body = {"job_id": job_id, "model": MODEL, "escrow": ESCROW.to_str(), "sealed": {}}
    async with session.post(f"{matcher.url}/v1/relay", json=body) as resp:
        assert resp.status == 503  # sealed for nobody the matcher admitted
    assert await jobs(matcher) == {}


async def test_privacy_no_plaintext_in_stream_or_database(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "ok")
    client = client_for(matcher)
    results = [await client.relay([node]) for _ in range(3)]
    marker = MARKER.encode()
    for result in results:
        assert any(MARKER in t for t in result.texts)  # the client sees it...
        assert marker not in result.raw  # ...the relayed bytes never carry it
        await client.post_voucher(
            Receipt.from_boc(base64.b64decode(result.end.receipt)).amount, [result.job_id]
        )
    await matcher.ledger.call(lambda c: None)  # everything queued is committed
    if database_url is None:
        db = matcher.config.state_dir / "matcher.db"
        blob = b"".join(p.read_bytes() for p in db.parent.glob("matcher.db*"))
        assert len(blob) > 0 and marker not in blob
    for table in (JOBS, VOUCHERS):
        rows = await matcher.ledger.call(lambda c, t=table: c.execute(select(t)).all())
        assert rows and MARKER not in repr(rows)


async def test_client_disconnect_before_first_byte(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(
        start_matcher, start_node, session, database_url, "slow", first_byte_timeout_s=30
    )
    client = client_for(matcher)
    job_id = envelope.new_job_id()
    _, sealed = client.seal([node], "hello", job_id)
    body = RelayRequest(job_id=job_id.hex(), model=MODEL, escrow=ESCROW.to_str(), sealed=sealed)
    task = asyncio.create_task(session.post(f"{matcher.url}/v1/relay", data=body.model_dump_json()))
    for _ in range(300):
        if node.jobs_seen:
            break
        await asyncio.sleep(0.02)
    task.cancel()  # the client goes away while the node is still silent
    for _ in range(300):
        job = (await jobs(matcher)).get(job_id.hex())
        if job and job["status"] != "in_flight":
            break
        await asyncio.sleep(0.05)
    assert job["status"] == "failed_before_first_byte"
    assert job["error"] == "client disconnected before the first byte"
    assert matcher.ledger.counts["in_flight"] == 0


async def test_sqlite_lock_held_elsewhere_never_blocks_the_loop(
    session, start_matcher, start_node, client_for
):
    """Another connection holds SQLite's write lock: relays wait for it on the writer
    thread while the event loop keeps answering."""
    import sqlite3
    import time

    matcher, (node,) = await setup(start_matcher, start_node, session, None, "ok")
    client = client_for(matcher)
    other = sqlite3.connect(matcher.config.state_dir / "matcher.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    relay = asyncio.create_task(client.relay([node]))
    await asyncio.sleep(0.1)
    started = time.perf_counter()
    async with session.get(f"{matcher.url}/health") as resp:
        assert resp.status == 200
    assert time.perf_counter() - started < 2.0  # the loop was free
    assert not relay.done()  # the in-flight row waits for the lock: nothing reached a node
    assert node.jobs_seen == []
    other.execute("COMMIT")
    other.close()
    result = await asyncio.wait_for(relay, 10)
    assert result.end is not None
    assert (await jobs(matcher))[result.job_id]["status"] == "completed"


async def test_in_flight_insert_cancelled_midway_is_failed_behind(start_matcher, database_url):
    """A client that leaves while its in-flight row commits leaves no job in flight."""
    matcher = await start_matcher(database_url=database_url)
    job_id = envelope.new_job_id().hex()
    row = {"job_id": job_id, "model": MODEL, "escrow": ESCROW.to_str(False), "request_bytes": 1}
    task = asyncio.create_task(matcher.ledger.open_job(row))
    await asyncio.sleep(0)  # queued, not yet committed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await matcher.ledger.call(lambda c: None)
    await matcher.ledger.call(lambda c: None)
    job = (await jobs(matcher))[job_id]
    assert job["status"] == "failed_before_first_byte"
    assert matcher.ledger.counts["in_flight"] == 0
    assert matcher.ledger.counts["failed_before_first_byte"] == 1


class FakeEscrowBook:
    """FAKE: stands in for the on-chain escrow book (tests/contracts checks the real one):
    every escrow's spend key is ``spend_public``."""

    def __init__(self, error: EscrowUnfunded | None, spend_public: Ed25519PublicKey) -> None:
        self.error = error
        self.spend_public = spend_public

    async def ensure_funded(self, escrow: str) -> None:
        if self.error is not None:
            raise self.error

    def signed_by_spend_key(self, escrow: str, signature: bytes, message: bytes) -> bool:
        try:
            self.spend_public.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@pytest.mark.parametrize("code", ["escrow_exhausted", "escrow_closed"])
async def test_a_job_the_escrow_cannot_pay_for_is_refused_before_any_node(
    session, start_matcher, start_node, client_for, database_url, code
):
    from marketplace.app import RELAY

    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "ok")
    client = client_for(matcher)
    spend_public = client.spend_key.public_key()
    refusal = EscrowUnfunded(code, "the escrow is spent")
    matcher.app[RELAY].escrows = FakeEscrowBook(refusal, spend_public)
    result = await client.relay([node])
    assert result.status == 402
    assert json.loads(result.raw)["error"]["code"] == code
    assert node.jobs_seen == [] and await jobs(matcher) == {}
    matcher.app[RELAY].escrows = FakeEscrowBook(None, spend_public)
    assert (await client.relay([node])).status == 200


@pytest.mark.parametrize("signer", ["unsigned", "another key"])
async def test_only_the_escrows_spend_key_may_relay_on_it(
    session, start_matcher, start_node, client_for, database_url, signer
):
    """Naming a funded escrow is not enough: whoever cannot spend from it is not served."""
    from marketplace.app import RELAY

    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "ok")
    client = client_for(matcher)
    matcher.app[RELAY].escrows = FakeEscrowBook(None, client.spend_key.public_key())
    result = await client.relay(
        [node], signer="unsigned" if signer == "unsigned" else Ed25519PrivateKey.generate()
    )
    assert result.status == 403
    assert json.loads(result.raw)["error"]["code"] == "relay_unauthorized"
    assert node.jobs_seen == [] and await jobs(matcher) == {}


async def test_each_attempt_carries_a_ticket_under_the_matchers_key(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (dead, node) = await setup(
        start_matcher, start_node, session, database_url, "error500", "ok"
    )
    async with session.get(f"{matcher.url}/v1/ticket-key") as resp:
        key = Ed25519PublicKey.from_public_bytes(
            bytes.fromhex((await resp.json())["ed25519_public"])
        )
    client = client_for(matcher)
    job_id = envelope.new_job_id()
    _, sealed = client.seal([dead, node], "hi", job_id)
    body = RelayRequest(job_id=job_id.hex(), model=MODEL, escrow=ESCROW.to_str(), sealed=sealed)
    async with session.post(f"{matcher.url}/v1/relay", data=body.model_dump_json()) as resp:
        assert resp.status == 200
        await resp.read()
    for attempt in (dead, node):  # each for its own node and the copy sealed for it
        ticket = bytes.fromhex(attempt.tickets[job_id.hex()])
        request_hash = envelope.request_hash(base64.b64decode(sealed[attempt.node_id]))
        key.verify(ticket, ticket_message(attempt.ed_public, job_id, request_hash))
    assert (await jobs(matcher))[job_id.hex()]["status"] == "completed"


async def test_a_job_id_outside_its_window_is_refused_before_anything(
    session, start_matcher, start_node, client_for, database_url
):
    matcher, (node,) = await setup(start_matcher, start_node, session, database_url, "ok")
    client = client_for(matcher)
    now = time.time()
    for created, code in (
        (now - envelope.JOB_ID_MAX_AGE_S - 5, "job_id_expired"),
        (now + envelope.JOB_ID_MAX_SKEW_S + 5, "job_id_from_future"),
    ):
        job_id = envelope.new_job_id(created)
        _, sealed = client.seal([node], "hi", job_id)
        body = RelayRequest(job_id=job_id.hex(), model=MODEL, escrow=ESCROW.to_str(), sealed=sealed)
        async with session.post(f"{matcher.url}/v1/relay", data=body.model_dump_json()) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["code"] == code and error["param"] == "job_id"
    assert await jobs(matcher) == {}
    assert not node.jobs_seen
