"""The Registry's allowlists in the matcher (marketplace.allowlists) against scripted
getters: the per-hash cache, chain outages, and what admission, polls and
re-attestation make of them. tests/contracts/test_matcher_allowlists.py runs the
allow/revoke flows on the devnet's real Registry."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest
from sqlalchemy import select

from contracts.chain import allowlists
from contracts.chain.allowlists import Allowlists, AllowlistUnavailable
from contracts.chain.results import ToncenterError
from marketplace import app as matcher_app
from marketplace.config import MatcherConfig
from marketplace.db import NodeRecord
from marketplace.registry import NodeRegistry
from protocol.attestation import DEV_MEASUREMENT, image_hash
from protocol.signed import model_hash
from tests.marketplace.conftest import RunningMatcher, signed_registration
from tests.marketplace.fakes import MODEL

REGISTRY = "0:" + "11" * 32
DEAD_CHAIN = "http://127.0.0.1:9"  # never read: the getters are scripted


class ScriptedRegistry:
    """FAKE: stands in for the Registry's two getters (the devnet tests read the real
    ones). ``down`` makes every read fail as a network error would."""

    def __init__(self) -> None:
        self.images: set[int] = set()
        self.models: set[int] = set()
        self.down = False
        self.reads = 0

    async def _read(self, allowed: set[int], value: int) -> bool:
        self.reads += 1
        await asyncio.sleep(0)  # let concurrent askers meet on one read
        if self.down:
            raise ToncenterError(0, "ClientConnectorError: connection refused")
        return value in allowed

    async def is_image_allowed(self, _client, _registry, image: int) -> bool:
        return await self._read(self.images, image)

    async def is_model_allowed(self, _client, _registry, model: int) -> bool:
        return await self._read(self.models, model)


def script_registry(monkeypatch: pytest.MonkeyPatch) -> ScriptedRegistry:
    """Make every Allowlists read the returned ScriptedRegistry for this test."""
    registry = ScriptedRegistry()
    monkeypatch.setattr(allowlists, "is_image_allowed", registry.is_image_allowed)
    monkeypatch.setattr(allowlists, "is_model_allowed", registry.is_model_allowed)

    async def is_devnet(chain_url: str) -> bool:  # FAKE: DEAD_CHAIN stands for the devnet
        return chain_url == DEAD_CHAIN

    monkeypatch.setattr(matcher_app, "is_devnet", is_devnet)
    return registry


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> ScriptedRegistry:
    return script_registry(monkeypatch)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_answers_are_cached_per_hash_and_read_once_for_concurrent_askers(scripted):
    clock = Clock()
    lists = Allowlists(None, REGISTRY, ttl_s=30, clock=clock)  # type: ignore[arg-type]
    scripted.models.add(model_hash("m"))

    assert await asyncio.gather(*(lists.model_allowed("m") for _ in range(10))) == [True] * 10
    assert scripted.reads == 1
    assert await lists.allowed_models(["m", "other", "m"], admission=False) == {"m"}
    assert scripted.reads == 2  # "m" from the cache, "other" read once

    scripted.models.clear()  # revoked on-chain: seen once the answer is older than the TTL
    clock.now += 29
    assert await lists.model_allowed("m")
    clock.now += 2
    assert not await lists.model_allowed("m")

    # Admission re-reads answers older than a moment: a node registering right after
    # governance allowed its model is not refused for a TTL on the old answer.
    scripted.models.add(model_hash("m"))
    clock.now += allowlists.FRESH_S - 0.5
    assert not await lists.model_allowed("m")  # a poll keeps the cached answer
    assert not await lists.allowed_models(["m"], admission=True)  # still fresh enough
    clock.now += 1
    assert await lists.allowed_models(["m"], admission=True) == {"m"}


def test_the_image_and_model_ids_are_what_governance_allows() -> None:
    """The ids the CLI and `contracts.chain.operations` put on-chain: sha256 of the measurement
    (the 48-byte mr_td, or DEV_MEASUREMENT) and of the model id's UTF-8 name."""
    from contracts.chain.registry_cli import _image_value

    mr_td = bytes(range(48))
    assert image_hash(mr_td) == int.from_bytes(hashlib.sha256(mr_td).digest(), "big")
    assert _image_value(mr_td.hex()) == image_hash(mr_td)  # `allow-image <mr_td>`
    assert _image_value(f"{image_hash(mr_td):064x}") == image_hash(mr_td)  # or the hash
    assert _image_value("dev", "devnet") == image_hash(DEV_MEASUREMENT)  # `allow-image dev`
    assert model_hash("SmolLM2") == int.from_bytes(hashlib.sha256(b"SmolLM2").digest(), "big")


async def test_an_outage_keeps_the_last_answer_and_is_not_hammered(scripted):
    clock = Clock()
    lists = Allowlists(None, REGISTRY, ttl_s=30, retry_s=5, clock=clock)  # type: ignore[arg-type]
    scripted.images.add(image_hash(DEV_MEASUREMENT))
    scripted.models.add(model_hash("m"))
    assert await lists.image_allowed(DEV_MEASUREMENT)
    assert await lists.model_allowed("m")

    scripted.down = True
    clock.now += 31
    reads = scripted.reads
    assert await lists.image_allowed(DEV_MEASUREMENT)  # the last answer stands
    assert scripted.reads == reads + 1
    clock.now += 4
    assert await lists.image_allowed(DEV_MEASUREMENT)
    assert scripted.reads == reads + 1  # retried only after retry_s
    clock.now += 2
    assert await lists.image_allowed(DEV_MEASUREMENT)
    assert scripted.reads == reads + 2

    # Never answered: admission (strict) refuses, a poll (not strict) leaves it out.
    with pytest.raises(AllowlistUnavailable, match="cannot read the model allowlist"):
        await lists.allowed_models(["m", "new"], admission=True)
    assert await lists.allowed_models(["m", "new"], admission=False) == {"m"}


async def test_tdx_measurements_are_left_to_the_chain_only_with_a_registry(tmp_path):
    def policy(**fields):
        return MatcherConfig(state_dir=tmp_path, **fields).attestation_policy

    mr_td = bytes(range(48))
    assert policy().allowed_measurements == frozenset()  # no TD at all, as before
    assert policy(registry=REGISTRY).allowed_measurements == frozenset()  # nothing reads it
    assert policy(chain_url=DEAD_CHAIN, registry=REGISTRY).allowed_measurements is None
    # --allow-mr-td with a Registry narrows the on-chain list; it does not replace it.
    both = policy(chain_url=DEAD_CHAIN, registry=REGISTRY, allowed_mr_td=frozenset({mr_td}))
    assert both.allowed_measurements == frozenset({mr_td})
    # A registry of nodes that nothing checks the measurement of cannot be built.
    open_policy = policy(chain_url=DEAD_CHAIN, registry=REGISTRY)
    with pytest.raises(ValueError, match="needs the Registry's allowlists"):
        NodeRegistry(None, None, open_policy)  # type: ignore[arg-type]


async def _node_row(matcher: RunningMatcher, node_id: str) -> tuple[str, str] | None:
    table = NodeRecord.__table__
    row = await matcher.ledger.call(
        lambda c: c.execute(
            select(table.c.state, table.c.reason).where(table.c.node_id == node_id)
        ).one_or_none()
    )
    return None if row is None else (row[0], row[1])


async def test_admission_polls_and_reattestation_follow_the_registry(
    scripted, session: aiohttp.ClientSession, start_matcher, start_node
):
    matcher = await start_matcher(chain_url=DEAD_CHAIN, registry=REGISTRY, allowlist_ttl_s=0)
    matcher.registry.providers = None  # the Provider check has its own tests
    node = await start_node(models={MODEL: (100, 200), "other-model": (100, 200)})

    async def register() -> tuple[int, str]:
        async with session.post(f"{matcher.url}/v1/nodes", json=signed_registration(node)) as r:
            body = await r.json()
            return r.status, (body.get("error") or {}).get("code", "")

    async def models() -> list[str]:
        async with session.get(f"{matcher.url}/v1/models") as r:
            return [m["id"] for m in (await r.json())["data"]]

    scripted.down = True  # no answer yet: refused, but not recorded as an unfit node
    assert await register() == (503, "chain_unavailable")
    assert await _node_row(matcher, node.node_id) is None

    scripted.down = False
    assert await register() == (403, "image_not_allowed")
    state, reason = await _node_row(matcher, node.node_id)
    assert state == "rejected" and f"{image_hash(DEV_MEASUREMENT):064x}" in reason

    scripted.images.add(image_hash(DEV_MEASUREMENT))
    assert await register() == (403, "model_not_allowed")
    assert (await _node_row(matcher, node.node_id))[0] == "rejected"

    scripted.models.add(model_hash(MODEL))
    assert await register() == (200, "")
    assert await models() == [MODEL]  # the other model is offered, not allowed
    assert (await _node_row(matcher, node.node_id))[0] == "admitted"

    # An outage during the periodic checks evicts nothing.
    scripted.down = True
    await matcher.registry.poll_all()
    await matcher.registry.reattest_all()
    assert await models() == [MODEL]
    assert matcher.registry.nodes[node.node_id].routable

    scripted.down = False
    scripted.models.clear()
    await matcher.registry.poll_all()
    assert await models() == []
    assert node.node_id in matcher.registry.nodes  # serves nothing, but stays attested
    scripted.models.add(model_hash(MODEL))
    await matcher.registry.poll_all()
    assert await models() == [MODEL]

    scripted.images.clear()
    await matcher.registry.reattest_all()
    assert matcher.registry.nodes == {}
    assert (await _node_row(matcher, node.node_id))[0] == "rejected"
