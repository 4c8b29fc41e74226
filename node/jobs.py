"""Sealed jobs: open the HPKE request, run it on the engine, stream sealed frames,
end with a signed receipt.

Refusals before anything is served are clear HTTP errors (OpenAI-style JSON), so the
matcher can fail over: a malformed, expired or future job id (400), busy (429), no
matcher key known yet (503), a missing or invalid matcher ticket (403), replay (409),
a request that does not open (400), a model the node does not offer (404), prices
above the client's caps (402), an engine that is not ready (503). Once the job is
accepted the answer is 200 and a frame stream, whose headers leave at once (before the
engine answers, streaming or not): DATA frames, the engine's errors as sealed ERROR
frames, and always a last END frame with the receipt (null when nothing was served).
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
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError
from pytoniq_core import Address

from contracts.protocol import envelope
from contracts.protocol.api import ModelOffer, SealedRequest, error_json
from contracts.protocol.envelope import (
    FRAMES_CONTENT_TYPE,
    JOB_HEADER,
    EnvelopeError,
    FrameType,
    ResponseSealer,
)
from contracts.protocol.signed import Receipt, cost_nanoton, model_hash
from contracts.protocol.tickets import TICKET_HEADER
from node.engine import EngineBackend, EngineError, UsageUnavailable, engine_error
from node.keys import NodeKeys
from node.tickets import MatcherKeys

__all__ = [
    "JobService",
    "OfferBook",
    "SeenJobs",
    "error_response",
]

log = logging.getLogger("imago.node.jobs")

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_RECORD = envelope.JOB_ID_BYTES
_BUCKET_S = 60  # ids are forgotten a bucket at a time: up to this long after they expire
# An accepted id never starts with 0xffffffff (the year 2106 is refused as the future),
# so the header cannot be mistaken for an id, nor an id for it.
_HEADER_TAG = b"\xff" * 4 + b"imago/jobs.seen/v2".ljust(24, b"\x00")


def error_response(status: int, message: str, type_: str, code: str | None = None) -> web.Response:
    body = _dumps(error_json(message, type_, code)).encode()
    return web.Response(status=status, body=body, content_type="application/json")


class SeenJobs:
    """The job ids this node key accepted, for as long as they could come back.

    A second receipt for one job id signed by one key is slashable equivocation, so
    the set is persisted (an id is appended before its job runs) and survives
    restarts. A job id carries its creation time and is refused once older than
    ``JOB_ID_MAX_AGE_S``, so an id is forgotten after that, and memory and file hold
    about one window of jobs. Ids live in buckets by their time, so that forgetting
    drops whole buckets and a lookup needs no global set.

    ``floor`` is the time below which ids may have been forgotten: the node refuses
    them even if its clock steps back. The file is a header record (a tag and
    ``floor``) and 32-byte ids; it is rewritten (atomically, 0600, fsynced) at start
    and when forgotten ids make up half of it.

    ``add`` appends at once; ``sync`` waits until the ids added so far are on disk
    (one fdatasync for everyone waiting, off the event loop). A job's receipt leaves
    only after that, so not even a power cut can make the node forget an id it signed
    a receipt for.
    """

    def __init__(self, path: Path, now: float | None = None) -> None:
        self._path = path
        self._buckets: dict[int, set[bytes]] = {}
        self._live = 0
        self._records = 0  # ids in the file, forgotten ones included
        self._fd: int | None = None
        self._appended = 0  # ids appended since start; never reset
        self._synced = 0  # how many of those are known to be on disk
        self._syncing: asyncio.Future[None] | None = None
        self._next_prune = 0.0
        self.floor = 0
        now = time.time() if now is None else now
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raw = path.read_bytes()
            usable = len(raw) - len(raw) % _RECORD  # a torn last write is dropped
            start = 0
            if raw[: len(_HEADER_TAG)] == _HEADER_TAG and usable >= _RECORD:
                self.floor = int.from_bytes(raw[len(_HEADER_TAG) : _RECORD], "big")
                start = _RECORD
            for i in range(start, usable, _RECORD):
                self._remember(raw[i : i + _RECORD])
        self._prune(now, compact=False)
        self._rewrite()

    def __contains__(self, job_id: bytes) -> bool:
        bucket = self._buckets.get(envelope.job_id_time(job_id) // _BUCKET_S)
        return bucket is not None and job_id in bucket

    def __len__(self) -> int:
        return self._live

    def add(self, job_id: bytes, now: float) -> None:
        if now >= self._next_prune:
            self._prune(now)
        self._remember(job_id)
        if self._fd is not None:
            os.write(self._fd, job_id)
            self._records += 1
            self._appended += 1

    async def sync(self) -> None:
        """Return once every id added so far is on disk."""
        target = self._appended
        while self._synced < target:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._fdatasync(self._fd, self._appended))
            await asyncio.shield(self._syncing)

    async def _fdatasync(self, fd: int | None, upto: int) -> None:
        try:
            if fd is not None:
                await asyncio.to_thread(os.fdatasync, fd)
            self._synced = max(self._synced, upto)
        finally:
            self._syncing = None

    def _remember(self, job_id: bytes) -> None:
        bucket = self._buckets.setdefault(envelope.job_id_time(job_id) // _BUCKET_S, set())
        if job_id not in bucket:
            bucket.add(job_id)
            self._live += 1

    def _prune(self, now: float, *, compact: bool = True) -> None:
        """Forget the buckets whose every id is expired at ``now``."""
        self._next_prune = now + _BUCKET_S
        first_kept = (int(now) - envelope.JOB_ID_MAX_AGE_S) // _BUCKET_S
        for index in [i for i in self._buckets if i < first_kept]:
            self._live -= len(self._buckets.pop(index))
        self.floor = max(self.floor, first_kept * _BUCKET_S)
        # Rewriting costs the whole file: only once forgotten ids are half of it, and not
        # while a thread syncs the file descriptor the rewrite would close.
        if (
            compact
            and self._fd is not None
            and self._syncing is None
            and self._records >= max(1, 2 * self._live)
        ):
            self._rewrite()

    def _rewrite(self) -> None:
        """Replace the file with the header and the ids remembered now."""
        tmp = self._path.with_name(self._path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        header = _HEADER_TAG + self.floor.to_bytes(_RECORD - len(_HEADER_TAG), "big")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(header + b"".join(b"".join(ids) for ids in self._buckets.values()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        self._records = self._live
        self._synced = self._appended  # every id remembered is in the fsynced file

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
    """Token counts of one job, from the engine's usage or counted by the node.

    ``prompt`` and ``completion`` are the job's counts so far, and its final counts
    (the receipt's) once the stream ended. With continuous usage, vLLM reports usage
    per choice on each chunk that carries one choice: that choice's completion tokens
    so far and the tokens of its prompt (for completions with several prompts, choice
    ``i`` answers prompt ``i // n``). The tally keeps the most each choice and each
    prompt reported and sums them, so that the count only grows with ``n > 1`` or
    several prompts; vLLM's last chunk (``choices: []``) carries the totals, which
    replace the sums.
    """

    prompt: int = 0
    completion: int = 0
    engine_usage: bool = False  # the last chunk seen carried usage
    chunks_with_text: int = 0
    per_choice: dict[int, int] = field(default_factory=dict)  # completion tokens
    per_prompt: dict[int, int] = field(default_factory=dict)  # prompt tokens

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion}

    def add_engine_usage(self, chunk: dict, usage: tuple[int, int], n: int) -> None:
        """Count the usage the engine sent with ``chunk`` (of a request for ``n``)."""
        prompt, completion = usage
        choices = chunk.get("choices")
        if not choices:  # the final usage chunk: the engine's totals for the job
            self.prompt, self.completion = prompt, completion
            return
        index = choices[0].get("index", 0) if isinstance(choices[0], dict) else None
        if len(choices) != 1 or type(index) is not int or index < 0:
            # Not vLLM's one choice per chunk: read it as a running total.
            self.prompt = max(self.prompt, prompt)
            self.completion = max(self.completion, completion)
            return
        self.per_choice[index] = max(self.per_choice.get(index, 0), completion)
        self.per_prompt[index // n] = max(self.per_prompt.get(index // n, 0), prompt)
        self.prompt = max(self.prompt, sum(self.per_prompt.values()))
        self.completion = max(self.completion, sum(self.per_choice.values()))


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


def _choices_per_prompt(body: dict) -> int:
    """The request's ``n`` (choices per prompt), 1 when absent or not a count."""
    n = body.get("n")
    return n if type(n) is int and n >= 1 else 1


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
        matcher: MatcherKeys,
        *,
        max_concurrent: int,
        engine_ready: asyncio.Event,
        global_id: int,
    ) -> None:
        self._keys = keys
        self.global_id = global_id  # the network its receipts name
        self._node_public = keys.ed25519_public
        self._backend = backend
        self._offers = offers
        self._seen = seen
        self._matcher = matcher
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
        try:
            envelope.check_job_id_time(job_id, time.time(), not_before=self._seen.floor)
        except envelope.JobIdRefused as e:
            return error_response(400, str(e), "invalid_request_error", e.code)
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
        if not self._matcher.known:
            return error_response(
                503,
                "the node does not know its matcher's ticket key yet",
                "service_unavailable",
                "matcher_unknown",
            )
        ticket_hex = request.headers.get(TICKET_HEADER)
        if not ticket_hex:
            return error_response(
                403,
                f"no matcher ticket ({TICKET_HEADER}): this node serves only jobs its "
                "matcher dispatched",
                "permission_error",
                "ticket_missing",
            )
        if job_id in self._seen:
            return error_response(
                409, "job id already used (replay)", "invalid_request_error", "job_replayed"
            )
        if not self._engine_ready.is_set():
            return error_response(
                503, "the engine is not ready", "service_unavailable", "engine_not_ready"
            )
        sealed = await request.read()
        request_hash = envelope.request_hash(sealed)
        try:
            ticket = bytes.fromhex(ticket_hex)
        except ValueError:
            ticket = b""
        if not await self._matcher.verify(ticket, self._node_public, job_id, request_hash):
            return error_response(
                403,
                "the matcher ticket does not verify for this node, job id and request",
                "permission_error",
                "ticket_invalid",
            )
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
        self._seen.add(job_id, time.time())
        # The sync runs while the engine works; the receipt waits for it (_Job._last).
        id_on_disk = asyncio.ensure_future(self._seen.sync())
        id_on_disk.add_done_callback(lambda f: f.cancelled() or f.exception())
        sealer = ResponseSealer(response_key, job_id)
        run = _Job(self, job, job_id, escrow, model, sealer, request_hash, id_on_disk)
        # Accepted: the 200 and its headers leave now, before the engine answers, so
        # the matcher knows at once that this node took the job (a long non-streaming
        # generation would otherwise look like a node that hangs).
        response = web.StreamResponse(headers={"Content-Type": FRAMES_CONTENT_TYPE})
        await response.prepare(request)
        if job.body.get("stream"):
            return await run.stream(response)
        return await run.complete(response)


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
        id_on_disk: asyncio.Future[None],
    ) -> None:
        self.service = service
        self.id_on_disk = id_on_disk
        self.backend = service._backend
        self.job = job
        self.job_id = job_id
        self.escrow = escrow
        self.model = model
        self.sealer = sealer
        self.request_hash = request_hash
        self.tally = _Tally()
        self.shown = (0, 0)  # the running count in the last DATA frame

    # -- frames -------------------------------------------------------------------
    def _data(self, chunk: dict) -> bytes:
        # The client refuses a running count that goes down (it pays for the last one
        # if the stream breaks), so a frame never shows less than the one before, even
        # if the engine's totals came out below the sum of its running counts.
        shown = (max(self.shown[0], self.tally.prompt), max(self.shown[1], self.tally.completion))
        if shown != (self.tally.prompt, self.tally.completion):
            log.warning(
                "job %s: the engine's usage %s is below its running count %s",
                self.job_id.hex()[:16],
                self.tally.as_dict(),
                shown,
            )
        self.shown = shown
        usage = {"prompt_tokens": shown[0], "completion_tokens": shown[1]}
        payload = _dumps({"chunk": chunk, "usage": usage}).encode()
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
            global_id=self.service.global_id,
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

    async def _last(self, served: bool) -> bytes:
        """The END frame, once the job id is on disk (see SeenJobs)."""
        try:
            await asyncio.shield(self.id_on_disk)
        except OSError as e:
            log.error("job %s: cannot record its id, so no receipt: %s", self.job_id.hex()[:16], e)
            refusal = engine_error(
                500,
                "the node could not record the job id on disk; the job is not billed",
                "NodeError",
                "node_storage_failed",
            )
            return self._error(500, refusal) + self._end(False)
        return self._end(served)

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
    async def complete(self, response: web.StreamResponse) -> web.StreamResponse:
        """The frames of a non-streaming job, on the response already prepared."""
        body = dict(self.job.body)
        body.pop("stream_options", None)
        frames: list[bytes] = []
        served = False
        try:
            answer = await self.backend.complete(self.job.endpoint, body)
            usage = _usage_of(answer)
            if usage is not None and sum(usage) > 0:
                self.tally.prompt, self.tally.completion = usage
            else:
                texts: dict[int, list[str]] = {}
                _texts_of(answer, texts)
                self.tally.prompt = await self.backend.count_prompt(self.job.endpoint, body)
                self.tally.completion = await self.backend.count_text(
                    body["model"], ["".join(t) for t in texts.values()]
                )
            frames.append(self._data(answer))
            served = True
        except EngineError as e:
            frames.append(self._error(e.status, e.body))
        except UsageUnavailable as e:
            frames.append(self._unbillable(str(e)))
        frames.append(await self._last(served))
        with contextlib.suppress(ConnectionResetError):  # gone before the end: nothing to do
            await response.write(b"".join(frames))
            await response.write_eof()
        return response

    # -- streaming ----------------------------------------------------------------
    async def stream(self, response: web.StreamResponse) -> web.StreamResponse:
        """The frames of a streaming job, on the response already prepared."""
        body = self.job.body
        n = _choices_per_prompt(body)
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
                        tally.add_engine_usage(chunk, usage, n)
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
        tail.append(await self._last(served))
        with contextlib.suppress(ConnectionResetError):  # gone before the end: nothing to do
            await response.write(b"".join(tail))
            await response.write_eof()
        return response


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]
