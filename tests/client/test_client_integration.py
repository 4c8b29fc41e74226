"""The client against the real matcher and node, in-process (their create_app
factories), with the node's fixture upstream as the engine."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.gateway import create_app as create_gateway
from client.sdk import ImagoClient, PriceCaps
from marketplace.app import create_app as create_matcher
from marketplace.config import MatcherConfig
from node.app import NodeConfig
from node.app import create_app as create_node
from protocol.signed import DEVNET_GLOBAL_ID, Receipt, cost_nanoton
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


class FakeLink:
    """A TCP relay between the matcher and a node that a test can cut, as if the node
    machine died (a fake, named as one)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class RealStack:
    client: ImagoClient
    openai: openai.AsyncOpenAI
    node_id: str
    link: FakeLink
    servers: list[TestServer]

    async def close(self) -> None:
        await self.openai.close()
        await self.link.close()
        for server in reversed(self.servers):
            await server.close()


async def start_real_stack(tmp: Path, options: FixtureOptions) -> RealStack:
    servers: list[TestServer] = []
    upstream = TestServer(create_fixture_upstream(options))
    await upstream.start_server()
    servers.append(upstream)
    matcher = TestServer(
        create_matcher(MatcherConfig(state_dir=tmp / "matcher", devnet=True, vault=VAULT))
    )
    await matcher.start_server()
    servers.append(matcher)
    matcher_url = str(matcher.make_url("")).rstrip("/")
    node_port = free_port()
    link = FakeLink(node_port)
    await link.start()
    node_app = create_node(
        NodeConfig(
            state_dir=tmp / "node",
            devnet=True,
            upstream=str(upstream.make_url("")).rstrip("/"),
            matcher=matcher_url,
            public_url=f"http://127.0.0.1:{link.port}",  # the matcher reaches it via the link
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
    oa = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key="unused", max_retries=0)
    return RealStack(client=client, openai=oa, node_id=node_id, link=link, servers=servers)


@pytest.fixture(scope="module")
async def real_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RealStack]:
    stack = await start_real_stack(tmp_path_factory.mktemp("integration"), FixtureOptions())
    yield stack
    await stack.close()


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
        bytes.fromhex(extra["imago_receipt"]["signature"]),
        bytes.fromhex(real_stack.node_id),
        global_id=DEVNET_GLOBAL_ID,
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


async def test_a_voucher_whose_answer_was_lost_counts_as_acknowledged(
    real_stack: RealStack,
) -> None:
    await real_stack.openai.chat.completions.create(model="fixture-model", messages=QUESTION)
    await real_stack.client.flush_vouchers()
    held = real_stack.client.acknowledged_spend
    # The same cumulative again, as after a lost 200: the matcher answers 409 and the
    # client must stop retrying rather than loop forever.
    assert await real_stack.client._vouchers.post(held, [])
    assert not await real_stack.client._vouchers.post(held + 1, [["00" * 32, 1]])  # unknown job


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


async def test_node_dies_mid_stream(tmp_path: Path) -> None:
    """The client sees the chunks that arrived, then an error, and pays only for them."""
    stack = await start_real_stack(tmp_path, FixtureOptions(chunk_delay=0.1))
    try:
        stream = await stack.openai.chat.completions.create(
            model="fixture-model", messages=QUESTION, stream=True
        )
        received = ""
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                received += chunk.choices[0].delta.content or ""
                if len(received.split()) == 2:
                    stack.link.cut()  # the node machine "dies" after two words
        assert received.split() == ANSWER.split()[:2]
        paid = stack.client.cumulative_spend
        full = cost_nanoton(chat_prompt_tokens(QUESTION), len(ANSWER.split()), *PRICES)
        assert 0 < paid < full
        assert paid == cost_nanoton(chat_prompt_tokens(QUESTION), 2, *PRICES)
        await stack.client.flush_vouchers()  # the matcher takes the partial voucher
        assert stack.client.acknowledged_spend == paid
    finally:
        await stack.close()
