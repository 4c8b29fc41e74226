"""Fixtures for the client tests: fake nodes behind a fake matcher, a real ImagoClient
with its gateway on ephemeral loopback ports, and the official openai client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from openai import AsyncOpenAI

from client.gateway import create_app
from client.sdk import ImagoClient, PriceCaps
from contracts.chain.allowlists import Allowlists
from protocol.attestation import AttestationPolicy
from tests.client.client_fakes import FakeMatcher, FakeNode

ESCROW = "0:" + "e5" * 32
VAULT = "0:" + "7a" * 32
CAPS = PriceCaps(prompt=5_000_000, completion=10_000_000)


def make_client(
    matcher_url: str,
    state_path: Path,
    spend_key: Ed25519PrivateKey,
    *,
    policy: AttestationPolicy | None = None,
    devnet: bool = True,
    caps: PriceCaps = CAPS,
    allowlists: Allowlists | None = None,
    global_id: int | None = None,
) -> ImagoClient:
    return ImagoClient(
        matcher_url=matcher_url,
        escrow=ESCROW,
        vault=VAULT,
        spend_key=spend_key,
        policy=policy or AttestationPolicy(allow_dev=True),
        caps=caps,
        state_path=state_path,
        devnet=devnet,
        allowlists=allowlists,
        global_id=global_id,
    )


@dataclass
class Stack:
    nodes: list[FakeNode]
    matcher: FakeMatcher
    matcher_url: str
    client: ImagoClient
    spend_key: Ed25519PrivateKey
    state_path: Path
    gateway_url: str
    openai: AsyncOpenAI


@pytest.fixture
async def fake_matcher() -> AsyncIterator[tuple[FakeMatcher, str]]:
    nodes = [FakeNode(), FakeNode(price_prompt=3_000_000, price_completion=8_000_000)]
    matcher = FakeMatcher(nodes)
    server = TestServer(matcher.app())
    await server.start_server()
    yield matcher, str(server.make_url("")).rstrip("/")
    await server.close()


@pytest.fixture
async def stack(fake_matcher: tuple[FakeMatcher, str], tmp_path: Path) -> AsyncIterator[Stack]:
    matcher, matcher_url = fake_matcher
    spend_key = Ed25519PrivateKey.generate()
    state_path = tmp_path / "spend.json"
    client = make_client(matcher_url, state_path, spend_key)
    gateway = TestServer(create_app(client), handler_cancellation=True)
    await gateway.start_server()
    gateway_url = str(gateway.make_url("")).rstrip("/")
    oa = AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)
    yield Stack(
        nodes=matcher.nodes,
        matcher=matcher,
        matcher_url=matcher_url,
        client=client,
        spend_key=spend_key,
        state_path=state_path,
        gateway_url=gateway_url,
        openai=oa,
    )
    await oa.close()
    await gateway.close()
