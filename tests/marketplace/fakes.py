"""Test fakes: a fake node and a fake client that speak the real protocol.

The fake node makes a real dev attestation, opens real HPKE requests, seals real
response frames and signs real receipts (protocol); only the model is fake:
it echoes the prompt back in ``chunks`` pieces. Its ``mode`` injects failures.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from protocol import envelope
from protocol.api import (
    AttestationDoc,
    EndFrame,
    ModelOffer,
    NodeIdentity,
    NodeStatus,
    RelayRequest,
    SealedRequest,
    relay_message,
)
from protocol.attestation import make_dev_evidence, report_data
from protocol.envelope import FrameDecoder, FrameType, ResponseOpener, ResponseSealer
from protocol.signed import (
    DEVNET_GLOBAL_ID,
    MAINNET_GLOBAL_ID,
    Receipt,
    SpendVoucher,
    cost_nanoton,
    model_hash,
)
from protocol.tickets import TICKET_HEADER

MODEL = "fake-echo-1"
ESCROW = Address("0:" + "ab" * 32)
VAULT = Address("0:" + "cd" * 32)
MARKER = "PLAINTEXT-MARKER-7c1e9f"


async def start_site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@dataclass
class FakeNode:
    """A fake node. ``mode``: ok, error500, busy, die, slow, slow_after_headers, midstream,
    forge, hang,
    refuse, bad_hash, wrong_network (a receipt for mainnet). ``attest_mode``: good,
    wrong_nonce, wrong_key."""

    models: dict[str, tuple[int, int]] = field(default_factory=lambda: {MODEL: (100, 200)})
    mode: str = "ok"
    attest_mode: str = "good"
    tdx_sample: tuple[bytes, dict] | None = None  # a real quote + collateral to present
    chunks: int = 3
    max_concurrent: int = 4
    active_jobs: int = 0
    healthy: bool = True
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    url: str = ""
    jobs_seen: list[str] = field(default_factory=list)
    tickets: dict[str, str | None] = field(default_factory=dict)  # job id → ticket header
    sent: dict[str, bytearray] = field(default_factory=dict)  # job id → bytes written
    released: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    provider: str | None = None  # the Provider contract it names, if any

    def __post_init__(self) -> None:
        self.x_key, self.x_public = envelope.generate_x25519()
        self.ed_public = self.key.public_key().public_bytes_raw()

    @property
    def node_id(self) -> str:
        return self.ed_public.hex()

    async def start(self) -> FakeNode:
        app = web.Application()
        app.router.add_get("/v1/identity", self.identity)
        app.router.add_get("/v1/status", self.status)
        app.router.add_post("/v1/attest", self.attest)
        app.router.add_post("/v1/jobs", self.job)
        self.runner, self.url = await start_site(app)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def identity(self, _request: web.Request) -> web.Response:
        body = NodeIdentity(
            ed25519_public=self.ed_public.hex(),
            x25519_public=self.x_public.hex(),
            attestation_kind="tdx" if self.tdx_sample else "dev",
            provider=self.provider,
        )
        return web.json_response(body.model_dump())

    async def status(self, _request: web.Request) -> web.Response:
        body = NodeStatus(
            models=[
                ModelOffer(id=m, price_prompt=p, price_completion=c)
                for m, (p, c) in self.models.items()
            ],
            hardware="fake",
            max_concurrent=self.max_concurrent,
            active_jobs=self.active_jobs,
            healthy=self.healthy,
            engine="fake-echo",
        )
        return web.json_response(body.model_dump())

    async def attest(self, request: web.Request) -> web.Response:
        nonce = bytes.fromhex((await request.json())["nonce"])
        if self.attest_mode == "wrong_nonce":
            nonce = os.urandom(32)
        key = Ed25519PrivateKey.generate() if self.attest_mode == "wrong_key" else self.key
        data = report_data(self.ed_public, self.x_public, nonce)
        if self.tdx_sample is not None:  # a real quote, bound to someone else's keys
            quote, collateral = self.tdx_sample
            doc = AttestationDoc(
                kind="tdx",
                ed25519_public=self.ed_public.hex(),
                x25519_public=self.x_public.hex(),
                nonce=nonce.hex(),
                evidence=base64.b64encode(quote).decode(),
                collateral=collateral,
                issued_at=int(time.time()),
            )
            return web.json_response(doc.model_dump())
        doc = AttestationDoc(
            kind="dev",
            ed25519_public=self.ed_public.hex(),
            x25519_public=self.x_public.hex(),
            nonce=nonce.hex(),
            evidence=base64.b64encode(make_dev_evidence(key, data)).decode(),
            issued_at=int(time.time()),
        )
        return web.json_response(doc.model_dump())

    async def job(self, request: web.Request) -> web.StreamResponse:
        job_id = request.headers["X-Imago-Job"]
        self.jobs_seen.append(job_id)
        self.tickets[job_id] = request.headers.get(TICKET_HEADER)
        sealed = await request.read()
        if self.mode == "error500":
            return web.json_response(
                {"error": {"message": "boom", "type": "server_error"}}, status=500
            )
        if self.mode == "busy":
            return web.json_response(
                {"error": {"message": "node is at capacity", "type": "server_error",
                           "code": "node_busy"}},
                status=429,
            )  # fmt: skip
        if self.mode == "die":
            request.transport.close()
            return web.Response()
        if self.mode == "refuse":
            return web.json_response(
                {"error": {"message": "job id already seen", "type": "invalid_request_error"}},
                status=409,
            )
        if self.mode == "slow":
            await asyncio.sleep(30)
        plain = envelope.open_request(self.x_key, bytes.fromhex(job_id), sealed)
        req = SealedRequest.model_validate_json(plain)
        prompt = req.body["messages"][-1]["content"]
        sealer = ResponseSealer(bytes.fromhex(req.response_key), bytes.fromhex(job_id))
        out = web.StreamResponse(headers={"Content-Type": "application/x-imago-frames"})
        await out.prepare(request)
        if self.mode == "slow_after_headers":  # accepted at once, then a long generation
            await asyncio.sleep(1.5)
        sent = self.sent.setdefault(job_id, bytearray())

        async def write(frame: bytes) -> None:
            sent.extend(frame)
            await out.write(frame)

        prompt_tokens = len(prompt.split())
        pieces = [f"echo {i}: {prompt}" for i in range(self.chunks)]
        try:
            for i, piece in enumerate(pieces):
                chunk = {
                    "object": "chat.completion.chunk",
                    "choices": [{"delta": {"content": piece}}],
                }
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": i + 1}
                payload = json.dumps({"chunk": chunk, "usage": usage}).encode()
                await write(sealer.seal(FrameType.DATA, payload))
                if self.mode == "midstream":
                    await asyncio.sleep(0.05)
                    request.transport.close()
                    return out
                if self.mode == "hang":
                    await self.released.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        model = req.body["model"]
        price_prompt, price_completion = self.models[model]
        completion_tokens = len(pieces)
        receipt = Receipt(
            global_id=MAINNET_GLOBAL_ID if self.mode == "wrong_network" else DEVNET_GLOBAL_ID,
            escrow=Address(req.escrow),
            job_id=int(job_id, 16),
            time=int(time.time()),
            model=model_hash(model),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            price_prompt=price_prompt,
            price_completion=price_completion,
            amount=cost_nanoton(prompt_tokens, completion_tokens, price_prompt, price_completion),
            request_hash=hashlib.sha256(sealed).digest() if self.mode != "bad_hash" else bytes(32),
            response_hash=sealer.transcript_hash,
        )
        signer = Ed25519PrivateKey.generate() if self.mode == "forge" else self.key
        end = EndFrame(
            receipt=base64.b64encode(receipt.to_boc()).decode(),
            signature=receipt.sign(signer).hex(),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        await write(envelope.encode_frame(FrameType.END, end.model_dump_json().encode()))
        await out.write_eof()
        return out


@dataclass
class RelayResult:
    status: int
    raw: bytes
    frames: list[tuple[FrameType, bytes]]
    texts: list[str]
    end: EndFrame | None
    relay_error: dict | None
    job_id: str


class FakeClient:
    """Seals requests with the real envelope and opens the relayed frames."""

    def __init__(self, session: aiohttp.ClientSession, matcher_url: str) -> None:
        self.session = session
        self.url = matcher_url
        self.spend_key = Ed25519PrivateKey.generate()
        self.cumulative = 0

    def seal(self, nodes: list[FakeNode], prompt: str, job_id: bytes, model: str = MODEL):
        response_key = envelope.new_response_key()
        plaintext = (
            SealedRequest(
                endpoint="chat/completions",
                body={
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "stream": True,
                },
                response_key=response_key.hex(),
                escrow=ESCROW.to_str(),
                max_price_prompt=10_000,
                max_price_completion=10_000,
            )
            .model_dump_json()
            .encode()
        )
        sealed = {
            n.node_id: base64.b64encode(
                envelope.seal_request(n.x_public, job_id, plaintext)
            ).decode()
            for n in nodes
        }
        return response_key, sealed

    async def relay(
        self,
        nodes: list[FakeNode],
        prompt: str = f"say {MARKER} please",
        *,
        job_id: bytes | None = None,
        model: str = MODEL,
        signer: Ed25519PrivateKey | None | Literal["unsigned"] = None,
    ) -> RelayResult:
        """``signer``: the spend key that authorizes the relay (default this client's)."""
        job_id = job_id or envelope.new_job_id()
        response_key, sealed = self.seal(nodes, prompt, job_id, model)
        hashes = {n: envelope.request_hash(base64.b64decode(b)) for n, b in sealed.items()}
        message = relay_message(job_id, ESCROW.to_str(is_user_friendly=False), model, hashes)
        signature = None if signer == "unsigned" else (signer or self.spend_key).sign(message)
        body = RelayRequest(
            job_id=job_id.hex(),
            model=model,
            escrow=ESCROW.to_str(),
            sealed=sealed,
            signature=signature.hex() if signature else None,
        )
        async with self.session.post(f"{self.url}/v1/relay", data=body.model_dump_json()) as resp:
            raw = await resp.read()
            status = resp.status
        return self.open(status, raw, response_key, job_id)

    @staticmethod
    def open(status: int, raw: bytes, response_key: bytes, job_id: bytes) -> RelayResult:
        frames, texts, end, relay_error = [], [], None, None
        if status == 200:
            frames = list(FrameDecoder().feed(raw))
            opener = ResponseOpener(response_key, job_id)
            for frame_type, payload in frames:
                if frame_type == FrameType.DATA:
                    chunk = json.loads(opener.open(frame_type, payload))["chunk"]
                    texts.append(chunk["choices"][0]["delta"]["content"])
                elif frame_type == FrameType.END:
                    end = EndFrame.model_validate_json(payload)
                elif frame_type == FrameType.RELAY_ERROR:
                    relay_error = json.loads(payload)
        return RelayResult(status, raw, frames, texts, end, relay_error, job_id.hex())

    def voucher(
        self,
        amount: int,
        *,
        cumulative: int | None = None,
        key=None,
        escrow=ESCROW,
        global_id: int = DEVNET_GLOBAL_ID,
    ):
        cumulative = self.cumulative + amount if cumulative is None else cumulative
        voucher = SpendVoucher(
            global_id=global_id, escrow=escrow, vault=VAULT, cumulative=cumulative
        )
        signature = voucher.sign(key or self.spend_key)
        return voucher, signature, cumulative

    async def post_voucher(
        self, amount: int, jobs: list[str | tuple[str, int]], **kwargs
    ) -> aiohttp.ClientResponse:
        """``jobs``: (job id, amount) pairs, or ids alone when ``amount`` is one job's."""
        boc = kwargs.pop("boc", None)  # to send other bytes than the voucher signed
        voucher, signature, cumulative = self.voucher(amount, **kwargs)
        body = {
            "voucher": base64.b64encode(boc or voucher.to_boc()).decode(),
            "signature": signature.hex(),
            "spend_public": (kwargs.get("key") or self.spend_key)
            .public_key()
            .public_bytes_raw()
            .hex(),
            "jobs": [
                {"job_id": j, "amount": amount}
                if isinstance(j, str)
                else {"job_id": j[0], "amount": j[1]}
                for j in jobs
            ],
        }
        async with self.session.post(f"{self.url}/v1/vouchers", json=body) as resp:
            await resp.read()
            if resp.status == 200:
                self.cumulative = cumulative
            return resp
