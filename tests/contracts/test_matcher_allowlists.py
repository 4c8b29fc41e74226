"""The matcher's admission against the Registry's allowlists on the devnet's real TVM:
a matcher with ``--chain --registry`` and a fake node staked as a real Provider.

Each test deploys its own Registry, so that allowing and revoking stay its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from pytoniq_core import Address
from sqlalchemy import select

from contracts.chain import operations
from contracts.chain.messages.capabilities import Capabilities
from contracts.chain.wallet import Wallet
from marketplace.app import create_app
from marketplace.config import MatcherConfig
from marketplace.db import NodeRecord
from protocol.attestation import DEV_MEASUREMENT, image_hash
from tests.chain.fixtures import DevnetFixture
from tests.contracts.conftest import TEST_PARAMS, TON
from tests.marketplace.conftest import RunningMatcher, signed_registration
from tests.marketplace.fakes import FakeNode, start_site

CAPS = Capabilities("CPU", 0, 1, "local")
SERVED = "served-model"
OTHER = "other-model"
DEV_IMAGE = image_hash(DEV_MEASUREMENT)


@dataclass
class World:
    gov: Wallet
    registry: Address
    owner: Wallet
    provider: Address
    node: FakeNode
    matcher: RunningMatcher
    session: aiohttp.ClientSession

    async def register(self) -> tuple[int, str]:
        url = f"{self.matcher.url}/v1/nodes"
        async with self.session.post(url, json=signed_registration(self.node)) as r:
            return r.status, ((await r.json()).get("error") or {}).get("code", "")

    async def models(self) -> list[str]:
        async with self.session.get(f"{self.matcher.url}/v1/models") as r:
            return sorted(m["id"] for m in (await r.json())["data"])

    async def node_state(self) -> str | None:
        table = NodeRecord.__table__
        query = select(table.c.state).where(table.c.node_id == self.node.node_id)
        return await self.matcher.ledger.call(lambda c: c.execute(query).scalar_one_or_none())


@pytest.fixture
async def world(
    devnet: DevnetFixture, make_wallet: Callable[..., Awaitable[Wallet]], tmp_path: Path
) -> AsyncIterator[World]:
    """A fresh Registry, a fake node offering two models whose key a Provider of it
    stakes, and a matcher that reads that Registry (every getter answer fresh)."""
    gov, owner = await make_wallet(50 * TON), await make_wallet(50 * TON)
    registry, _ = await operations.deploy_registry(gov, TEST_PARAMS)
    node = FakeNode(models={SERVED: (100, 200), OTHER: (100, 200)})
    provider, _ = await operations.register_provider(
        owner, devnet.chain, registry, node.ed_public, 2 * TON, CAPS
    )
    node.provider = provider.to_str(is_user_friendly=False)
    await node.start()
    config = MatcherConfig(
        state_dir=tmp_path / "matcher",
        devnet=True,
        instance="test-matcher",
        chain_url=devnet.url,
        registry=registry.to_str(is_user_friendly=False),
        allowlist_ttl_s=0,  # a revocation shows at the next poll, not after a TTL
        status_interval_s=3600,
        reattest_interval_s=3600,
    )
    app = create_app(config)
    runner, url = await start_site(app)
    matcher = RunningMatcher(app, runner, url, config)
    async with aiohttp.ClientSession() as session:
        yield World(gov, registry, owner, provider, node, matcher, session)
    await matcher.stop()
    await node.stop()


async def test_admitted_when_the_image_and_a_model_are_allowed(world: World) -> None:
    await operations.allow_image(world.gov, world.registry, DEV_IMAGE)
    await operations.allow_model(world.gov, world.registry, SERVED)
    assert await world.register() == (200, "")
    assert await world.models() == [SERVED]  # OTHER is offered, not allowed
    assert await world.node_state() == "admitted"


async def test_refused_when_the_image_is_not_allowed(world: World) -> None:
    await operations.allow_model(world.gov, world.registry, SERVED)
    assert await world.register() == (403, "image_not_allowed")
    assert await world.node_state() == "rejected"
    assert await world.models() == []


async def test_refused_when_no_offered_model_is_allowed(world: World) -> None:
    await operations.allow_image(world.gov, world.registry, DEV_IMAGE)
    await operations.allow_model(world.gov, world.registry, "a-model-nobody-serves")
    assert await world.register() == (403, "model_not_allowed")
    assert await world.node_state() == "rejected"


async def test_a_revoked_model_leaves_the_offers_at_the_next_poll(world: World) -> None:
    await operations.allow_image(world.gov, world.registry, DEV_IMAGE)
    for model in (SERVED, OTHER):
        await operations.allow_model(world.gov, world.registry, model)
    assert await world.register() == (200, "")
    assert await world.models() == [OTHER, SERVED]

    await operations.allow_model(world.gov, world.registry, OTHER, allowed=False)
    assert await world.models() == [OTHER, SERVED]  # until the matcher polls
    await world.matcher.registry.poll_all()
    assert await world.models() == [SERVED]
    assert set(world.matcher.registry.nodes[world.node.node_id].offers) == {SERVED}
    body = {"model": OTHER, "max_price_prompt": 10**6, "max_price_completion": 10**6}
    async with world.session.post(f"{world.matcher.url}/v1/route", json=body) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"


async def test_a_revoked_image_removes_the_node_at_reattestation(world: World) -> None:
    await operations.allow_image(world.gov, world.registry, DEV_IMAGE)
    await operations.allow_model(world.gov, world.registry, SERVED)
    assert await world.register() == (200, "")

    await operations.allow_image(world.gov, world.registry, DEV_IMAGE, allowed=False)
    await world.matcher.registry.poll_all()  # polls read the models, not the image
    assert await world.models() == [SERVED]
    await world.matcher.registry.reattest_all()
    assert world.matcher.registry.nodes == {}
    assert await world.models() == []
    assert await world.node_state() == "rejected"


async def test_an_unbonding_provider_removes_its_node_at_reattestation(world: World) -> None:
    await operations.allow_image(world.gov, world.registry, DEV_IMAGE)
    await operations.allow_model(world.gov, world.registry, SERVED)
    assert await world.register() == (200, "")

    await operations.provider_unstake(world.owner, world.provider)
    await world.matcher.registry.reattest_all()
    assert world.matcher.registry.nodes == {}
    assert await world.node_state() == "rejected"
    await world.matcher.registry.poll_all()  # a healthy status does not bring it back
    assert await world.models() == []
