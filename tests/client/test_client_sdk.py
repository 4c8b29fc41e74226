"""ImagoClient against the fake matcher and nodes: receipt checks, attestation, failover,
route caching and the cumulative spend ledger."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import client.sdk.routing as sdk_routing
from client.keys import load_or_create_spend_key, load_spend_key
from client.sdk import (
    AttestationRejected,
    ImagoClient,
    LedgerError,
    MatcherError,
    PriceCaps,
    ReceiptRejected,
    RelayFailed,
    ResponseTampered,
    SpendLedger,
    UpstreamError,
)
from client.sdk.routing import Router
from contracts.chain import allowlists as allowlists_module
from contracts.chain.allowlists import Allowlists
from contracts.chain.toncenter import ToncenterClient
from protocol.api import AttestationDoc
from protocol.attestation import DEV_MEASUREMENT, AttestationPolicy, image_hash
from protocol.keystore import KeystoreError, WrongPassphrase
from protocol.signed import TESTNET_GLOBAL_ID, SpendVoucher, cost_nanoton
from tests.client.client_fakes import FakeMatcher
from tests.client.conftest import ESCROW, VAULT, make_client

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "What is 2 + 2 ?"}]}
FULL_COST = cost_nanoton(6, 7, 2_000_000, 6_000_000)
REGISTRY = "0:" + "44" * 32


@pytest.fixture
async def imago(fake_matcher: tuple[FakeMatcher, str], tmp_path: Path):
    _, url = fake_matcher
    async with make_client(url, tmp_path / "spend.json", Ed25519PrivateKey.generate()) as client:
        yield client


async def test_complete_returns_verified_receipt(imago: ImagoClient, fake_matcher) -> None:
    matcher, _ = fake_matcher
    completion = await imago.complete("chat/completions", CHAT)
    assert completion.response["choices"][0]["message"]["content"].startswith("Paris")
    assert completion.cost_nanoton == FULL_COST
    assert completion.receipt.node_id == matcher.nodes[0].node_id
    assert completion.response["usage"]["cost_nanoton"] == FULL_COST
    # the node saw the client's escrow and caps inside the sealed request, nothing in clear
    sealed = matcher.nodes[0].plaintexts[-1]
    assert sealed.escrow == ESCROW and sealed.max_price_completion == 10_000_000
    await imago.flush_vouchers()
    assert matcher.latest[ESCROW] == FULL_COST
    assert [(j.job_id, j.amount) for j in matcher.vouchers[-1].jobs] == [
        (completion.job_id, FULL_COST)
    ]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("forge_signature", "signature is not by the attested key"),
        ("unattested_key", "signature is not by the attested key"),
        ("wrong_job_id", "job id"),
        ("wrong_amount", "amount"),
        ("wrong_network", "signed for network"),
        ("wrong_request_hash", "request_hash"),
        ("wrong_response_hash", "response_hash"),
        ("truncate", "response_hash"),
        ("price_above_offer", "prices differ from the node's offer"),
        ("garbage_receipt", "malformed receipt"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_bad_receipts_are_rejected_and_unpaid(
    imago: ImagoClient, fake_matcher, fault: str, reason: str, streaming: bool
) -> None:
    matcher, _ = fake_matcher
    for node in matcher.nodes:
        node.fault = fault
    with pytest.raises(ReceiptRejected) as info:
        if streaming:
            async with imago.stream("chat/completions", {**CHAT, "stream": True}) as stream:
                async for _ in stream:
                    pass
        else:
            await imago.complete("chat/completions", CHAT)
    assert reason in info.value.message
    assert info.value.status == 502 and info.value.body["error"]["code"] == "receipt_rejected"
    assert imago.cumulative_spend == 0
    await imago.flush_vouchers()
    assert matcher.vouchers == []


async def test_replayed_receipt_is_rejected(imago: ImagoClient, fake_matcher) -> None:
    matcher, _ = fake_matcher
    await imago.complete("chat/completions", CHAT)
    paid = imago.cumulative_spend
    matcher.replay_receipts = True  # the previous job's valid, node-signed receipt again
    with pytest.raises(ReceiptRejected) as info:
        await imago.complete("chat/completions", CHAT)
    assert "job id is not this job's" in info.value.message
    assert imago.cumulative_spend == paid


async def test_receipt_above_cap_is_rejected(fake_matcher, tmp_path: Path) -> None:
    matcher, url = fake_matcher
    for node in matcher.nodes:
        node.fault = "price_above_offer"  # the receipt prices prompts at 10x the offer
    async with make_client(url, tmp_path / "s.json", Ed25519PrivateKey.generate()) as client:
        with pytest.raises(ReceiptRejected) as info:
            await client.complete("chat/completions", CHAT)
    assert "exceed the client's caps" in info.value.message
    assert client.cumulative_spend == 0


async def test_lying_matcher_offer_above_cap_is_refused(imago: ImagoClient, fake_matcher) -> None:
    matcher, _ = fake_matcher
    caps = PriceCaps(prompt=1, completion=1)

    async def route_anyway(self, session, model, caps):  # a matcher that ignores the cap
        return await original(self, session, model, PriceCaps(10**9, 10**9))

    original = Router.route
    Router.route = route_anyway  # type: ignore[method-assign]
    try:
        with pytest.raises(MatcherError) as info:
            await imago.complete("chat/completions", CHAT, caps)
    finally:
        Router.route = original  # type: ignore[method-assign]
    assert info.value.status == 402
    assert matcher.relay_calls == 0


async def test_unattested_candidate_is_skipped(imago: ImagoClient, fake_matcher) -> None:
    matcher, _ = fake_matcher
    cheap = matcher.nodes[0]
    # a node advertising an X25519 key its attestation does not bind
    cheap.attestation = AttestationDoc(
        **{**cheap.attestation.model_dump(), "x25519_public": "ab" * 32}
    )
    completion = await imago.complete("chat/completions", CHAT)
    assert completion.receipt.node_id == matcher.nodes[1].node_id
    matcher.nodes[1].attestation = cheap.attestation.model_copy(
        update={"ed25519_public": matcher.nodes[1].node_id}
    )
    imago._router.routes.clear()
    with pytest.raises(AttestationRejected) as info:
        await imago.complete("chat/completions", CHAT)
    assert "report_data" in info.value.message or "signature" in info.value.message


async def test_dev_attestation_refused_outside_devnet(fake_matcher, tmp_path: Path) -> None:
    _, url = fake_matcher
    with pytest.raises(ValueError, match="devnet"):
        make_client(url, tmp_path / "s.json", Ed25519PrivateKey.generate(), devnet=False)
    policy = AttestationPolicy(allow_dev=False)
    # off the devnet, the network is no default either: vouchers name it
    with pytest.raises(ValueError, match="global id"):
        make_client(
            url, tmp_path / "s.json", Ed25519PrivateKey.generate(), policy=policy, devnet=False
        )
    client = make_client(
        url,
        tmp_path / "s.json",
        Ed25519PrivateKey.generate(),
        policy=policy,
        devnet=False,
        global_id=TESTNET_GLOBAL_ID,
    )
    async with client:
        with pytest.raises(AttestationRejected, match="devnet"):
            await client.complete("chat/completions", CHAT)


async def test_a_registry_decides_which_images_the_client_accepts(
    fake_matcher, tmp_path: Path, monkeypatch
) -> None:
    _, url = fake_matcher
    allowed: set[int] = set()

    async def scripted_is_image_allowed(chain, registry, image: int) -> bool:  # FAKE getter
        return image in allowed

    monkeypatch.setattr(allowlists_module, "is_image_allowed", scripted_is_image_allowed)
    clock = [0.0]
    registry = Allowlists(
        ToncenterClient("http://127.0.0.1:9"), REGISTRY, ttl_s=30, clock=lambda: clock[0]
    )
    no_list = AttestationPolicy(allow_dev=True, allowed_measurements=None)
    with pytest.raises(ValueError, match="Registry"):  # None with no Registry would accept any TD
        make_client(url, tmp_path / "s.json", Ed25519PrivateKey.generate(), policy=no_list)
    client = make_client(
        url, tmp_path / "s.json", Ed25519PrivateKey.generate(), policy=no_list, allowlists=registry
    )
    async with client:
        with pytest.raises(AttestationRejected, match="Registry does not allow the image"):
            await client.complete("chat/completions", CHAT)
        allowed.add(image_hash(DEV_MEASUREMENT))
        clock[0] += 31  # the refusal was cached for one TTL
        await client.complete("chat/completions", CHAT)
        allowed.clear()  # revoked: the client follows within one TTL
        await client.complete("chat/completions", CHAT)
        clock[0] += 31
        with pytest.raises(AttestationRejected, match="Registry does not allow the image"):
            await client.complete("chat/completions", CHAT)


async def test_attestations_verified_once_per_node_key(
    imago: ImagoClient, fake_matcher, monkeypatch
) -> None:
    calls = []
    real = sdk_routing.verify_attestation

    def counting(doc, policy, expected_nonce=None):
        calls.append(doc.ed25519_public)
        return real(doc, policy, expected_nonce)

    monkeypatch.setattr(sdk_routing, "verify_attestation", counting)
    for _ in range(3):
        await imago.complete("chat/completions", CHAT)
        imago._router.routes.clear()  # re-route every time; the attestation cache still holds
    assert sorted(calls) == sorted(n.node_id for n in fake_matcher[0].nodes)


async def test_route_is_cached_and_refetched_on_failure(imago: ImagoClient, fake_matcher) -> None:
    matcher, _ = fake_matcher
    await imago.complete("chat/completions", CHAT)
    await imago.complete("chat/completions", CHAT)
    assert matcher.route_calls == 1 and matcher.relay_calls == 2
    matcher.dead_nodes = {n.node_id for n in matcher.nodes}
    with pytest.raises(RelayFailed) as info:
        await imago.complete("chat/completions", CHAT)
    assert info.value.status == 503
    # the cached route failed before the first byte: re-routed once, then gave up
    assert matcher.route_calls == 2 and matcher.relay_calls == 4
    assert imago.cumulative_spend == 2 * FULL_COST


async def test_concurrent_requests_share_one_route_fetch(imago: ImagoClient, fake_matcher) -> None:
    matcher, _ = fake_matcher
    results = await asyncio.gather(*(imago.complete("chat/completions", CHAT) for _ in range(16)))
    assert matcher.route_calls == 1
    assert len({r.job_id for r in results}) == 16
    assert imago.cumulative_spend == 16 * FULL_COST
    await imago.flush_vouchers()
    assert matcher.latest[ESCROW] == 16 * FULL_COST
    assert len(matcher.vouchers) < 16  # spends coalesce into fewer vouchers


async def test_failover_to_second_candidate(imago: ImagoClient, fake_matcher) -> None:
    matcher, _ = fake_matcher
    matcher.dead_nodes = {matcher.nodes[0].node_id}
    completion = await imago.complete("chat/completions", CHAT)
    assert completion.receipt.node_id == matcher.nodes[1].node_id
    assert completion.cost_nanoton == cost_nanoton(6, 7, 3_000_000, 8_000_000)


async def test_tampered_frame_is_an_integrity_error(imago: ImagoClient, fake_matcher) -> None:
    matcher, _ = fake_matcher
    matcher.tamper_frame = 1
    received = []
    with pytest.raises(ResponseTampered):
        async with imago.stream("chat/completions", {**CHAT, "stream": True}) as stream:
            async for chunk in stream:
                received.append(chunk)
    assert len(received) == 1
    assert imago.cumulative_spend == 0


async def test_engine_error_keeps_its_status(imago: ImagoClient, fake_matcher) -> None:
    for node in fake_matcher[0].nodes:
        node.fault = "engine_error"
    with pytest.raises(UpstreamError) as info:
        await imago.complete("chat/completions", CHAT)
    assert info.value.status == 400
    assert info.value.body["error"]["param"] == "max_tokens"
    assert imago.cumulative_spend == 0


async def test_relay_error_pays_only_tokens_received(imago: ImagoClient, fake_matcher) -> None:
    matcher, _ = fake_matcher
    matcher.relay_error_after = 2
    received = []
    with pytest.raises(RelayFailed) as info:
        async with imago.stream("chat/completions", {**CHAT, "stream": True}) as stream:
            async for chunk in stream:
                received.append(chunk)
    assert info.value.status == 502
    assert len(received) == 2
    assert imago.cumulative_spend == cost_nanoton(6, 2, 2_000_000, 6_000_000)
    await imago.flush_vouchers()
    assert matcher.latest[ESCROW] == imago.cumulative_spend


async def test_abandoned_stream_pays_tokens_received(imago: ImagoClient, fake_matcher) -> None:
    stream = imago.stream("chat/completions", {**CHAT, "stream": True})
    async for _ in stream:
        break
    await stream.aclose()
    assert imago.cumulative_spend == cost_nanoton(6, 1, 2_000_000, 6_000_000)


async def test_vouchers_are_cumulative_across_restarts(fake_matcher, tmp_path: Path) -> None:
    matcher, url = fake_matcher
    key = load_or_create_spend_key(tmp_path / "spend.key")
    state = tmp_path / "spend.json"
    async with make_client(url, state, key) as client:
        await client.complete("chat/completions", CHAT)
        await client.complete("chat/completions", CHAT)
    assert matcher.latest[ESCROW] == 2 * FULL_COST
    # the matcher is down: the spend is persisted before any voucher is posted
    matcher.reject_vouchers = True
    async with make_client(url, state, load_spend_key(tmp_path / "spend.key")) as client:
        assert client.cumulative_spend == 2 * FULL_COST
        await client.complete("chat/completions", CHAT)
        assert client.cumulative_spend == 3 * FULL_COST
        assert client.acknowledged_spend == 2 * FULL_COST
        await client.close(flush_timeout=0.3)
    saved = json.loads(state.read_text())
    assert saved["cumulative"] == 3 * FULL_COST and len(saved["pending_jobs"]) == 1
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    # back up: a restarted client hands the outstanding voucher over by itself
    matcher.reject_vouchers = False
    async with make_client(url, state, key) as client:
        await client.flush_vouchers()
        assert client.acknowledged_spend == 3 * FULL_COST
    assert matcher.latest[ESCROW] == 3 * FULL_COST
    cumulatives = [
        SpendVoucher.from_boc(base64.b64decode(v.voucher)).cumulative for v in matcher.vouchers
    ]
    assert cumulatives == sorted(cumulatives) and cumulatives[-1] == 3 * FULL_COST


async def test_ledger_refuses_another_escrow(tmp_path: Path) -> None:
    ledger = SpendLedger.open(tmp_path / "l.json", ESCROW, VAULT)
    ledger.add(5, "ab")
    ledger.add(7, "cd")
    ledger.close()  # a crash: the spends are only in the journal
    with pytest.raises(LedgerError):
        SpendLedger.open(tmp_path / "l.json", "0:" + "00" * 32, VAULT)
    with open(tmp_path / "l.json.journal", "ab") as journal:
        journal.write(b'{"s":3,"a":1')  # a torn last line
    reopened = SpendLedger.open(tmp_path / "l.json", ESCROW, VAULT)
    assert (reopened.cumulative, reopened.pending_jobs, reopened.seq) == (
        12,
        [["ab", 5], ["cd", 7]],
        2,
    )
    assert (tmp_path / "l.json.journal").read_bytes() == b""  # compacted into the snapshot
    reopened.add(1, "ef")
    reopened.close()
    assert SpendLedger.open(tmp_path / "l.json", ESCROW, VAULT).cumulative == 13


def test_keystore(tmp_path: Path) -> None:
    key = load_or_create_spend_key(tmp_path / "k.pem", passphrase="pw")
    assert stat.S_IMODE(os.stat(tmp_path / "k.pem").st_mode) == 0o600
    again = load_spend_key(tmp_path / "k.pem", passphrase="pw")
    assert again.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()
    assert "crypto" in json.loads((tmp_path / "k.pem").read_text())  # encrypted at rest
    with pytest.raises(WrongPassphrase):
        load_spend_key(tmp_path / "k.pem", passphrase="wrong")
    with pytest.raises(WrongPassphrase):
        load_spend_key(tmp_path / "k.pem")
    os.chmod(tmp_path / "k.pem", 0o644)
    with pytest.raises(KeystoreError, match="chmod 600"):
        load_spend_key(tmp_path / "k.pem", passphrase="pw")
