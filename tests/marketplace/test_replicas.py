"""Two matcher replicas sharing one PostgreSQL database race on the same job id and the
same escrow's voucher: the database decides, exactly one wins, nothing in-process."""

from __future__ import annotations

import asyncio
import base64

import pytest

from protocol import envelope
from protocol.api import RelayRequest
from protocol.signed import Receipt
from tests.marketplace.conftest import admit
from tests.marketplace.fakes import ESCROW, MODEL, FakeClient

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_replicas_share_postgres(session, start_matcher, start_node, database_url, tmp_path):
    a = await start_matcher(database_url=database_url, instance="replica-a")
    b = await start_matcher(
        database_url=database_url, instance="replica-b", state_dir=tmp_path / "b"
    )
    node = await start_node()
    for matcher in (a, b):
        assert await admit(session, matcher.url, node) == 200
    client_a, client_b = FakeClient(session, a.url), FakeClient(session, b.url)

    # The same job id through both replicas at once: one relays, the other refuses.
    served = []
    for _ in range(3):
        job_id = envelope.new_job_id()
        results = await asyncio.gather(
            client_a.relay([node], job_id=job_id), client_b.relay([node], job_id=job_id)
        )
        assert sorted(r.status for r in results) == [200, 409]
        assert node.jobs_seen.count(job_id.hex()) == 1
        served += [r for r in results if r.status == 200]

    # One escrow, one spend key, the same cumulative through both: one is stored.
    client_b.spend_key = client_a.spend_key
    cumulative = 0
    for result in served:
        amount = Receipt.from_boc(base64.b64decode(result.end.receipt)).amount
        cumulative += amount
        responses = await asyncio.gather(
            client_a.post_voucher(amount, [result.job_id], cumulative=cumulative),
            client_b.post_voucher(amount, [result.job_id], cumulative=cumulative),
        )
        assert sorted(r.status for r in responses) == [200, 409]

    # A restart of one replica fails only its own jobs in flight.
    hang = await start_node(mode="hang")
    for matcher in (a, b):
        assert await admit(session, matcher.url, hang) == 200
    job_id = envelope.new_job_id()
    _, sealed = client_b.seal([hang], "wait", job_id)
    body = RelayRequest(job_id=job_id.hex(), model=MODEL, escrow=ESCROW.to_str(), sealed=sealed)
    pending = asyncio.create_task(session.post(f"{b.url}/v1/relay", data=body.model_dump_json()))
    for _ in range(300):
        if hang.jobs_seen:
            break
        await asyncio.sleep(0.02)
    # Replica A restarting runs its recovery: B's job must stay in flight.
    c = await start_matcher(
        database_url=database_url, instance="replica-a", state_dir=tmp_path / "c"
    )
    status = await c.ledger.call(
        lambda conn: conn.exec_driver_sql(
            f"SELECT status FROM jobs WHERE job_id = '{job_id.hex()}'"
        ).scalar()
    )
    assert status == "in_flight"
    hang.released.set()
    resp = await pending
    await resp.read()
    assert resp.status == 200
