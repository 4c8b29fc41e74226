"""The client against the real matcher and node, in-process (their create_app
factories), with the node's fixture upstream as the engine."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.gateway import create_app as create_gateway
from client.sdk import ImagoClient, PriceCaps
from contracts.protocol.signed import Receipt, cost_nanoton
from marketplace.app import create_app as create_matcher
from marketplace.config import MatcherConfig
from node.app import NodeConfig
from node.app import create_app as create_node
from tests.client.conftest import VAULT, make_client
from tests.node.fixture_upstream import (
    ANSWER,
    FixtureOptions,
    chat_prompt_tokens,
    create_fixture_upstream,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PRICES = (20_000_000, 60_000_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RealStack:
    client: ImagoClient
    openai: openai.AsyncOpenAI
    node_id: str


@pytest.fixture(scope="module")
async def real_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RealStack]:
    tmp = tmp_path_factory.mktemp("integration")
    servers: list[TestServer] = []
    try:
        upstream = TestServer(create_fixture_upstream(FixtureOptions()))
        await upstream.start_server()
        servers.append(upstream)
        matcher = TestServer(
            create_matcher(MatcherConfig(state_dir=tmp / "matcher", devnet=True, vault=VAULT))
        )
        await matcher.start_server()
        servers.append(matcher)
        matcher_url = str(matcher.make_url("")).rstrip("/")
        node_port = free_port()
        node_app = create_node(
            NodeConfig(
                state_dir=tmp / "node",
                devnet=True,
                upstream=str(upstream.make_url("")).rstrip("/"),
                matcher=matcher_url,
                public_url=f"http://127.0.0.1:{node_port}",
                price_prompt=PRICES[0],
                price_completion=PRICES[1],
            )
        )
        node = TestServer(node_app, port=node_port)
        await node.start_server()
        servers.append(node)
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                async with session.get(f"{matcher_url}/health") as resp:
                    if (await resp.json())["nodes"] >= 1:
                        break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the node never registered with the matcher")
            async with session.get(f"http://127.0.0.1:{node_port}/v1/identity") as resp:
                node_id = (await resp.json())["ed25519_public"]
        client = make_client(
            matcher_url,
            tmp / "spend.json",
            Ed25519PrivateKey.generate(),
            caps=PriceCaps(prompt=100_000_000, completion=100_000_000),
        )
        gateway = TestServer(create_gateway(client), handler_cancellation=True)
        await gateway.start_server()
        servers.append(gateway)
        oa = openai.AsyncOpenAI(
            base_url=str(gateway.make_url("/v1")), api_key="unused", max_retries=0
        )
        yield RealStack(client=client, openai=oa, node_id=node_id)
        await oa.close()
    finally:
        for server in reversed(servers):
            await server.close()


async def test_real_path_non_streaming(real_stack: RealStack) -> None:
    response = await real_stack.openai.chat.completions.create(
        model="fixture-model", messages=QUESTION
    )
    assert response.choices[0].message.content == ANSWER
    usage = response.usage
    assert usage is not None
    assert usage.prompt_tokens == chat_prompt_tokens(QUESTION)
    assert usage.completion_tokens == len(ANSWER.split())
    extra = usage.model_extra or {}
    assert extra["cost_nanoton"] == cost_nanoton(
        usage.prompt_tokens, usage.completion_tokens, *PRICES
    )
    receipt = Receipt.from_boc(base64.b64decode(extra["imago_receipt"]["boc"]))
    assert extra["imago_receipt"]["node"] == real_stack.node_id
    assert receipt.verify(
        bytes.fromhex(extra["imago_receipt"]["signature"]), bytes.fromhex(real_stack.node_id)
    )
    await real_stack.client.flush_vouchers()  # the real matcher accepted the voucher
    assert real_stack.client.acknowledged_spend == real_stack.client.cumulative_spend


async def test_real_path_streaming(real_stack: RealStack) -> None:
    before = real_stack.client.cumulative_spend
    stream = await real_stack.openai.chat.completions.create(
        model="fixture-model",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        elif chunk.usage is not None:
            usage = chunk.usage
    assert text == ANSWER
    assert usage is not None
    cost = (usage.model_extra or {})["cost_nanoton"]
    assert real_stack.client.cumulative_spend == before + cost
    await real_stack.client.flush_vouchers()
    assert real_stack.client.acknowledged_spend == real_stack.client.cumulative_spend


async def test_real_path_errors(real_stack: RealStack) -> None:
    before = real_stack.client.cumulative_spend
    with pytest.raises(openai.NotFoundError):
        await real_stack.openai.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.APIStatusError) as info:
        await real_stack.openai.chat.completions.create(
            model="fixture-model", messages=QUESTION, extra_body={"imago_max_price_prompt": 1}
        )
    assert info.value.status_code == 402
    with pytest.raises(openai.BadRequestError):  # the engine's 400, sealed end to end
        await real_stack.openai.chat.completions.create(
            model="fixture-model", messages=QUESTION, max_tokens=100_000
        )
    assert real_stack.client.cumulative_spend == before
