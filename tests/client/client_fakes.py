"""Fakes for the client tests, named as such: a FakeNode that serves a scripted model
through the real shared envelope and receipt code, and a FakeMatcher (aiohttp) that
routes to fake nodes and relays their frames, with knobs to inject faults."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pytoniq_core import Address

from protocol.api import (
    AttestationDoc,
    ModelOffer,
    RelayRequest,
    RouteRequest,
    SealedRequest,
    VoucherSubmission,
)
from protocol.attestation import make_dev_evidence, report_data
from protocol.envelope import (
    FrameDecoder,
    FrameType,
    ResponseSealer,
    encode_frame,
    open_request,
    request_hash,
)
from protocol.signed import (
    DEVNET_GLOBAL_ID,
    MAINNET_GLOBAL_ID,
    Receipt,
    SpendVoucher,
    cost_nanoton,
    model_hash,
)

FAKE_MODEL = "fake-model"


class FakeNode:
    """A node that answers "Fake answer: <words>" one word per chunk.

    ``fault`` makes it misbehave: forge_signature, unattested_key, wrong_job_id,
    wrong_amount, wrong_network (a receipt for mainnet), wrong_request_hash,
    wrong_response_hash, truncate (the last DATA
    frame sealed into the receipt's transcript but never sent), price_above_offer,
    engine_error (a 400 from the engine, nothing served), no_usage_chunk.
    """

    def __init__(
        self,
        *,
        price_prompt: int = 2_000_000,
        price_completion: int = 6_000_000,
        model: str = FAKE_MODEL,
        answer: str = "Paris is the capital of France .",
    ) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.x_key = X25519PrivateKey.generate()
        self.ed25519_public = self.key.public_key().public_bytes_raw()
        self.x25519_public = self.x_key.public_key().public_bytes_raw()
        self.node_id = self.ed25519_public.hex()
        self.offer = ModelOffer(
            id=model, price_prompt=price_prompt, price_completion=price_completion
        )
        self.answer = answer
        self.fault: str | None = None
        self.delay = 0.0  # seconds before each streamed chunk
        self.frames_sent = 0
        self.finished_jobs = 0
        self.seen_jobs: set[bytes] = set()
        self.plaintexts: list[SealedRequest] = []
        nonce = b"\x07" * 32
        evidence = make_dev_evidence(
            self.key, report_data(self.ed25519_public, self.x25519_public, nonce)
        )
        self.attestation = AttestationDoc(
            kind="dev",
            ed25519_public=self.ed25519_public.hex(),
            x25519_public=self.x25519_public.hex(),
            nonce=nonce.hex(),
            evidence=base64.b64encode(evidence).decode(),
            issued_at=int(time.time()),
        )

    async def run_job(self, job_id: bytes, sealed: bytes) -> AsyncIterator[bytes]:
        """Yield encoded frames for one job, as the real node would write them."""
        if job_id in self.seen_jobs:
            raise web.HTTPConflict(reason="job id replayed")
        self.seen_jobs.add(job_id)
        request = SealedRequest.model_validate_json(open_request(self.x_key, job_id, sealed))
        self.plaintexts.append(request)
        sealer = ResponseSealer(bytes.fromhex(request.response_key), job_id)
        body = request.body
        if self.fault == "engine_error":
            error = {
                "error": {
                    "message": "max_tokens is too large",
                    "type": "BadRequestError",
                    "param": "max_tokens",
                    "code": 400,
                },
                "status": 400,
            }
            yield sealer.seal(FrameType.ERROR, json.dumps(error).encode())
            yield _end(None, None, 0, 0)
            return
        prompt_tokens = _count_prompt(request)
        words = self.answer.split(" ")
        max_tokens = body.get("max_tokens") or len(words)
        words = words[:max_tokens]
        created = int(time.time())
        chat = request.endpoint == "chat/completions"
        ident = ("chatcmpl-" if chat else "cmpl-") + job_id.hex()[:16]
        if body.get("stream"):
            for i, word in enumerate(words):
                if self.delay:
                    await asyncio.sleep(self.delay)
                text = word if i == 0 else " " + word
                if chat:
                    choice: dict[str, Any] = {
                        "index": 0,
                        "delta": {"content": text} if i else {"role": "assistant", "content": text},
                        "finish_reason": "stop" if i == len(words) - 1 else None,
                    }
                else:
                    choice = {
                        "index": 0,
                        "text": text,
                        "finish_reason": "stop" if i == len(words) - 1 else None,
                    }
                chunk = {
                    "id": ident,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": self.offer.id,
                    "choices": [choice],
                }
                if self.fault == "continuous_usage":  # as vLLM's continuous_usage_stats
                    chunk["usage"] = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": i + 1,
                        "total_tokens": prompt_tokens + i + 1,
                    }
                frame = sealer.seal(
                    FrameType.DATA,
                    json.dumps(
                        {
                            "chunk": chunk,
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": i + 1},
                        }
                    ).encode(),
                )
                self.frames_sent += 1
                yield frame
            if self.fault != "no_usage_chunk":
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(words),
                    "total_tokens": prompt_tokens + len(words),
                }
                usage_chunk = {
                    "id": ident,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": self.offer.id,
                    "choices": [],
                    "usage": usage,
                }
                frame = sealer.seal(
                    FrameType.DATA,
                    json.dumps(
                        {
                            "chunk": usage_chunk,
                            "usage": {
                                "prompt_tokens": prompt_tokens,
                                "completion_tokens": len(words),
                            },
                        }
                    ).encode(),
                )
                if self.fault != "truncate":  # sealed (in the transcript) but never sent
                    yield frame
        else:
            text = " ".join(words)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            else:
                choice = {"index": 0, "text": text, "finish_reason": "stop"}
            response = {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": self.offer.id,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(words),
                    "total_tokens": prompt_tokens + len(words),
                },
            }
            yield sealer.seal(
                FrameType.DATA,
                json.dumps(
                    {
                        "chunk": response,
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words)},
                    }
                ).encode(),
            )
            if self.fault == "truncate":  # a second frame in the transcript, never sent
                sealer.seal(FrameType.DATA, b"{}")
        yield self._receipt_frame(request, job_id, sealed, sealer, prompt_tokens, len(words))
        self.finished_jobs += 1

    def _receipt_frame(
        self,
        request: SealedRequest,
        job_id: bytes,
        sealed: bytes,
        sealer: ResponseSealer,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> bytes:
        fault = self.fault
        price_prompt = self.offer.price_prompt * (10 if fault == "price_above_offer" else 1)
        price_completion = self.offer.price_completion
        amount = cost_nanoton(prompt_tokens, completion_tokens, price_prompt, price_completion)
        receipt = Receipt(
            global_id=MAINNET_GLOBAL_ID if fault == "wrong_network" else DEVNET_GLOBAL_ID,
            escrow=Address(request.escrow),
            job_id=int.from_bytes(job_id, "big") ^ (1 if fault == "wrong_job_id" else 0),
            time=int(time.time()),
            model=model_hash(self.offer.id),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            price_prompt=price_prompt,
            price_completion=price_completion,
            amount=amount + (1000 if fault == "wrong_amount" else 0),
            request_hash=(b"\x00" * 32 if fault == "wrong_request_hash" else request_hash(sealed)),
            response_hash=(
                b"\x11" * 32 if fault == "wrong_response_hash" else sealer.transcript_hash
            ),
        )
        signer = Ed25519PrivateKey.generate() if fault == "unattested_key" else self.key
        signature = receipt.sign(signer)
        if fault == "forge_signature":
            signature = bytes([signature[0] ^ 1]) + signature[1:]
        boc = receipt.to_boc()
        if fault == "garbage_receipt":
            boc = boc[:-7]
        return _end(boc, signature, prompt_tokens, completion_tokens)


def _end(boc: bytes | None, signature: bytes | None, prompt: int, completion: int) -> bytes:
    payload = {
        "receipt": base64.b64encode(boc).decode() if boc else None,
        "signature": signature.hex() if signature else None,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
    }
    return encode_frame(FrameType.END, json.dumps(payload).encode())


def _count_prompt(request: SealedRequest) -> int:
    body = request.body
    if request.endpoint == "chat/completions":
        text = " ".join(str(m.get("content") or "") for m in body["messages"])
    else:
        prompt = body["prompt"]
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return max(1, len(text.split()))


@dataclass
class FakeMatcher:
    """Routes to fake nodes by price and relays their frames, re-framing each one so
    that a test can tamper with a frame or cut the stream with RELAY_ERROR."""

    nodes: list[FakeNode]
    ttl_seconds: float = 30.0
    relay_error_after: int | None = None  # frames relayed before a RELAY_ERROR
    all_busy: bool = False  # every node at capacity: the matcher's 429 RELAY_ERROR
    tamper_frame: int | None = None  # index of a frame whose ciphertext is flipped
    dead_nodes: set[str] = field(default_factory=set)  # fail before their first byte
    reject_vouchers: bool = False
    replay_receipts: bool = False  # answer with the END frame of the previous job
    last_end: bytes | None = None
    route_calls: int = 0
    relay_calls: int = 0
    vouchers: list[VoucherSubmission] = field(default_factory=list)
    latest: dict[str, int] = field(default_factory=dict)  # escrow → cumulative
    relayed: bytearray = field(default_factory=bytearray)

    def node(self, node_id: str) -> FakeNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/route", self.route)
        app.router.add_post("/v1/relay", self.relay)
        app.router.add_post("/v1/vouchers", self.voucher)
        app.router.add_get("/v1/models", self.models)
        return app

    async def route(self, request: web.Request) -> web.Response:
        self.route_calls += 1
        req = RouteRequest.model_validate(await request.json())
        serving = [n for n in self.nodes if n.offer.id == req.model]
        if not serving:
            return _error(404, f"The model `{req.model}` does not exist.", "model_not_found")
        affordable = [
            n
            for n in serving
            if n.offer.price_prompt <= req.max_price_prompt
            and n.offer.price_completion <= req.max_price_completion
        ]
        if not affordable:
            return _error(402, "every node is above your price cap", "price_cap_too_low")
        affordable.sort(key=lambda n: (n.offer.price_completion, n.offer.price_prompt))
        return web.json_response(
            {
                "candidates": [
                    {
                        "node_id": n.node_id,
                        "attestation": n.attestation.model_dump(),
                        "offer": n.offer.model_dump(),
                    }
                    for n in affordable
                ],
                "ttl_seconds": self.ttl_seconds,
            }
        )

    async def relay(self, request: web.Request) -> web.StreamResponse:
        self.relay_calls += 1
        req = RelayRequest.model_validate(await request.json())
        job_id = bytes.fromhex(req.job_id)
        response = web.StreamResponse(headers={"Content-Type": "application/x-imago-frames"})
        await response.prepare(request)
        relayed = 0
        if self.all_busy:
            await response.write(_relay_error(429, "every node is at capacity", "nodes_busy"))
            return response
        for node_id, sealed_b64 in req.sealed.items():
            if node_id in self.dead_nodes:
                continue  # failover before the first byte
            node = self.node(node_id)
            decoder = FrameDecoder()
            async for encoded in node.run_job(job_id, base64.b64decode(sealed_b64)):
                for frame_type, payload in decoder.feed(encoded):
                    if self.relay_error_after is not None and relayed >= self.relay_error_after:
                        await response.write(_relay_error(502, "node failed mid-stream"))
                        return response
                    if self.tamper_frame == relayed:
                        payload = bytes([payload[0] ^ 0x01]) + payload[1:]
                    if frame_type is FrameType.END:
                        previous, self.last_end = self.last_end, payload
                        if self.replay_receipts and previous is not None:
                            payload = previous
                    frame = encode_frame(frame_type, payload)
                    self.relayed += frame
                    await response.write(frame)
                    relayed += 1
            return response
        await response.write(_relay_error(503, "no node could take the job"))
        return response

    async def voucher(self, request: web.Request) -> web.Response:
        if self.reject_vouchers:
            return _error(503, "voucher store unavailable", "unavailable")
        submission = VoucherSubmission.model_validate(await request.json())
        voucher = SpendVoucher.from_boc(base64.b64decode(submission.voucher))
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(submission.spend_public)).verify(
            bytes.fromhex(submission.signature), voucher.hash
        )
        escrow = voucher.escrow.to_str(is_user_friendly=False)
        if voucher.cumulative < self.latest.get(escrow, 0):
            return _error(409, "cumulative went down", "voucher_regressed")
        self.latest[escrow] = voucher.cumulative
        self.vouchers.append(submission)
        return web.json_response({"cumulative": voucher.cumulative})

    async def models(self, request: web.Request) -> web.Response:
        ids = sorted({n.offer.id for n in self.nodes})
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "imago",
                        "imago_price_prompt": min(
                            n.offer.price_prompt for n in self.nodes if n.offer.id == model
                        ),
                        "imago_price_completion": min(
                            n.offer.price_completion for n in self.nodes if n.offer.id == model
                        ),
                        "imago_nodes": sum(1 for n in self.nodes if n.offer.id == model),
                    }
                    for model in ids
                ],
            }
        )


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        },
        status=status,
    )


def _relay_error(status: int, message: str, code: str = "node_failed") -> bytes:
    payload = {"status": status, "message": message, "type": "relay_error", "code": code}
    return encode_frame(FrameType.RELAY_ERROR, json.dumps(payload).encode())
