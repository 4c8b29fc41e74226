"""A relayed job's answer, client side: its frames opened and checked, its completion.

``ResponseReader`` reads the matcher's frame stream with ``protocol.frames.FrameReader``
(the stream rules the matcher's relay checks too), opens each sealed frame in order
with the serving copy's response key, refuses a running token count that goes down,
checks the node's receipt in full, and pays: the receipt's amount, or on a stream that
broke mid-way the tokens received (the last usage opened, priced at the offer).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from pytoniq_core import Address

from client.sdk.errors import (
    ImagoError,
    ReceiptRejected,
    RelayFailed,
    ResponseTampered,
    UpstreamError,
)
from client.sdk.receipts import Expected, PriceCaps, VerifiedReceipt, verify_receipt
from client.sdk.sealing import Copy
from protocol.api import EndFrame
from protocol.envelope import EnvelopeError, FrameType
from protocol.frames import BadEndFrame, FrameReader, StreamViolation
from protocol.signed import cost_nanoton

__all__ = ["Completion", "CompletionStream", "JobState", "ResponseReader", "UsageMode"]

log = logging.getLogger("imago.client")

# "keep": a non-streaming response; "include": a stream that asked for usage (null on
# content chunks, a final usage chunk); "strip": a stream that did not.
UsageMode = Literal["keep", "include", "strip"]


@dataclass(slots=True)
class Completion:
    """A non-streaming answer: the OpenAI response object (``usage`` carries
    ``cost_nanoton`` and ``imago_receipt``) and the verified receipt."""

    response: dict[str, Any]
    receipt: VerifiedReceipt
    job_id: str

    @property
    def cost_nanoton(self) -> int:
        return self.receipt.amount


@dataclass
class CompletionStream:
    """Async iterator of OpenAI chunk objects as they arrive.

    When the request asked ``stream_options.include_usage``, the last chunk has
    ``choices: []`` and the usage with ``cost_nanoton`` and ``imago_receipt``. After
    the iteration ends, ``usage``, ``receipt`` and ``cost_nanoton`` are set either way.
    An error (engine, relay, integrity) is raised from the iteration after the chunks
    already delivered."""

    _agen: AsyncIterator[dict[str, Any]]
    job_id: str = ""
    usage: dict[str, Any] | None = None
    receipt: VerifiedReceipt | None = None
    cost_nanoton: int = 0
    _closed: bool = field(default=False, repr=False)

    def __aiter__(self) -> CompletionStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._agen.__anext__()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._agen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> CompletionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass(slots=True)
class JobState:
    job_id: bytes
    copies: list[Copy]
    serving: Copy | None = None  # the copy whose key opened the first sealed frame
    last_usage: tuple[int, int] | None = None
    paid: bool = False


class ResponseReader:
    """Reads one job's answer (``chunks``) and pays for it through ``pay(amount, job
    id)``; ``result`` gets the usage and the receipt."""

    def __init__(
        self,
        job: JobState,
        *,
        model: str,
        caps: PriceCaps,
        escrow: Address,
        global_id: int,
        usage_mode: UsageMode,
        result: CompletionStream,
        pay: Callable[[int, str], None],
    ) -> None:
        self.global_id = global_id
        self.job = job
        self.model = model
        self.caps = caps
        self.escrow = escrow
        self.usage_mode = usage_mode
        self.result = result
        self._pay = pay

    async def chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any] | None]:
        """The OpenAI objects of the answer. A None first means that nothing was served
        and the relay failed: a fresh route may help (the relay error follows)."""
        try:
            async for item in self._chunks(resp):
                yield item
        except (ResponseTampered, ReceiptRejected):
            self.job.paid = True  # an integrity failure: nothing is owed for this transcript
            raise

    def pay_partial(self) -> None:
        """Pay for the tokens received (the last usage opened), priced at the offer."""
        job = self.job
        job.paid = True
        if job.serving is None or job.last_usage is None:
            return
        prompt, completion = job.last_usage
        offer = job.serving.offer
        amount = cost_nanoton(prompt, completion, offer.price_prompt, offer.price_completion)
        log.info("job %s broke mid-stream: paying %d nanoTON", job.job_id.hex(), amount)
        self._pay(amount, job.job_id.hex())

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any] | None]:
        job, usage_mode = self.job, self.usage_mode
        reader = FrameReader(relay_errors=True)
        upstream_error: ImagoError | None = None
        relay_error: ImagoError | None = None
        usage_chunk: dict[str, Any] | None = None
        last_chunk: dict[str, Any] | None = None
        delivered = False
        try:
            async for data in resp.content.iter_any():
                try:
                    frames, violation = reader.feed(data), None
                except StreamViolation as e:
                    frames, violation = e.frames, e
                for frame_type, payload in frames:
                    plaintext = self._open(frame_type, payload)
                    if frame_type is FrameType.ERROR:
                        upstream_error = _upstream_error(plaintext)
                        continue
                    chunk = _data_chunk(plaintext, job)
                    if _is_usage_only(chunk):
                        usage_chunk = chunk  # re-sent at the end with the receipt
                        continue
                    if usage_mode != "keep" and "usage" in chunk:
                        # engines with continuous usage put it on every chunk; OpenAI
                        # has null there (include_usage) or no field at all
                        if usage_mode == "include":
                            chunk["usage"] = None
                        else:
                            del chunk["usage"]
                    last_chunk = chunk
                    delivered = True
                    yield chunk
                if violation is not None:
                    raise _integrity_error(violation)
            reader.close()
        except aiohttp.ClientError as e:
            if not reader.done:
                relay_error = RelayFailed(f"the response stream broke: {e}", status=502)
        except StreamViolation as e:  # from close(): how the stream ended
            if e.code == "truncated_frame":
                relay_error = RelayFailed(f"the response stream {e}", status=502)
            elif e.code != "no_end_frame":
                raise _integrity_error(e) from None
        if relay_error is None and reader.relay_error is not None:
            relay_error = RelayFailed.from_api_error(reader.relay_error)
        if relay_error is not None:
            if job.serving is None and not delivered:
                if upstream_error is not None:
                    raise upstream_error
                yield None  # nothing was served: the caller may retry on a fresh route
                raise relay_error
            self.pay_partial()
            raise relay_error
        end = reader.end
        if end is None:
            if job.serving is None and upstream_error is None:
                raise RelayFailed("the stream ended without a response", status=502)
            self.pay_partial()
            raise RelayFailed("the stream ended before the node's receipt", status=502)
        if end.receipt is None:
            job.paid = True  # the node says nothing was served
            if upstream_error is not None:
                raise upstream_error
            raise ReceiptRejected("the node served the job but sent no receipt")
        verified = self._check_receipt(end)
        job.paid = True
        self._pay(verified.amount, job.job_id.hex())
        r = verified.receipt
        usage = {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
            "cost_nanoton": r.amount,
            "imago_receipt": verified.as_usage_extension(),
        }
        self.result.receipt = verified
        self.result.usage = usage
        self.result.cost_nanoton = r.amount
        if upstream_error is not None:
            raise upstream_error
        if usage_mode == "include":
            final = usage_chunk or _synthesize_usage_chunk(last_chunk)
            final["choices"] = []
            final["usage"] = {**(final.get("usage") or {}), **usage}
            yield final

    def _open(self, frame_type: FrameType, payload: bytes) -> bytes:
        job = self.job
        try:
            if job.serving is not None:
                return job.serving.opener.open(frame_type, payload)
        except EnvelopeError as e:
            raise ResponseTampered(str(e)) from e
        for copy in job.copies:  # the first sealed frame tells which node served
            try:
                plaintext = copy.opener.open(frame_type, payload)
            except EnvelopeError:
                continue
            job.serving = copy
            return plaintext
        raise ResponseTampered(
            "the first response frame opens under no candidate's key (tampered or forged)"
        )

    def _check_receipt(self, end: EndFrame) -> VerifiedReceipt:
        job = self.job
        node = job.serving
        assert node is not None  # a receipt follows a DATA frame (protocol.frames), opened
        expected = Expected(
            global_id=self.global_id,
            node_id=node.node_id,
            node_ed25519=node.ed25519_public,
            job_id=job.job_id,
            escrow=self.escrow,
            model=self.model,
            offer=node.offer,
            caps=self.caps,
            request_hash=node.request_hash,
            transcript_hash=node.opener.transcript_hash,
            usage=job.last_usage,
        )
        try:
            return verify_receipt(end, expected)
        except ReceiptRejected as e:
            log.warning("job %s: %s", job.job_id.hex(), e.message)
            raise


def _integrity_error(e: StreamViolation) -> ImagoError:
    """A stream that broke a rule: tampered, or a receipt that cannot be right."""
    if isinstance(e, BadEndFrame) and e.code != "malformed_end":
        return ReceiptRejected(str(e))
    return ResponseTampered(str(e))


def _upstream_error(plaintext: bytes) -> UpstreamError:
    try:
        data = json.loads(plaintext)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise ResponseTampered("an ERROR frame is not JSON") from e
    status = data.get("status")
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = 502
    return UpstreamError.from_error_json(status, data, "the node reported an error")


def _data_chunk(plaintext: bytes, job: JobState) -> dict[str, Any]:
    try:
        data = json.loads(plaintext)
        chunk = data["chunk"]
        usage = data["usage"]
        prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (ValueError, KeyError, TypeError) as e:
        raise ResponseTampered(f"a DATA frame is malformed: {e}") from e
    if not isinstance(chunk, dict) or prompt < 0 or completion < 0:
        raise ResponseTampered("a DATA frame is malformed")
    last = job.last_usage
    if last is not None and (prompt < last[0] or completion < last[1]):
        raise ResponseTampered("the node's running token count went down")
    job.last_usage = (prompt, completion)
    return chunk


def _is_usage_only(chunk: dict[str, Any]) -> bool:
    return chunk.get("choices") == [] and chunk.get("usage") is not None


def _synthesize_usage_chunk(last: dict[str, Any] | None) -> dict[str, Any]:
    last = last or {}
    chunk: dict[str, Any] = {
        "id": last.get("id", ""),
        "object": last.get("object", "chat.completion.chunk"),
        "created": last.get("created", int(time.time())),
        "model": last.get("model", ""),
    }
    if "system_fingerprint" in last:
        chunk["system_fingerprint"] = last["system_fingerprint"]
    return chunk
