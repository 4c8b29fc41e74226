"""Fixtures for the node's tests: the fixture upstream, a node in front of it, and a
minimal sealing client (the real client SDK lives in client/, which tests/node must not
depend on) that signs each job's ticket with a test matcher key the node is configured
to trust (``NodeConfig.matcher_key``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from node.app import STATE, NodeConfig, create_app
from node.keys import NodeKeys
from protocol import envelope
from protocol.api import SealedRequest
from protocol.envelope import FrameDecoder, FrameType, ResponseOpener
from protocol.signed import DEVNET_GLOBAL_ID, Receipt, model_hash
from protocol.tickets import TICKET_HEADER, ticket_message
from tests.node.fixture_upstream import FixtureOptions, create_fixture_upstream

ESCROW = "0:" + "ab" * 32
HIGH_CAP = 10**12
MATCHER_KEY = Ed25519PrivateKey.generate()  # the test matcher's ticket key
MATCHER_PUBLIC = MATCHER_KEY.public_key().public_bytes_raw().hex()


@dataclass
class JobResult:
    status: int
    job_id: bytes
    sealed: bytes
    body: dict | None = None  # clear error JSON when status != 200
    data: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    end: dict | None = None
    receipt: Receipt | None = None
    transcript_hash: bytes = b""
    order: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        out = []
        for frame in self.data:
            for choice in frame["chunk"].get("choices", []):
                part = choice.get("text")
                if part is None:
                    part = (choice.get("delta") or choice.get("message") or {}).get("content")
                out.append(part or "")
        return "".join(out)


def seal_job(
    node_x25519: bytes,
    body: dict,
    *,
    endpoint: str = "chat/completions",
    caps: tuple[int, int] = (HIGH_CAP, HIGH_CAP),
    escrow: str = ESCROW,
    job_id: bytes | None = None,
) -> tuple[bytes, bytes, bytes]:
    job_id = job_id or envelope.new_job_id()
    key = envelope.new_response_key()
    plain = (
        SealedRequest(
            endpoint=endpoint,
            body=body,
            response_key=key.hex(),
            escrow=escrow,
            max_price_prompt=caps[0],
            max_price_completion=caps[1],
        )
        .model_dump_json()
        .encode()
    )
    return job_id, key, envelope.seal_request(node_x25519, job_id, plain)


def sign_ticket(
    node_public: bytes, job_id: bytes, sealed: bytes, signer: Ed25519PrivateKey = MATCHER_KEY
) -> str:
    """What the matcher sends with each job it dispatches."""
    message = ticket_message(node_public, job_id, envelope.request_hash(sealed))
    return signer.sign(message).hex()


async def post_job(
    session: aiohttp.ClientSession,
    url: str,
    job_id: bytes,
    key: bytes,
    sealed: bytes,
    *,
    ticket: str | None,
) -> JobResult:
    headers = {"X-Imago-Job": job_id.hex(), "Content-Type": "application/octet-stream"}
    if ticket is not None:
        headers[TICKET_HEADER] = ticket
    async with session.post(url + "/v1/jobs", data=sealed, headers=headers) as r:
        return await read_job(r, job_id, key, sealed)


async def read_job(
    r: aiohttp.ClientResponse, job_id: bytes, key: bytes, sealed: bytes
) -> JobResult:
    """The node's answer to a job: its clear error, or its frames opened."""
    result = JobResult(status=r.status, job_id=job_id, sealed=sealed)
    if r.status != 200:
        result.body = await r.json()
        return result
    assert r.headers["Content-Type"].startswith("application/x-imago-frames")
    decoder, opener = FrameDecoder(), ResponseOpener(key, job_id)
    async for piece in r.content.iter_any():
        for ftype, payload in decoder.feed(piece):
            result.order.append(ftype.name)
            if ftype == FrameType.DATA:
                result.data.append(json.loads(opener.open(ftype, payload)))
            elif ftype == FrameType.ERROR:
                result.errors.append(json.loads(opener.open(ftype, payload)))
            elif ftype == FrameType.END:
                result.end = json.loads(payload)
    assert decoder.pending == 0
    result.transcript_hash = opener.transcript_hash
    if result.end and result.end["receipt"]:
        result.receipt = Receipt.from_boc(base64.b64decode(result.end["receipt"]))
    return result


def running_counts(result: JobResult) -> list[tuple[int, int]]:
    """The node's running (prompt, completion) count in each DATA frame; a client
    refuses a stream where either goes down."""
    counts = [(f["usage"]["prompt_tokens"], f["usage"]["completion_tokens"]) for f in result.data]
    for before, after in zip(counts, counts[1:], strict=False):
        assert after[0] >= before[0] and after[1] >= before[1], counts
    return counts


def check_receipt(result: JobResult, node_ed25519: bytes, model: str, prices: tuple[int, int]):
    """Everything a client checks on a receipt."""
    receipt, end = result.receipt, result.end
    assert receipt is not None and end is not None
    # a devnet node: its receipts name the devnet's network
    assert receipt.verify(bytes.fromhex(end["signature"]), node_ed25519, global_id=DEVNET_GLOBAL_ID)
    assert receipt.job_id == int.from_bytes(result.job_id, "big")
    assert receipt.escrow == Address(ESCROW)
    assert receipt.model == model_hash(model)
    assert (receipt.price_prompt, receipt.price_completion) == prices
    assert receipt.amount == receipt.priced_amount > 0
    assert receipt.request_hash == envelope.request_hash(result.sealed)
    assert receipt.response_hash == result.transcript_hash
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (
        end["prompt_tokens"],
        end["completion_tokens"],
    )
    assert receipt.prompt_tokens + receipt.completion_tokens > 0
    assert result.order[-1] == "END"
    return receipt


@dataclass
class NodeHandle:
    server: TestServer
    app: web.Application
    keys: NodeKeys
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def ticket(self, job_id: bytes, sealed: bytes) -> str:
        return sign_ticket(self.keys.ed25519_public, job_id, sealed)

    async def post(self, job_id: bytes, key: bytes, sealed: bytes) -> JobResult:
        """Post a job as the test matcher dispatches it: with its ticket."""
        ticket = self.ticket(job_id, sealed)
        return await post_job(self.session, self.url, job_id, key, sealed, ticket=ticket)

    async def job(self, body: dict, **kw) -> JobResult:
        job_id, key, sealed = seal_job(self.keys.x25519_public, body, **kw)
        return await self.post(job_id, key, sealed)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FixtureOptions, TestServer]]:
    opts = FixtureOptions()
    server = TestServer(create_fixture_upstream(opts))
    await server.start_server()
    yield opts, server
    await server.close()


async def start_node(
    config: NodeConfig,
    session: aiohttp.ClientSession,
    ready_timeout: float = 10,
    port: int | None = None,
) -> NodeHandle:
    app = create_app(config)
    server = TestServer(app, port=port)
    await server.start_server()
    await asyncio.wait_for(app[STATE].engine_ready.wait(), ready_timeout)
    return NodeHandle(server, app, app[STATE].keys, session)


@pytest.fixture
async def make_node(
    tmp_path: Path, http: aiohttp.ClientSession, upstream
) -> AsyncIterator[Callable[..., object]]:
    started: list[NodeHandle] = []
    _, up_server = upstream

    async def factory(port: int | None = None, **overrides) -> NodeHandle:
        fields = {
            "state_dir": tmp_path / f"node{len(started)}",
            "devnet": True,
            "upstream": str(up_server.make_url("")).rstrip("/"),
            "matcher_key": MATCHER_PUBLIC,
        }
        fields.update(overrides)
        handle = await start_node(NodeConfig(**fields), http, port=port)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        await handle.server.close()


@pytest.fixture
async def node(make_node) -> NodeHandle:
    return await make_node()


def engine_home() -> Path:
    return Path(os.environ.get("IMAGO_ENGINE_HOME") or Path.home() / ".cache" / "imago")
