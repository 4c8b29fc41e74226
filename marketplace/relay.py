"""The relay: ciphertext from the client to a node and frames back, with failover.

The matcher holds no key that opens a request or a response. It reads the frames with
``protocol.frames.FrameReader`` (the stream rules the client checks too) only to find
their boundaries, hash the sealed ones (the receipt's ``response_hash``), hold back the
clear END frame until its receipt verifies, and count bytes.

- Before the node's first byte (connect error, 5xx, timeout, closed stream) the next
  candidate gets the job; the client pays nothing for the failure.
- After it, a failure appends a clear RELAY_ERROR frame; the job is ``failed_midstream``
  and its amount comes later from the client's voucher.
- A receipt that does not verify (signature, job id, escrow, model, tokens, amount,
  request or response hash) marks the job ``errored``; the client gets RELAY_ERROR
  instead of the END frame.
- A client disconnect closes the node request.

Each attempt carries a ticket: the matcher's signature over the node, the job id and
the hash of the sealed request that node gets (``protocol.tickets``), so
nodes serve only what the matcher dispatched (and metered). A job id outside its time
window is refused before anything is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from pytoniq_core import Address

from marketplace.config import MatcherConfig
from marketplace.db import JobStatus
from marketplace.escrows import EscrowBook, EscrowUnfunded
from marketplace.ledger import DuplicateJob, Ledger, LedgerError
from marketplace.metrics import Metrics
from marketplace.registry import NodeRegistry, NodeState
from marketplace.routing import NoRoute, rank
from marketplace.tickets import TicketSigner
from protocol.api import EndFrame, RelayRequest, relay_message
from protocol.envelope import (
    FRAMES_CONTENT_TYPE,
    JOB_HEADER,
    FrameType,
    JobIdRefused,
    check_job_id_time,
    encode_frame,
    request_hash,
)
from protocol.errors import ApiError, read_error
from protocol.frames import BadEndFrame, FrameReader, StreamViolation, relay_error_frame
from protocol.receipts import ReceiptExpectations, receipt_problems
from protocol.signed import Receipt, SignedObjectError
from protocol.tickets import TICKET_HEADER

__all__ = ["Relay", "normalize_escrow"]

log = logging.getLogger(__name__)


def normalize_escrow(escrow: str) -> str:
    try:
        return Address(escrow).to_str(is_user_friendly=False)
    except Exception as e:  # pytoniq raises bare errors
        raise ApiError(400, f"escrow {escrow!r} is not a TON address", param="escrow") from e


class _FrameStream(web.StreamResponse):
    """Headers leave with the first frames (one send, not two): aiohttp's
    ``web.Response`` does the same."""

    _send_headers_immediately = False


@dataclass
class _RelayJob:
    """One relay request on its way through the candidates."""

    job_id: str  # hex, as the ledger and the node header have it
    job_bytes: bytes
    escrow: str  # raw form
    model: str
    sealed: dict[str, bytes]  # node id → sealed request
    request_hashes: dict[str, bytes]  # node id → its SHA-256 (ticket, receipt, signature)
    started: float
    failed: list[str] = field(default_factory=list)  # nodes that failed before a byte
    streaming: bool = False  # set once _relay_to owns the job's record


class _NodeFailed(Exception):
    """The node failed before its first byte: try the next one."""


class _NodeBusy(_NodeFailed):
    """The node is at capacity (429): try the next one, without holding it against it."""


class _NodeRefused(Exception):
    """The node answered 4xx: the job itself is refused, no failover."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Relay:
    def __init__(
        self,
        config: MatcherConfig,
        session: aiohttp.ClientSession,
        registry: NodeRegistry,
        ledger: Ledger,
        metrics: Metrics,
        tickets: TicketSigner,
        escrows: EscrowBook | None = None,
        *,
        global_id: int,
    ) -> None:
        self.escrows = escrows  # with a chain: refuse jobs an escrow cannot pay for
        self.global_id = global_id  # the network every receipt must name
        self.tickets = tickets
        self.config = config
        self.session = session
        self.registry = registry
        self.ledger = ledger
        self.metrics = metrics
        self.stopping = False  # set at shutdown: cut relays are aborted_by_restart
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
        )

    def _order(self, model: str, sealed: dict[str, bytes]) -> list[NodeState]:
        """The provided candidates in the matcher's current preference; nodes out of
        rotation last (better a retry than a refusal), unknown nodes dropped."""
        nodes = self.registry.nodes
        provided = [
            node
            for node_id in sealed
            if (node := nodes.get(node_id)) is not None and model in node.offers
        ]
        if not provided:
            if not self.registry.serving(model):
                raise ApiError(404, f"no node serves {model!r}", code="model_not_found")
            raise ApiError.unavailable(
                "none of the nodes the request was sealed for is admitted; fetch a new route",
                "no_admitted_candidate",
            )
        if len(provided) == 1:
            return provided
        try:
            ranked = [r.node for r in rank(provided, model)]
        except NoRoute:
            ranked = []
        return ranked + [n for n in provided if n not in ranked]

    async def handle(self, request: web.Request, body: RelayRequest) -> web.StreamResponse:
        started = time.perf_counter()
        job_id = body.job_id.lower()
        if len(job_id) != 64:
            raise ApiError(400, "job_id is 32 bytes of hex", param="job_id")
        try:
            job_bytes = bytes.fromhex(job_id)
            sealed = {
                node_id.lower(): base64.b64decode(b64, validate=True)
                for node_id, b64 in body.sealed.items()
            }
            hashes = {node_id: request_hash(data) for node_id, data in sealed.items()}
            signature = bytes.fromhex(body.signature) if body.signature else None
        except (ValueError, binascii.Error) as e:
            raise ApiError(400, f"malformed job id, sealed request or signature: {e}") from e
        try:  # nodes would refuse it: say so now, without a node round trip
            check_job_id_time(job_bytes, time.time())
        except JobIdRefused as e:
            raise ApiError(400, str(e), code=e.code, param="job_id") from e
        escrow = normalize_escrow(body.escrow)
        if self.escrows is not None:
            try:
                await self.escrows.ensure_funded(escrow)
            except EscrowUnfunded as e:
                raise ApiError(402, str(e), code=e.code, param="escrow") from e
            message = relay_message(job_bytes, escrow, body.model, hashes)
            if signature is None or not self.escrows.signed_by_spend_key(
                escrow, signature, message
            ):
                raise ApiError.forbidden(
                    "the relay request is not signed by the escrow's spend key: only its "
                    "owner may spend from it",
                    "relay_unauthorized",
                    param="signature",
                )
        order = self._order(body.model, sealed)
        opening = time.perf_counter()
        try:
            await self.ledger.open_job(
                {
                    "job_id": job_id,
                    "model": body.model,
                    "escrow": escrow,
                    "node_id": order[0].node_id,  # the node it goes to (failover renames it)
                    "request_bytes": len(sealed[order[0].node_id]),
                }
            )
        except DuplicateJob as e:
            raise ApiError(409, str(e), code="duplicate_job", param="job_id") from e
        except LedgerError as e:
            raise ApiError(503, f"metering is unavailable: {e}", type="server_error") from e
        self.metrics.record_seconds.observe(time.perf_counter() - opening)

        job = _RelayJob(job_id, job_bytes, escrow, body.model, sealed, hashes, started)
        try:
            return await self._try_nodes(request, order, job)
        except BaseException as e:
            if not job.streaming:  # cut before any node answered: the client pays nothing
                if self.stopping:
                    status, error = JobStatus.ABORTED_BY_RESTART, "the matcher stopped"
                elif isinstance(e, asyncio.CancelledError | ConnectionError):
                    status = JobStatus.FAILED_BEFORE_FIRST_BYTE
                    error = "client disconnected before the first byte"
                else:
                    status, error = JobStatus.ERRORED, f"relay error: {e!r}"
                self.ledger.close_job(
                    job_id,
                    status,
                    node_id=None,  # nobody served it
                    failed_nodes=",".join(job.failed),
                    error=error[:500],
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
            raise

    async def _try_nodes(
        self, request: web.Request, order: list[NodeState], job: _RelayJob
    ) -> web.StreamResponse:
        busy = 0
        for attempt, node in enumerate(order):
            if attempt:
                await self.ledger.assign_node(job.job_id, node.node_id)
            node.stats.inflight += 1
            try:
                return await self._relay_to(request, node, job)
            except _NodeBusy:
                busy += 1  # at capacity is not a failure: its score stays
                job.failed.append(node.node_id)
                self.metrics.attempts["busy"] += 1
            except _NodeFailed as e:
                job.failed.append(node.node_id)
                node.stats.record_failure()
                self.metrics.attempts["failed_before_first_byte"] += 1
                log.info(
                    "job %s: node %s failed before its first byte: %s",
                    job.job_id[:12],
                    node.node_id[:12],
                    e,
                )
            except _NodeRefused as e:
                self.metrics.attempts["refused"] += 1
                job.streaming = True
                self.ledger.close_job(
                    job.job_id,
                    JobStatus.ERRORED,
                    node_id=node.node_id,
                    failed_nodes=",".join(job.failed),
                    error=f"node refused the job ({e.status}): {e}"[:500],
                    duration_ms=(time.perf_counter() - job.started) * 1000,
                )
                return await self._error_stream(request, e.status, str(e), "node_refused")
            finally:
                node.stats.inflight -= 1
        job.streaming = True
        all_busy = busy == len(order)
        self.ledger.close_job(
            job.job_id,
            JobStatus.FAILED_BEFORE_FIRST_BYTE,
            node_id=None,  # nobody served it
            failed_nodes=",".join(job.failed),
            error="every candidate was at capacity"
            if all_busy
            else "every candidate failed before its first byte",
            duration_ms=(time.perf_counter() - job.started) * 1000,
        )
        if all_busy:  # as OpenAI and vLLM's own overload answer: the caller retries
            return await self._error_stream(
                request,
                429,
                "every node serving this model is at capacity; retry shortly (nothing was charged)",
                "nodes_busy",
                "rate_limit_error",
            )
        return await self._error_stream(
            request, 502, "no node could take the job; nothing was charged", "no_node_available"
        )

    async def _error_stream(
        self, request: web.Request, status: int, message: str, code: str, type: str = "relay_error"
    ) -> web.StreamResponse:
        frame = relay_error_frame(ApiError(status, message, type, code))
        return web.Response(body=frame, content_type=FRAMES_CONTENT_TYPE)

    async def _open(
        self, node: NodeState, job_id: str, data: bytes, ticket: str
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """POST the job and wait for the node's first byte.

        The node answers its headers when it accepts the job, before its engine runs:
        ``first_byte_timeout_s`` bounds that; the first frame may then take as long as
        generating takes (a non-streaming answer comes whole), bounded by the read
        timeout only. Until that frame the client has seen nothing, so a node that
        fails even then is failed over."""
        resp = None
        headers = {
            JOB_HEADER: job_id,
            TICKET_HEADER: ticket,
            "Content-Type": "application/octet-stream",
        }
        try:
            async with asyncio.timeout(self.config.first_byte_timeout_s):
                resp = await self.session.post(
                    node.jobs_url, data=data, headers=headers, timeout=self.timeout
                )
            if resp.status == 429:
                raise _NodeBusy("node answered 429")
            if resp.status >= 500:
                raise _NodeFailed(f"node answered {resp.status}")
            if resp.status != 200:
                text = (await resp.content.read(4096)).decode("utf-8", "replace")
                with contextlib.suppress(ValueError):
                    text = read_error(resp.status, json.loads(text), text).message
                raise _NodeRefused(resp.status, text or f"node answered {resp.status}")
            first = await resp.content.readany()
            if not first:
                raise _NodeFailed("node closed the stream before its first byte")
            return resp, first
        except (_NodeFailed, _NodeRefused):
            if resp is not None:
                resp.close()
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            if resp is not None:
                resp.close()
            if isinstance(e, (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)):
                self.registry.mark_unhealthy(node, f"relay could not reach it: {e!r}")
            raise _NodeFailed(repr(e)) from e
        except BaseException:
            if resp is not None:
                resp.close()
            raise

    async def _relay_to(
        self, request: web.Request, node: NodeState, job: _RelayJob
    ) -> web.StreamResponse:
        job_id, started, data = job.job_id, job.started, job.sealed[node.node_id]
        copy_hash = job.request_hashes[node.node_id]  # the ticket's and the receipt's
        ticket = self.tickets.sign(node.public, job.job_bytes, copy_hash)
        resp, first = await self._open(node, job_id, data, ticket)
        job.streaming = True
        ttft_ms = (time.perf_counter() - started) * 1000
        self.metrics.first_byte_seconds.observe(ttft_ms / 1000)
        self.metrics.bytes_relayed["request"] += len(data)
        out = _FrameStream(headers={"Content-Type": FRAMES_CONTENT_TYPE})
        reader = FrameReader(relay_errors=False)
        transcript = hashlib.sha256()
        tail = b""  # the sealed frames that came with END: they leave with it, after the check
        sent = 0
        common = {
            "node_id": node.node_id,
            "failed_nodes": ",".join(job.failed),
            "ttft_ms": ttft_ms,
        }

        def finish(status: JobStatus, error: str = "", **fields) -> None:
            duration_ms = (time.perf_counter() - started) * 1000
            self.metrics.relay_seconds.observe(duration_ms / 1000)
            self.metrics.bytes_relayed["response"] += sent
            self.metrics.attempts[status.value] += 1
            self.ledger.close_job(
                job_id,
                status,
                error=error[:500],
                response_bytes=sent,
                duration_ms=duration_ms,
                request_bytes=len(data),
                **common,
                **fields,
            )

        broken = ""  # the stream broke off or broke a rule
        bad_end = ""  # the END frame broke the receipt rules
        try:
            await out.prepare(request)
            chunk = first
            while True:
                try:
                    reader.feed(chunk)
                except BadEndFrame as e:
                    bad_end = str(e)
                except StreamViolation as e:
                    broken = f"node sent a malformed stream: {e}"
                forward = reader.forward  # whole sealed frames, as received
                if forward:
                    transcript.update(forward)
                    if reader.end is not None or bad_end:
                        tail += forward
                    else:
                        await out.write(forward)
                        sent += len(forward)
                if broken or bad_end:
                    break
                try:
                    chunk = await resp.content.readany()
                except (aiohttp.ClientError, TimeoutError, OSError) as e:
                    broken = f"node stream broke: {e!r}"
                    break
                if not chunk:
                    try:
                        reader.close()
                    except StreamViolation as e:
                        broken = f"node stream {e}"
                    break
        except (ConnectionError, aiohttp.ClientConnectionResetError, asyncio.CancelledError) as e:
            resp.close()
            if self.stopping:
                finish(JobStatus.ABORTED_BY_RESTART, "the matcher stopped during the relay")
            else:
                finish(JobStatus.FAILED_MIDSTREAM, f"client disconnected: {e!r}")
            raise
        resp.release() if not (broken or bad_end) else resp.close()

        if broken:
            node.stats.record_failure()
            error = ApiError(502, broken, "relay_error", "node_failed_midstream")
            await self._write_last(out, tail + relay_error_frame(error))
            sent += len(tail)
            finish(JobStatus.FAILED_MIDSTREAM, broken)
            return out

        end, end_payload = reader.end, reader.end_payload
        try:
            if bad_end or end is None or end_payload is None:
                raise ValueError(bad_end or "no END frame")
            fields = self._check_receipt(
                end, node, job.job_bytes, job.escrow, job.model, copy_hash, transcript.digest()
            )
        except (ValueError, SignedObjectError) as e:
            node.stats.record_failure()
            message = f"the node's receipt does not verify: {e}"
            log.warning("job %s: %s", job_id[:12], message)
            error = ApiError(502, message, "relay_error", "invalid_receipt")
            await self._write_last(out, tail + relay_error_frame(error))
            sent += len(tail)
            finish(JobStatus.ERRORED, message)
            return out

        end_frame = encode_frame(FrameType.END, end_payload)
        sent += len(tail) + len(end_frame)
        # Queue the record before the client can see END (and send its voucher).
        if end.receipt is None:
            finish(JobStatus.ERRORED, "the node served nothing (error before any token)")
        else:
            node.stats.record_success(
                ttft_ms, (time.perf_counter() - started) * 1000, end.completion_tokens
            )
            finish(JobStatus.COMPLETED, **fields)
        await self._write_last(out, tail + end_frame)
        return out

    async def _write_last(self, out: web.StreamResponse, frame: bytes) -> None:
        # If the client left, the job's record does not depend on it.
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await out.write_eof(bytes(frame))

    def _check_receipt(
        self,
        end: EndFrame,
        node: NodeState,
        job_bytes: bytes,
        escrow: str,
        model: str,
        request_hash: bytes,
        response_hash: bytes,
    ) -> dict:
        if end.receipt is None:  # then no tokens either (protocol.frames)
            return {}
        boc = base64.b64decode(end.receipt, validate=True)
        signature = bytes.fromhex(end.signature or "")
        # SignedObjectError (a ValueError) if not a receipt BOC; cell_hash is the hash of
        # the cell as received, which the signature is over, not of a rebuilt one.
        receipt, cell_hash = Receipt.parse_boc(boc)
        offer = node.offers.get(model)
        if offer is None:
            raise ValueError(f"the node no longer offers {model!r}")
        problems = receipt_problems(
            receipt,
            cell_hash,
            signature,
            ReceiptExpectations(
                global_id=self.global_id,
                node_key=node.public,
                job_id=int.from_bytes(job_bytes, "big"),
                escrow=Address(escrow),
                model=model,
                prices=(offer.price_prompt, offer.price_completion),
                request_hash=request_hash,
                response_hash=response_hash,
                tokens=(end.prompt_tokens, end.completion_tokens),
            ),
        )
        if problems:
            raise ValueError("; ".join(problems))
        return {
            "prompt_tokens": receipt.prompt_tokens,
            "completion_tokens": receipt.completion_tokens,
            "amount": receipt.amount,
            "receipt_boc": end.receipt,
            "receipt_signature": end.signature,
        }
