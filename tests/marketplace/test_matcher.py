"""Matcher against fake nodes: admission, routing, models, health, metrics."""

from __future__ import annotations

import stat
import time

import pytest

from marketplace.config import MatcherConfig
from protocol.api import RouteResponse
from protocol.attestation import verify_attestation
from protocol.keystore import KeystoreError
from protocol.signed import TESTNET_GLOBAL_ID
from tests.marketplace.conftest import admit, signed_registration
from tests.marketplace.fakes import MODEL


async def route(session, matcher, model=MODEL, prompt_cap=10_000, completion_cap=10_000):
    body = {"model": model, "max_price_prompt": prompt_cap, "max_price_completion": completion_cap}
    async with session.post(f"{matcher.url}/v1/route", json=body) as resp:
        return resp.status, await resp.json()


async def test_dev_attestation_admitted_in_devnet_mode(session, start_matcher, start_node):
    matcher = await start_matcher()
    node = await start_node()
    assert await admit(session, matcher.url, node) == 200
    status, body = await route(session, matcher)
    assert status == 200
    parsed = RouteResponse.model_validate(body)
    assert [c.node_id for c in parsed.candidates] == [node.node_id]
    # The client can verify the doc the matcher verified, with its own policy.
    doc = parsed.candidates[0].attestation
    verified = verify_attestation(doc, MatcherConfig(devnet=True).attestation_policy)
    assert verified.ed25519_public == node.ed_public


async def test_dev_attestation_refused_without_devnet(session, start_matcher, start_node):
    matcher = await start_matcher(devnet=False, global_id=TESTNET_GLOBAL_ID)
    node = await start_node()
    async with session.post(f"{matcher.url}/v1/nodes", json=signed_registration(node)) as resp:
        assert resp.status == 403
        error = (await resp.json())["error"]
    assert "devnet" in error["message"] and error["code"] == "attestation_failed"
    assert (await route(session, matcher))[0] == 404


async def test_bad_nonce_and_wrong_key_refused(session, start_matcher, start_node):
    matcher = await start_matcher()
    stale = await start_node(attest_mode="wrong_nonce")
    forged = await start_node(attest_mode="wrong_key")
    assert await admit(session, matcher.url, stale) == 403
    assert await admit(session, matcher.url, forged) == 403
    assert matcher.registry.nodes == {}


async def test_unreachable_node_refused(session, start_matcher, start_node):
    matcher = await start_matcher()
    node = await start_node()
    await node.stop()
    assert await admit(session, matcher.url, node) == 403


async def test_routing_errors(session, start_matcher, start_node):
    matcher = await start_matcher()
    status, body = await route(session, matcher)
    assert status == 404 and body["error"]["code"] == "model_not_found"
    node = await start_node(models={MODEL: (500, 900)})
    await admit(session, matcher.url, node)
    status, body = await route(session, matcher, prompt_cap=400)
    assert status == 402 and body["error"]["code"] == "price_cap_too_low"
    status, body = await route(session, matcher, completion_cap=899)
    assert status == 402
    assert (await route(session, matcher, prompt_cap=500, completion_cap=900))[0] == 200
    status, body = await route(session, matcher, model="nope")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    node.healthy = False
    await matcher.registry.poll_all()
    status, body = await route(session, matcher)
    assert status == 503
    async with session.post(f"{matcher.url}/v1/route", data=b"{not json") as resp:
        assert resp.status == 400 and "error" in await resp.json()
    async with session.post(f"{matcher.url}/v1/route", json={"model": 3}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_body"


async def test_ranking_by_price_and_load(session, start_matcher, start_node):
    matcher = await start_matcher()
    cheap = await start_node(models={MODEL: (100, 100)})
    dear = await start_node(models={MODEL: (150, 150)})
    for node in (dear, cheap):
        assert await admit(session, matcher.url, node) == 200
    _, body = await route(session, matcher)
    assert [c["node_id"] for c in body["candidates"]] == [cheap.node_id, dear.node_id]
    # The cheap node fills up: the pricier idle one now goes first.
    cheap.active_jobs = cheap.max_concurrent
    await matcher.registry.poll_all()
    _, body = await route(session, matcher)
    assert [c["node_id"] for c in body["candidates"]] == [dear.node_id, cheap.node_id]
    # Relays the matcher opened count as load too, before the node reports them.
    cheap.active_jobs = 0
    await matcher.registry.poll_all()
    matcher.registry.nodes[cheap.node_id].stats.inflight = 3
    _, body = await route(session, matcher)
    assert body["candidates"][0]["node_id"] == dear.node_id
    # A cap between the two prices leaves only the cheap node.
    _, body = await route(session, matcher, prompt_cap=120, completion_cap=120)
    assert [c["node_id"] for c in body["candidates"]] == [cheap.node_id]


async def test_ranking_by_measured_latency_and_success(session, start_matcher, start_node):
    matcher = await start_matcher()
    a = await start_node()
    b = await start_node()
    for node in (a, b):
        await admit(session, matcher.url, node)
    stats_a = matcher.registry.nodes[a.node_id].stats
    stats_b = matcher.registry.nodes[b.node_id].stats
    stats_a.ttft_ms, stats_b.ttft_ms = 900.0, 50.0
    _, body = await route(session, matcher)
    assert body["candidates"][0]["node_id"] == b.node_id
    stats_b.success = 0.2
    _, body = await route(session, matcher)
    assert body["candidates"][0]["node_id"] == a.node_id


async def test_status_poll_takes_dead_node_out_and_back(session, start_matcher, start_node):
    matcher = await start_matcher()
    node = await start_node()
    await admit(session, matcher.url, node)
    runner, node.runner = node.runner, None
    await runner.cleanup()
    for _ in range(2):
        await matcher.registry.poll_all()
    assert not matcher.registry.nodes[node.node_id].routable
    assert (await route(session, matcher))[0] == 503


async def test_reattestation_failure_evicts(session, start_matcher, start_node):
    matcher = await start_matcher()
    node = await start_node()
    await admit(session, matcher.url, node)
    await matcher.registry.reattest_all()
    assert node.node_id in matcher.registry.nodes
    node.attest_mode = "wrong_nonce"
    await matcher.registry.reattest_all()
    assert node.node_id not in matcher.registry.nodes
    assert (await route(session, matcher))[0] == 404


async def test_scheduler_polls_status(session, start_matcher, start_node):
    import asyncio

    matcher = await start_matcher(status_interval_s=0.1)
    node = await start_node()
    await admit(session, matcher.url, node)
    node.models = {MODEL: (1, 2), "other-model": (3, 4)}
    for _ in range(200):
        await asyncio.sleep(0.05)
        if "other-model" in matcher.registry.nodes[node.node_id].offers:
            break
    assert "other-model" in matcher.registry.nodes[node.node_id].offers


async def test_models_health_metrics(session, start_matcher, start_node):
    matcher = await start_matcher()
    async with session.get(f"{matcher.url}/health") as resp:
        assert await resp.json() == {"status": "ok", "nodes": 0}
    a = await start_node(models={MODEL: (100, 300), "other": (1, 1)})
    b = await start_node(models={MODEL: (200, 250)})
    for node in (a, b):
        await admit(session, matcher.url, node)
    async with session.get(f"{matcher.url}/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id[MODEL]["imago_price_prompt"] == 100
    assert by_id[MODEL]["imago_price_completion"] == 250
    assert by_id[MODEL]["imago_nodes"] == 2 and by_id["other"]["imago_nodes"] == 1
    async with session.get(f"{matcher.url}/health") as resp:
        assert await resp.json() == {"status": "ok", "nodes": 2}
    async with session.get(f"{matcher.url}/metrics") as resp:
        text = await resp.text()
        assert resp.content_type == "text/plain"
    assert "imago_nodes_admitted 2" in text
    assert 'imago_jobs{status="completed"} 0' in text
    assert "# TYPE imago_relay_seconds histogram" in text
    async with session.get(f"{matcher.url}/nope") as resp:
        assert resp.status == 404 and "error" in await resp.json()


async def test_tdx_admission_goes_through_the_quote_verifier(session, start_matcher, start_node):
    """A node presenting the real TDX quote: the matcher verifies it with dcap-qvl.

    At the real time its collateral has expired; with the clock pinned and its mr_td
    allowlisted, every check passes except the binding to this node's keys and nonce.
    """
    import json

    import pytest

    from tests.marketplace.test_tdx import MR_TD_OFFSET, TDX_DIR, _pinned_now

    if TDX_DIR is None:
        pytest.skip("the real TDX quote is absent (shared/testdata/tdx)")
    quote = (TDX_DIR / "tdx_quote").read_bytes()
    collateral = json.loads((TDX_DIR / "tdx_quote_collateral.json").read_text())
    node = await start_node(tdx_sample=(quote, collateral))
    mr_td = quote[MR_TD_OFFSET : MR_TD_OFFSET + 48]

    async def register(matcher) -> dict:
        async with session.post(f"{matcher.url}/v1/nodes", json=signed_registration(node)) as resp:
            assert resp.status == 403
            return (await resp.json())["error"]

    live = await start_matcher(
        devnet=False, global_id=TESTNET_GLOBAL_ID, allowed_mr_td=frozenset({mr_td})
    )
    assert "collateral is not valid" in (await register(live))["message"]
    pinned = await start_matcher(
        devnet=False,
        global_id=TESTNET_GLOBAL_ID,
        allowed_mr_td=frozenset({mr_td}),
        attestation_now=_pinned_now(collateral),
        state_dir=live.config.state_dir.parent / "pinned",
    )
    assert "report_data does not match" in (await register(pinned))["message"]
    other = await start_matcher(
        attestation_now=_pinned_now(collateral), state_dir=live.config.state_dir.parent / "o"
    )
    assert "not in the allowlist" in (await register(other))["message"]


class FakeProviderBook:
    """FAKE: stands in for the on-chain Provider check (tests/contracts checks the real
    one); backs exactly the (provider, node key) pairs it is given."""

    def __init__(self, backed: dict[str, bytes]) -> None:
        self.backed = backed
        self.asked: list[str] = []

    async def check(self, provider: str, node_key: bytes) -> None:
        from marketplace.providers import ProviderRejected

        self.asked.append(provider)
        if self.backed.get(provider) != node_key:
            raise ProviderRejected(f"provider {provider} does not back this key")


async def test_with_a_chain_only_nodes_backed_by_a_provider_are_admitted(
    session, start_matcher, start_node
):
    from marketplace.app import REGISTRY

    matcher = await start_matcher(devnet=True)
    staked = await start_node(provider="0:" + "aa" * 32)
    unstaked = await start_node(provider="0:" + "bb" * 32)
    anonymous = await start_node()
    book = FakeProviderBook({"0:" + "aa" * 32: staked.ed_public})
    matcher.app[REGISTRY].providers = book
    assert await admit(session, matcher.url, staked) == 200
    assert await admit(session, matcher.url, unstaked) == 403
    assert await admit(session, matcher.url, anonymous) == 403  # names no Provider at all
    assert book.asked == ["0:" + "aa" * 32, "0:" + "bb" * 32]
    assert set(matcher.app[REGISTRY].nodes) == {staked.node_id}


async def test_a_registration_must_be_signed_by_the_node_and_fresh(
    session, start_matcher, start_node
):
    matcher = await start_matcher(devnet=True)
    node, other = await start_node(), await start_node()

    async def register(body: dict) -> tuple[int, str]:
        async with session.post(f"{matcher.url}/v1/nodes", json=body) as resp:
            return resp.status, ((await resp.json()).get("error") or {}).get("code", "")

    unsigned = {"url": node.url, "ed25519_public": node.node_id}
    assert await register(unsigned) == (403, "bad_signature")
    # Pointing another node's identity at this URL takes that node's key.
    forged = {**signed_registration(node), "ed25519_public": other.node_id}
    assert await register(forged) == (403, "bad_signature")
    stale = signed_registration(node, signed_at=int(time.time()) - 3600)
    assert await register(stale) == (403, "stale_registration")
    assert await register(signed_registration(node)) == (200, "")


async def test_the_ticket_key_is_private_survives_a_restart_and_can_be_shared(
    session, start_matcher, tmp_path
):
    async def ticket_key(matcher) -> str:
        async with session.get(f"{matcher.url}/v1/ticket-key") as resp:
            assert resp.status == 200
            return (await resp.json())["ed25519_public"]

    first = await start_matcher()
    key = await ticket_key(first)
    path = first.config.state_dir / "ticket_key.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    await first.stop()
    assert await ticket_key(await start_matcher()) == key
    # Replicas with their own state dirs share one key through --ticket-key.
    replica = await start_matcher(state_dir=tmp_path / "replica", ticket_key=path)
    assert await ticket_key(replica) == key
    alone = await start_matcher(state_dir=tmp_path / "alone")
    assert await ticket_key(alone) != key
    path.chmod(0o644)  # a key others may read is refused, like any keystore
    with pytest.raises(KeystoreError):
        await start_matcher()
