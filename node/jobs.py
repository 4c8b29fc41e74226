"""Sealed jobs, admission: a job the node takes, or refuses before serving anything.

Refusals are clear HTTP errors (OpenAI-style JSON, raised as ``ApiError``), so the
matcher can fail over: a malformed, expired or future job id (400), busy (429), no
matcher key known yet (503), a missing or invalid matcher ticket (403), replay (409),
a request that does not open (400), a model the node does not offer (404), prices
above the client's caps (402), an engine that is not ready (503). Once the job is
accepted the answer is 200 and a frame stream, whose headers leave at once (before the
engine answers, streaming or not); node.runner writes its frames.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from pydantic import ValidationError
from pytoniq_core import Address

from node.engine import EngineBackend
from node.keys import NodeKeys
from node.offers import OfferBook
from node.receipt_log import ReceiptLog
from node.runner import JobRun
from node.seen import SeenJobs
from node.tickets import MatcherKeys
from protocol import envelope
from protocol.api import SealedRequest
from protocol.envelope import FRAMES_CONTENT_TYPE, JOB_HEADER, EnvelopeError, ResponseSealer
from protocol.errors import ApiError
from protocol.tickets import TICKET_HEADER

__all__ = ["JobService"]


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
        receipt_log: ReceiptLog | None = None,
        global_id: int,
    ) -> None:
        self._receipt_log = receipt_log
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
            raise ApiError.bad_request(
                f"header {JOB_HEADER} must be 64 hex characters", "invalid_job_id"
            )
        try:
            envelope.check_job_id_time(job_id, time.time(), not_before=self._seen.floor)
        except envelope.JobIdRefused as e:
            raise ApiError.bad_request(str(e), e.code) from None
        if self.active >= self.max_concurrent:
            raise ApiError(
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
            raise ApiError.unavailable(
                "the node does not know its matcher's ticket key yet", "matcher_unknown"
            )
        ticket_hex = request.headers.get(TICKET_HEADER)
        if not ticket_hex:
            raise ApiError.forbidden(
                f"no matcher ticket ({TICKET_HEADER}): this node serves only jobs its "
                "matcher dispatched",
                "ticket_missing",
            )
        if job_id in self._seen:
            raise _replayed()
        if not self._engine_ready.is_set():
            raise ApiError.unavailable("the engine is not ready", "engine_not_ready")
        sealed = await request.read()
        request_hash = envelope.request_hash(sealed)
        try:
            ticket = bytes.fromhex(ticket_hex)
        except ValueError:
            ticket = b""
        if not await self._matcher.verify(ticket, self._node_public, job_id, request_hash):
            raise ApiError.forbidden(
                "the matcher ticket does not verify for this node, job id and request",
                "ticket_invalid",
            )
        try:
            plaintext = envelope.open_request(self._keys.x25519, job_id, sealed)
        except EnvelopeError as e:
            raise ApiError.bad_request(
                f"{e}: tampered, or sealed for another node or job id", "sealed_request_invalid"
            ) from None
        try:
            job = SealedRequest.model_validate_json(plaintext)
            response_key = bytes.fromhex(job.response_key)
            escrow = Address(job.escrow)
            if len(response_key) != envelope.RESPONSE_KEY_BYTES:
                raise ValueError("response_key is 32 bytes")
        except (ValidationError, ValueError, TypeError) as e:
            raise ApiError.bad_request(
                f"malformed sealed request: {_short(e)}", "sealed_request_malformed"
            ) from None
        except Exception as e:  # pytoniq raises bare errors on bad addresses
            raise ApiError.bad_request(
                f"malformed escrow address: {_short(e)}", "sealed_request_malformed"
            ) from None
        model = self._offers.get(job.body.get("model"))
        if model is None:
            raise ApiError(
                404,
                f"The model `{str(job.body.get('model'))[:200]}` is not served by this node.",
                "NotFoundError",
                "model_not_found",
            )
        if (
            job.max_price_prompt < model.offer.price_prompt
            or job.max_price_completion < model.offer.price_completion
        ):
            raise ApiError(
                402,
                f"price cap too low: this node charges {model.offer.price_prompt}/"
                f"{model.offer.price_completion} nanoTON per million prompt/completion tokens",
                "invalid_request_error",
                "price_cap_too_low",
            )
        if job_id in self._seen:  # raced with a concurrent copy while reading the body
            raise _replayed()
        self._seen.add(job_id, time.time())
        # The sync runs while the engine works; the receipt waits for it (JobRun._last).
        id_on_disk = asyncio.ensure_future(self._seen.sync())
        id_on_disk.add_done_callback(lambda f: f.cancelled() or f.exception())
        sealer = ResponseSealer(response_key, job_id)
        run = JobRun(
            self._keys, self._backend, job, job_id, escrow, model, sealer, request_hash, id_on_disk,
            self._receipt_log, global_id=self.global_id,
        )  # fmt: skip
        # Accepted: the 200 and its headers leave now, before the engine answers, so
        # the matcher knows at once that this node took the job (a long non-streaming
        # generation would otherwise look like a node that hangs).
        response = web.StreamResponse(headers={"Content-Type": FRAMES_CONTENT_TYPE})
        await response.prepare(request)
        try:
            if job.body.get("stream"):
                return await run.stream(response)
            return await run.complete(response)
        finally:
            self.served += run.receipted


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]


def _replayed() -> ApiError:
    return ApiError(409, "job id already used (replay)", "invalid_request_error", "job_replayed")
