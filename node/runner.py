"""One accepted job: run it on the engine and answer its frame stream.

DATA frames (sealed; each with the running token count), the engine's errors as sealed
ERROR frames, and always a last clear END frame with the signed receipt (null when
nothing was served), which leaves only once the job id is on disk (node.seen).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time

from aiohttp import web
from pytoniq_core import Address

from node.engine import EngineBackend, EngineError, UsageUnavailable, engine_error
from node.keys import NodeKeys
from node.offers import PricedModel
from node.receipt_log import ReceiptLog
from node.usage import Tally, choices_per_prompt, texts_of, usage_of
from protocol import envelope
from protocol.api import SealedRequest
from protocol.envelope import FrameType, ResponseSealer
from protocol.signed import Receipt, cost_nanoton

__all__ = ["JobRun"]

log = logging.getLogger("imago.node.jobs")

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class JobRun:
    """The frames of one job, on a response whose headers already left."""

    def __init__(
        self,
        keys: NodeKeys,
        backend: EngineBackend,
        job: SealedRequest,
        job_id: bytes,
        escrow: Address,
        model: PricedModel,
        sealer: ResponseSealer,
        request_hash: bytes,
        id_on_disk: asyncio.Future[None],
        receipt_log: ReceiptLog | None = None,
        *,
        global_id: int,
    ) -> None:
        self.global_id = global_id  # the network its receipts name
        self.keys = keys
        self.id_on_disk = id_on_disk
        self.receipt_log = receipt_log
        self.backend = backend
        self.job = job
        self.job_id = job_id
        self.escrow = escrow
        self.model = model
        self.sealer = sealer
        self.request_hash = request_hash
        self.tally = Tally()
        self.shown = (0, 0)  # the running count in the last DATA frame
        self.receipted = False  # a receipt was signed for it

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
            global_id=self.global_id,
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
        signature = self.keys.ed25519.sign(receipt_hash)
        end = {
            "receipt": base64.b64encode(boc).decode(),
            "signature": signature.hex(),
            "prompt_tokens": tally.prompt,
            "completion_tokens": tally.completion,
        }
        if self.receipt_log is not None:  # before the receipt leaves
            self.receipt_log.append(self.job_id, receipt.time, end["receipt"], end["signature"])
        self.receipted = True
        return envelope.encode_frame(FrameType.END, _dumps(end).encode())

    async def _last(self, served: bool) -> bytes:
        """The END frame, once the job id is on disk (see node.seen)."""
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
            usage = usage_of(answer)
            if usage is not None and sum(usage) > 0:
                self.tally.prompt, self.tally.completion = usage
            else:
                texts: dict[int, list[str]] = {}
                texts_of(answer, texts)
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
        n = choices_per_prompt(body)
        tally = self.tally
        texts: dict[int, list[str]] = {}
        prompt_task: asyncio.Task[int] | None = None
        served = False
        tail: list[bytes] = []
        try:
            async with self.backend.stream(self.job.endpoint, body) as chunks:
                async for chunk in chunks:
                    usage = usage_of(chunk)
                    if usage is not None:
                        tally.add_engine_usage(chunk, usage, n)
                        tally.engine_usage = True
                    else:
                        tally.engine_usage = False
                        if texts_of(chunk, texts):
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
