"""Sealed jobs: open the HPKE request, run it on the engine, stream sealed frames,
end with a signed receipt.

Refusals before anything is served are clear HTTP errors (OpenAI-style JSON), so the
matcher can fail over: a malformed job id, busy (429), replay (409), a request that
does not open (400), a model the node does not offer (404), prices above the client's
caps (402), an engine that is not ready (503). Once the job is accepted the answer is
200 and a frame stream: DATA frames, the engine's errors as sealed ERROR frames, and
always a last END frame with the receipt (null when nothing was served).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError
from pytoniq_core import Address

from contracts.protocol import envelope
from contracts.protocol.api import ModelOffer, SealedRequest, error_json
from contracts.protocol.envelope import EnvelopeError, FrameType, ResponseSealer
from contracts.protocol.signed import Receipt, cost_nanoton, model_hash
from node.engine import EngineBackend, EngineError, UsageUnavailable, engine_error
from node.keys import NodeKeys

__all__ = [
    "FRAMES_CONTENT_TYPE",
    "JOB_HEADER",
    "JobService",
    "OfferBook",
    "SeenJobs",
    "error_response",
]

log = logging.getLogger("imago.node.jobs")

JOB_HEADER = "X-Imago-Job"
FRAMES_CONTENT_TYPE = "application/x-imago-frames"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def error_response(status: int, message: str, type_: str, code: str | None = None) -> web.Response:
    body = _dumps(error_json(message, type_, code)).encode()
    return web.Response(status=status, body=body, content_type="application/json")


class SeenJobs:
    """Every job id this node key has accepted, persisted append-only.

    A second receipt for one job id signed by one key is slashable equivocation, so
    the set survives restarts: 32 bytes a job, appended before the job runs.
    """

    def __init__(self, path: Path | None) -> None:
        self._ids: set[bytes] = set()
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                raw = path.read_bytes()
                usable = len(raw) - len(raw) % envelope.JOB_ID_BYTES
                self._ids = {raw[i : i + 32] for i in range(0, usable, 32)}
                if usable != len(raw):  # a torn last write: drop it
                    with open(path, "r+b") as f:
                        f.truncate(usable)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def __contains__(self, job_id: bytes) -> bool:
        return job_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, job_id: bytes) -> None:
        self._ids.add(job_id)
        if self._fd is not None:
            os.write(self._fd, job_id)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class PricedModel:
    offer: ModelOffer
    hash: int


class OfferBook:
    """The models this node offers, with its prices (nanoTON per million tokens)."""

    def __init__(self, price_prompt: int, price_completion: int) -> None:
        self.price_prompt = price_prompt
        self.price_completion = price_completion
        self._models: dict[str, PricedModel] = {}

    def set_models(self, models: Iterable[tuple[str, int | None]]) -> None:
        self._models = {
            model_id: PricedModel(
                ModelOffer(
                    id=model_id,
                    price_prompt=self.price_prompt,
                    price_completion=self.price_completion,
                    max_model_len=max_len,
                ),
                model_hash(model_id),
            )
            for model_id, max_len in models
        }

    def get(self, model_id: object) -> PricedModel | None:
        return self._models.get(model_id) if isinstance(model_id, str) else None

    @property
    def offers(self) -> list[ModelOffer]:
        return [m.offer for m in self._models.values()]


@dataclass
class _Tally:
    """Token counts of one job, from the engine's usage or counted by the node."""

    prompt: int = 0
    completion: int = 0
    engine_usage: bool = False  # the last chunk seen carried usage
    chunks_with_text: int = 0

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion}


def _texts_of(obj: dict, texts: dict[int, list[str]]) -> bool:
    """Collect generated text per choice from a chunk or response; True if any."""
    found = False
    for choice in obj.get("choices") or ():
        index = choice.get("index", 0)
        part = choice.get("text")
        if part is None:
            message = choice.get("delta") or choice.get("message") or {}
            part = message.get("content")
            reasoning = message.get("reasoning_content")
            if reasoning:
                texts.setdefault(index, []).append(reasoning)
                found = True
        if part:
            texts.setdefault(index, []).append(part)
            found = True
    return found


def _usage_of(obj: dict) -> tuple[int, int] | None:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    try:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return None
    return prompt, completion


class JobService:
    """Runs sealed jobs against one engine backend."""

    def __init__(
        self,
        keys: NodeKeys,
        backend: EngineBackend,
        offers: OfferBook,
        seen: SeenJobs,
        *,
        max_concurrent: int,
        engine_ready: asyncio.Event,
    ) -> None:
        self._keys = keys
        self._backend = backend
        self._offers = offers
        self._seen = seen
        self.max_concurrent = max_concurrent
        self._engine_ready = engine_ready
        self.active = 0
        self.served = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        job_hex = request.headers.get(JOB_HEADER, "")
        try:
            job_id = bytes.fromhex(job_hex)
        except ValueError:
            job_id = b""
        if len(job_id) != envelope.JOB_ID_BYTES:
            return error_response(
                400,
                f"header {JOB_HEADER} must be 64 hex characters",
                "invalid_request_error",
                "invalid_job_id",
            )
        if self.active >= self.max_concurrent:
            return error_response(
                429,
                f"node busy: {self.active} of {self.max_concurrent} jobs running",
                "rate_limit_error",
                "node_busy",
            )
        self.active += 1  # a slot from here on, so that bursts cannot overshoot the limit
        try:
            return await self._accept(request, job_id)
        finally:
            self.active -= 1

    async def _accept(self, request: web.Request, job_id: bytes) -> web.StreamResponse:
        if job_id in self._seen:
            return error_response(
                409, "job id already used (replay)", "invalid_request_error", "job_replayed"
            )
        if not self._engine_ready.is_set():
            return error_response(
                503, "the engine is not ready", "service_unavailable", "engine_not_ready"
            )
        sealed = await request.read()
        try:
            plaintext = envelope.open_request(self._keys.x25519, job_id, sealed)
        except EnvelopeError as e:
            return error_response(
                400,
                f"{e}: tampered, or sealed for another node or job id",
                "invalid_request_error",
                "sealed_request_invalid",
            )
        try:
            job = SealedRequest.model_validate_json(plaintext)
            response_key = bytes.fromhex(job.response_key)
            escrow = Address(job.escrow)
            if len(response_key) != envelope.RESPONSE_KEY_BYTES:
                raise ValueError("response_key is 32 bytes")
        except (ValidationError, ValueError, TypeError) as e:
            return error_response(
                400,
                f"malformed sealed request: {_short(e)}",
                "invalid_request_error",
                "sealed_request_malformed",
            )
        except Exception as e:  # pytoniq raises bare errors on bad addresses
            return error_response(
                400,
                f"malformed escrow address: {_short(e)}",
                "invalid_request_error",
                "sealed_request_malformed",
            )
        model = self._offers.get(job.body.get("model"))
        if model is None:
            return error_response(
                404,
                f"The model `{str(job.body.get('model'))[:200]}` is not served by this node.",
                "NotFoundError",
                "model_not_found",
            )
        if (
            job.max_price_prompt < model.offer.price_prompt
            or job.max_price_completion < model.offer.price_completion
        ):
            return error_response(
                402,
                f"price cap too low: this node charges {model.offer.price_prompt}/"
                f"{model.offer.price_completion} nanoTON per million prompt/completion tokens",
                "invalid_request_error",
                "price_cap_too_low",
            )
        if job_id in self._seen:  # raced with a concurrent copy while reading the body
            return error_response(
                409, "job id already used (replay)", "invalid_request_error", "job_replayed"
            )
        self._seen.add(job_id)
        sealer = ResponseSealer(response_key, job_id)
        run = _Job(self, job, job_id, escrow, model, sealer, envelope.request_hash(sealed))
        if job.body.get("stream"):
            return await run.stream(request)
        return await run.complete()


class _Job:
    def __init__(
        self,
        service: JobService,
        job: SealedRequest,
        job_id: bytes,
        escrow: Address,
        model: PricedModel,
        sealer: ResponseSealer,
        request_hash: bytes,
    ) -> None:
        self.service = service
        self.backend = service._backend
        self.job = job
        self.job_id = job_id
        self.escrow = escrow
        self.model = model
        self.sealer = sealer
        self.request_hash = request_hash
        self.tally = _Tally()

    # -- frames -------------------------------------------------------------------
    def _data(self, chunk: dict) -> bytes:
        payload = _dumps({"chunk": chunk, "usage": self.tally.as_dict()}).encode()
        return self.sealer.seal(FrameType.DATA, payload)

    def _error(self, status: int, body: dict) -> bytes:
        return self.sealer.seal(FrameType.ERROR, _dumps({**body, "status": status}).encode())

    def _end(self, served: bool) -> bytes:
        tally = self.tally
        if not served or tally.prompt + tally.completion == 0:
            end = {
                "receipt": None,
                "signature": None,
                "prompt_tokens": tally.prompt if served else 0,
                "completion_tokens": tally.completion if served else 0,
            }
            return envelope.encode_frame(FrameType.END, _dumps(end).encode())
        offer = self.model.offer
        receipt = Receipt(
            escrow=self.escrow,
            job_id=int.from_bytes(self.job_id, "big"),
            time=int(time.time()),
            model=self.model.hash,
            prompt_tokens=tally.prompt,
            completion_tokens=tally.completion,
            price_prompt=offer.price_prompt,
            price_completion=offer.price_completion,
            amount=cost_nanoton(
                tally.prompt, tally.completion, offer.price_prompt, offer.price_completion
            ),
            request_hash=self.request_hash,
            response_hash=self.sealer.transcript_hash,
        )
        boc, receipt_hash = receipt.encode()
        signature = self.service._keys.ed25519.sign(receipt_hash)
        end = {
            "receipt": base64.b64encode(boc).decode(),
            "signature": signature.hex(),
            "prompt_tokens": tally.prompt,
            "completion_tokens": tally.completion,
        }
        self.service.served += 1
        return envelope.encode_frame(FrameType.END, _dumps(end).encode())

    def _unbillable(self, reason: str) -> bytes:
        log.error(
            "job %s: engine gave no usage and it cannot be counted: %s",
            self.job_id.hex()[:16],
            reason,
        )
        return self._error(
            502,
            engine_error(
                502,
                f"the engine reported no token usage and the node cannot count it ({reason}); "
                "the job is not billed",
                "EngineError",
                "usage_unavailable",
            ),
        )

    # -- non-streaming ------------------------------------------------------------
    async def complete(self) -> web.Response:
        body = dict(self.job.body)
        body.pop("stream_options", None)
        frames: list[bytes] = []
        served = False
        try:
            response = await self.backend.complete(self.job.endpoint, body)
            usage = _usage_of(response)
            if usage is not None and sum(usage) > 0:
                self.tally.prompt, self.tally.completion = usage
            else:
                texts: dict[int, list[str]] = {}
                _texts_of(response, texts)
                self.tally.prompt = await self.backend.count_prompt(self.job.endpoint, body)
                self.tally.completion = await self.backend.count_text(
                    body["model"], ["".join(t) for t in texts.values()]
                )
            frames.append(self._data(response))
            served = True
        except EngineError as e:
            frames.append(self._error(e.status, e.body))
        except UsageUnavailable as e:
            frames.append(self._unbillable(str(e)))
        frames.append(self._end(served))
        return web.Response(body=b"".join(frames), content_type=FRAMES_CONTENT_TYPE)

    # -- streaming ----------------------------------------------------------------
    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": FRAMES_CONTENT_TYPE})
        await response.prepare(request)
        body = self.job.body
        tally = self.tally
        texts: dict[int, list[str]] = {}
        prompt_task: asyncio.Task[int] | None = None
        served = False
        tail: list[bytes] = []
        try:
            async with self.backend.stream(self.job.endpoint, body) as chunks:
                async for chunk in chunks:
                    usage = _usage_of(chunk)
                    if usage is not None:
                        tally.prompt, tally.completion = usage
                        tally.engine_usage = True
                    else:
                        tally.engine_usage = False
                        if _texts_of(chunk, texts):
                            tally.chunks_with_text += 1
                            # A running count the client may pay on a broken stream:
                            # chunks carry one token or more, so this never overcounts.
                            tally.completion = max(tally.completion, tally.chunks_with_text)
                            if prompt_task is None:
                                prompt_task = asyncio.ensure_future(
                                    self.backend.count_prompt(self.job.endpoint, body)
                                )
                        if (
                            prompt_task is not None
                            and prompt_task.done()
                            and not prompt_task.exception()
                        ):
                            tally.prompt = prompt_task.result()
                    await response.write(self._data(chunk))
                    served = True
        except EngineError as e:
            tail.append(self._error(e.status, e.body))
        except (ConnectionResetError, asyncio.CancelledError) as e:
            # The client (or the matcher) went away: leaving the `async with` closed the
            # engine request, which aborts it there. Nothing left to send.
            if prompt_task is not None:
                prompt_task.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            return response
        if served and (not tally.engine_usage or tally.prompt + tally.completion == 0):
            try:
                tally.prompt = await (
                    prompt_task or self.backend.count_prompt(self.job.endpoint, body)
                )
                tally.completion = await self.backend.count_text(
                    body["model"], ["".join(t) for t in texts.values()]
                )
            except UsageUnavailable as e:
                tail.append(self._unbillable(str(e)))
                served = False
        elif prompt_task is not None:
            prompt_task.cancel()
            with contextlib.suppress(BaseException):
                await prompt_task
        tail.append(self._end(served))
        with contextlib.suppress(ConnectionResetError):  # gone before the end: nothing to do
            await response.write(b"".join(tail))
            await response.write_eof()
        return response


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]
