"""ImagoClient: the confidential request path, client side (docs/protocol.md, "Client").

Per request: a route from the matcher (cached for its ``ttl_seconds``), each candidate's
attestation verified here (once per node key), the request sealed to the top
candidates with a fresh response key each, one ``POST /v1/relay``, the frames opened in
order, and the node's receipt checked in full before a cumulative spend voucher is
signed and handed to the matcher.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)
from pytoniq_core import Address

from client.sdk.errors import (
    AttestationRejected,
    ImagoError,
    InvalidRequest,
    MatcherError,
    ReceiptRejected,
    RelayFailed,
    ResponseTampered,
    UpstreamError,
)
from client.sdk.ledger import SpendLedger
from client.sdk.receipts import Expected, PriceCaps, VerifiedReceipt, verify_receipt
from contracts.allowlists import Allowlists, AllowlistUnavailable
from contracts.protocol.api import (
    EndFrame,
    ModelOffer,
    RouteCandidate,
    RouteResponse,
    relay_message,
)
from contracts.protocol.attestation import (
    AttestationError,
    AttestationPolicy,
    image_hash,
    verify_attestation,
)
from contracts.protocol.envelope import (
    EnvelopeError,
    FrameDecoder,
    FrameType,
    ResponseOpener,
    new_job_id,
    new_response_key,
    request_hash,
    seal_request,
)
from contracts.protocol.signed import (
    SpendVoucher,
    cost_nanoton,
    network_global_id,
)

__all__ = ["Completion", "CompletionStream", "Endpoint", "ImagoClient"]

log = logging.getLogger("imago.client")

Endpoint = Literal["chat/completions", "completions"]
ENDPOINTS: frozenset[str] = frozenset({"chat/completions", "completions"})
ATTESTATION_CACHE_SECONDS = 3600.0
VOUCHER_BACKOFF_MAX = 10.0


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


@dataclass(slots=True)
class _Copy:
    """One candidate's sealed copy of a job."""

    node_id: str
    ed25519_public: bytes
    offer: ModelOffer
    request_hash: bytes
    opener: ResponseOpener
    sealed_b64: str


@dataclass(slots=True)
class _Cached:
    value: Any
    expires: float


@dataclass(slots=True)
class _JobState:
    job_id: bytes
    copies: list[_Copy]
    serving: _Copy | None = None
    last_usage: tuple[int, int] | None = None
    paid: bool = False


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


class ImagoClient:
    """The Imago client SDK. Use as ``async with ImagoClient(...) as imago:``.

    ``matcher_url``: base URL of the matcher (``http://127.0.0.1:8700``).
    ``escrow``, ``vault``: the client's Escrow contract and the matcher's Vault.
    ``spend_key``: the ed25519 key the Escrow accepts vouchers from (client.keys).
    ``policy``: what attestations to accept; ``allow_dev`` requires ``devnet=True``.
    ``allowlists``: the Registry's, read on-chain: a node's attested image must be on
    it too; with it, ``policy.allowed_measurements`` may be None (the Registry alone
    decides which TDX images are acceptable).
    ``caps``: default price caps (nanoTON per million tokens); per call overridable.
    ``state_path``: the local spend ledger (cumulative spend, survives restarts).
    ``session``: an aiohttp session to share; one is made (and closed) otherwise.
    ``fanout``: how many top candidates get a sealed copy (the matcher fails over).
    ``voucher_interval``: at most one voucher post per interval (seconds); the jobs in
    between share one cumulative voucher, so the matcher is not hit twice per request.
    ``global_id``: the network the escrow is on (config param 19; mainnet -239, testnet
    -3): every voucher names it and every receipt must. Required off the devnet.
    """

    def __init__(
        self,
        *,
        matcher_url: str,
        escrow: str | Address,
        vault: str | Address,
        spend_key: Ed25519PrivateKey,
        policy: AttestationPolicy,
        caps: PriceCaps,
        state_path: Path,
        devnet: bool = False,
        session: aiohttp.ClientSession | None = None,
        fanout: int = 2,
        read_timeout: float = 600.0,
        voucher_interval: float = 1.0,
        allowlists: Allowlists | None = None,
        global_id: int | None = None,
    ) -> None:
        if policy.allow_dev and not devnet:
            raise ValueError("dev attestations are accepted only in devnet mode")
        if policy.allowed_measurements is None and allowlists is None:
            raise ValueError("TDX images need a measurement list or the Registry's allowlist")
        if fanout < 1:
            raise ValueError("fanout is at least 1")
        self.matcher_url = matcher_url.rstrip("/")
        self.escrow = escrow if isinstance(escrow, Address) else Address(escrow)
        self.vault = vault if isinstance(vault, Address) else Address(vault)
        self.escrow_str = self.escrow.to_str(is_user_friendly=False)
        self.vault_str = self.vault.to_str(is_user_friendly=False)
        self.policy = policy
        self.allowlists = allowlists
        self.caps = caps
        self.devnet = devnet
        # the network its vouchers name and its receipts must name; none by default
        # off the devnet (ValueError)
        self.global_id = network_global_id(global_id, devnet=devnet)
        self.fanout = fanout
        self._spend_key = spend_key
        self.spend_public = spend_key.public_key().public_bytes_raw()
        self._ledger = SpendLedger.open(Path(state_path), self.escrow_str, self.vault_str)
        self._session = session
        self._own_session = session is None
        self._read_timeout = read_timeout
        self.voucher_interval = voucher_interval
        self._routes: dict[tuple[str, int, int], _Cached] = {}
        self._route_fetches: dict[tuple[str, int, int], asyncio.Future[RouteResponse]] = {}
        self._attested: dict[tuple[str, str, str], _Cached] = {}
        self._voucher_wakeup = asyncio.Event()
        self._voucher_task: asyncio.Task[None] | None = None
        self._voucher_idle = asyncio.Event()
        self._voucher_idle.set()
        self.last_voucher_error: str | None = None
        self._flushing = False

    # -- lifetime ---------------------------------------------------------------------

    async def start(self) -> None:
        if not self._ledger.is_open:  # restarted after close()
            self._ledger = SpendLedger.open(self._ledger.path, self.escrow_str, self.vault_str)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10, sock_read=self._read_timeout
                ),
            )
        if self._voucher_task is None:
            self._voucher_task = asyncio.create_task(self._voucher_loop(), name="imago-vouchers")
            if self._ledger.cumulative > self._ledger.posted or self._ledger.pending_jobs:
                self._wake_vouchers()  # left over from a previous run

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Try to hand outstanding vouchers to the matcher, then stop."""
        if self._voucher_task is not None:
            with contextlib.suppress(TimeoutError):
                await self.flush_vouchers(flush_timeout)
            self._voucher_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._voucher_task
            self._voucher_task = None
        self._ledger.save()
        self._ledger.close()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ImagoClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ImagoClient is not started (use `async with` or start())")
        return self._session

    # -- spend state ------------------------------------------------------------------

    @property
    def cumulative_spend(self) -> int:
        return self._ledger.cumulative

    @property
    def acknowledged_spend(self) -> int:
        return self._ledger.posted

    async def flush_vouchers(self, timeout: float = 5.0) -> None:
        """Wait until the matcher holds a voucher for the whole cumulative spend."""
        self._flushing = True
        try:
            await self._flush(timeout)
        finally:
            self._flushing = False

    async def _flush(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self._ledger.cumulative > self._ledger.posted or self._ledger.pending_jobs:
                self._voucher_idle.clear()
                self._wake_vouchers()
                await self._voucher_idle.wait()
                if self.last_voucher_error is not None:
                    await asyncio.sleep(0.05)

    # -- public API -------------------------------------------------------------------

    async def models(self) -> dict[str, Any]:
        """The matcher's OpenAI model list (with Imago prices and node counts)."""
        try:
            async with self.session.get(f"{self.matcher_url}/v1/models") as resp:
                if resp.status != 200:
                    raise await _matcher_error(resp, "listing models failed")
                return await resp.json()
        except aiohttp.ClientError as e:
            raise MatcherError(f"matcher unreachable: {e}", status=503) from e

    async def complete(
        self, endpoint: Endpoint, body: dict[str, Any], caps: PriceCaps | None = None
    ) -> Completion:
        """One non-streaming request; returns after the receipt verified."""
        if body.get("stream"):
            raise InvalidRequest("complete() is for non-streaming requests; use stream()")
        stream = self.stream(endpoint, body, caps, _streaming=False)
        response: dict[str, Any] | None = None
        async with stream:
            async for chunk in stream:
                if response is not None:
                    raise ResponseTampered("more than one response object for a non-stream job")
                response = chunk
        if response is None or stream.receipt is None or stream.usage is None:
            raise ReceiptRejected("the node delivered no response")
        response["usage"] = {**(response.get("usage") or {}), **stream.usage}
        return Completion(response=response, receipt=stream.receipt, job_id=stream.job_id)

    def stream(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        caps: PriceCaps | None = None,
        *,
        _streaming: bool = True,
    ) -> CompletionStream:
        """One streaming request: iterate the returned object for OpenAI chunks."""
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"unsupported endpoint {endpoint!r}")
        if _streaming and body.get("stream") is not True:
            raise InvalidRequest('stream() needs a request with "stream": true')
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("a request names its model", param="model")
        result = CompletionStream(_agen=_empty())
        result._agen = self._relay(endpoint, body, caps or self.caps, result, _streaming)
        return result

    async def chat_completions(self, **body: Any) -> Completion | CompletionStream:
        if body.get("stream"):
            return self.stream("chat/completions", body)
        return await self.complete("chat/completions", body)

    async def completions(self, **body: Any) -> Completion | CompletionStream:
        if body.get("stream"):
            return self.stream("completions", body)
        return await self.complete("completions", body)

    # -- routing and attestation ------------------------------------------------------

    async def _route(self, model: str, caps: PriceCaps) -> tuple[RouteResponse, bool]:
        key = (model, caps.prompt, caps.completion)
        now = time.monotonic()
        cached = self._routes.get(key)
        if cached is not None and cached.expires > now:
            return cached.value, True
        inflight = self._route_fetches.get(key)
        if inflight is None:  # one fetch per key, however many requests wait for it
            inflight = asyncio.ensure_future(self._fetch_route(key, model, caps))
            self._route_fetches[key] = inflight
            inflight.add_done_callback(lambda done: self._route_fetched(key, done))
        return await asyncio.shield(inflight), False

    def _route_fetched(self, key: tuple[str, int, int], done: asyncio.Future[Any]) -> None:
        self._route_fetches.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here: the waiters may all have gone

    async def _fetch_route(
        self, key: tuple[str, int, int], model: str, caps: PriceCaps
    ) -> RouteResponse:
        payload = {
            "model": model,
            "max_price_prompt": caps.prompt,
            "max_price_completion": caps.completion,
        }
        try:
            async with self.session.post(f"{self.matcher_url}/v1/route", json=payload) as resp:
                if resp.status != 200:
                    raise await _matcher_error(resp, "routing failed")
                route = RouteResponse.model_validate_json(await resp.read())
        except aiohttp.ClientError as e:
            raise MatcherError(f"matcher unreachable: {e}", status=503) from e
        except ValueError as e:
            raise MatcherError(f"matcher sent a malformed route: {e}", status=502) from e
        if route.ttl_seconds > 0:
            self._routes[key] = _Cached(route, time.monotonic() + route.ttl_seconds)
        return route

    def _forget_route(self, model: str, caps: PriceCaps) -> None:
        self._routes.pop((model, caps.prompt, caps.completion), None)

    async def _verified_x25519(self, candidate: RouteCandidate) -> bytes:
        doc = candidate.attestation
        if candidate.node_id != doc.ed25519_public:
            raise AttestationError("node id is not the attested ed25519 key")
        key = (doc.kind, doc.ed25519_public, doc.x25519_public)
        now = time.monotonic()
        cached = self._attested.get(key)
        if cached is not None and cached.expires > now:
            verified = cached.value
        else:
            verified = verify_attestation(doc, self.policy)
            self._attested[key] = _Cached(verified, now + ATTESTATION_CACHE_SECONDS)
        if self.allowlists is not None:  # asked every time: its own cache follows revocations
            try:
                allowed = await self.allowlists.image_allowed(verified.measurement)
            except AllowlistUnavailable as e:
                raise AttestationError(str(e)) from e
            if not allowed:
                raise AttestationError(
                    f"the Registry does not allow the image {image_hash(verified.measurement):064x}"
                )
        return verified.x25519_public

    async def _prepare_copies(
        self,
        route: RouteResponse,
        endpoint: str,
        body: dict[str, Any],
        model: str,
        caps: PriceCaps,
        job_id: bytes,
    ) -> list[_Copy]:
        copies: list[_Copy] = []
        rejected: list[str] = []
        unattested = 0
        for candidate in route.candidates:
            offer = candidate.offer
            if offer.id != model:
                rejected.append(f"{candidate.node_id[:12]}: offers {offer.id!r}")
                continue
            if offer.price_prompt > caps.prompt or offer.price_completion > caps.completion:
                rejected.append(f"{candidate.node_id[:12]}: price above the cap")
                continue
            try:
                x25519_public = await self._verified_x25519(candidate)
            except (AttestationError, ValueError) as e:
                log.warning("node %s: attestation rejected: %s", candidate.node_id[:16], e)
                rejected.append(f"{candidate.node_id[:12]}: {e}")
                unattested += 1
                continue
            response_key = new_response_key()
            plaintext = json.dumps(
                {
                    "endpoint": endpoint,
                    "body": body,
                    "response_key": response_key.hex(),
                    "escrow": self.escrow_str,
                    "max_price_prompt": caps.prompt,
                    "max_price_completion": caps.completion,
                },
                separators=(",", ":"),
            ).encode()
            sealed = seal_request(x25519_public, job_id, plaintext)
            copies.append(
                _Copy(
                    node_id=candidate.node_id,
                    ed25519_public=bytes.fromhex(candidate.attestation.ed25519_public),
                    offer=offer,
                    request_hash=request_hash(sealed),
                    opener=ResponseOpener(response_key, job_id),
                    sealed_b64=base64.b64encode(sealed).decode(),
                )
            )
            if len(copies) >= self.fanout:
                break
        if not copies:
            if not route.candidates:
                raise MatcherError("no node serves this model now", status=503, code="no_nodes")
            reasons = "; ".join(rejected)
            if unattested:
                raise AttestationRejected(
                    f"no candidate node has an acceptable attestation: {reasons}"
                )
            raise MatcherError(
                f"the matcher offered no node within this request's caps: {reasons}",
                status=402,
                error_type="invalid_request_error",
                code="price_cap_too_low",
            )
        return copies

    # -- the relay --------------------------------------------------------------------

    async def _relay(
        self,
        endpoint: str,
        body: dict[str, Any],
        caps: PriceCaps,
        result: CompletionStream,
        streaming: bool,
    ) -> AsyncIterator[dict[str, Any]]:
        model: str = body["model"]
        include_usage = bool(
            streaming
            and isinstance(body.get("stream_options"), dict)
            and body["stream_options"].get("include_usage")
        )
        for attempt in range(2):
            route, cached = await self._route(model, caps)
            job_id = new_job_id()
            result.job_id = job_id.hex()
            copies = await self._prepare_copies(route, endpoint, body, model, caps, job_id)
            job = _JobState(job_id=job_id, copies=copies)
            by_node = {c.node_id.lower(): c for c in copies}
            hashes = {node_id: c.request_hash for node_id, c in by_node.items()}
            authorization = relay_message(job_id, self.escrow_str, model, hashes)
            relay = {
                "job_id": job_id.hex(),
                "model": model,
                "escrow": self.escrow_str,
                "sealed": {node_id: c.sealed_b64 for node_id, c in by_node.items()},
                "signature": self._spend_key.sign(authorization).hex(),
            }
            try:
                resp = await self.session.post(
                    f"{self.matcher_url}/v1/relay",
                    data=json.dumps(relay, separators=(",", ":")).encode(),
                    headers={"Content-Type": "application/json"},
                )
            except aiohttp.ClientError as e:
                self._forget_route(model, caps)
                if cached and attempt == 0:
                    continue
                raise MatcherError(f"matcher unreachable: {e}", status=503) from e
            if resp.status != 200:
                error = await _matcher_error(resp, "relay refused")
                resp.release()
                self._forget_route(model, caps)
                if cached and attempt == 0 and error.status >= 500:
                    continue
                raise error
            retry = False
            usage_mode = ("include" if include_usage else "strip") if streaming else "keep"
            frames = self._frames(resp, job, body, caps, result, usage_mode)
            try:
                async for item in frames:
                    if item is None:  # failed before any byte: a fresh route may help
                        self._forget_route(model, caps)
                        if cached and attempt == 0:
                            retry = True
                            break
                        continue  # the frames raise the relay error next
                    yield item
            finally:
                await frames.aclose()
                resp.close()
                if not job.paid and job.serving is not None and job.last_usage is not None:
                    # broken or abandoned mid-stream: pay for what was received
                    self._pay_partial(job)
            if not retry:
                return
        raise RelayFailed("no node could take the job", status=503)  # pragma: no cover

    async def _frames(
        self,
        resp: aiohttp.ClientResponse,
        job: _JobState,
        body: dict[str, Any],
        caps: PriceCaps,
        result: CompletionStream,
        usage_mode: str,
    ) -> AsyncIterator[dict[str, Any] | None]:
        try:
            async for item in self._frames_checked(resp, job, body, caps, result, usage_mode):
                yield item
        except (ResponseTampered, ReceiptRejected):
            job.paid = True  # an integrity failure: nothing is owed for this transcript
            raise

    async def _frames_checked(
        self,
        resp: aiohttp.ClientResponse,
        job: _JobState,
        body: dict[str, Any],
        caps: PriceCaps,
        result: CompletionStream,
        usage_mode: str,
    ) -> AsyncIterator[dict[str, Any] | None]:
        """``usage_mode``: "keep" (a non-streaming response), "include" (a stream that
        asked for usage: null on content chunks, a final usage chunk) or "strip"."""
        decoder = FrameDecoder()
        end: EndFrame | None = None
        upstream_error: ImagoError | None = None
        relay_error: ImagoError | None = None
        usage_chunk: dict[str, Any] | None = None
        last_chunk: dict[str, Any] | None = None
        delivered = False
        try:
            async for data in resp.content.iter_any():
                for frame_type, payload in decoder.feed(data):
                    if end is not None or relay_error is not None:
                        raise ResponseTampered("a frame arrived after the end of the stream")
                    if frame_type is FrameType.END:
                        try:
                            end = EndFrame.model_validate_json(payload)
                        except ValueError as e:
                            raise ResponseTampered(f"malformed END frame: {e}") from e
                        continue
                    if frame_type is FrameType.RELAY_ERROR:
                        relay_error = _relay_error(payload)
                        continue
                    plaintext = self._open(job, frame_type, payload)
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
        except aiohttp.ClientError as e:
            if end is None and relay_error is None:
                relay_error = RelayFailed(f"the response stream broke: {e}", status=502)
        except EnvelopeError as e:
            raise ResponseTampered(str(e)) from e
        if decoder.pending and relay_error is None:
            relay_error = RelayFailed("the response stream ended inside a frame", status=502)
        if relay_error is not None:
            if job.serving is None and not delivered:
                if upstream_error is not None:
                    raise upstream_error
                yield None  # nothing was served: the caller may retry on a fresh route
                raise relay_error
            self._pay_partial(job)
            raise relay_error
        if end is None:
            if job.serving is None and upstream_error is None:
                raise RelayFailed("the stream ended without a response", status=502)
            self._pay_partial(job)
            raise RelayFailed("the stream ended before the node's receipt", status=502)
        if end.receipt is None:
            job.paid = True  # the node says nothing was served
            if upstream_error is not None:
                raise upstream_error
            raise ReceiptRejected("the node served the job but sent no receipt")
        if job.serving is None:
            job.paid = True
            raise ReceiptRejected("a receipt for a job that delivered nothing")
        verified = self._check_receipt(end, job, body["model"], caps)
        job.paid = True
        self._spend(verified.amount, job.job_id.hex())
        r = verified.receipt
        usage = {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
            "cost_nanoton": r.amount,
            "imago_receipt": verified.as_usage_extension(),
        }
        result.receipt = verified
        result.usage = usage
        result.cost_nanoton = r.amount
        if upstream_error is not None:
            raise upstream_error
        if usage_mode == "include":
            final = usage_chunk or _synthesize_usage_chunk(last_chunk)
            final["choices"] = []
            final["usage"] = {**(final.get("usage") or {}), **usage}
            yield final

    def _open(self, job: _JobState, frame_type: FrameType, payload: bytes) -> bytes:
        if job.serving is not None:
            return job.serving.opener.open(frame_type, payload)
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

    def _check_receipt(
        self, end: EndFrame, job: _JobState, model: str, caps: PriceCaps
    ) -> VerifiedReceipt:
        node = job.serving
        assert node is not None  # checked by the caller
        expected = Expected(
            global_id=self.global_id,
            node_id=node.node_id,
            node_ed25519=node.ed25519_public,
            job_id=job.job_id,
            escrow=self.escrow,
            model=model,
            offer=node.offer,
            caps=caps,
            request_hash=node.request_hash,
            transcript_hash=node.opener.transcript_hash,
            usage=job.last_usage,
        )
        try:
            return verify_receipt(end, expected)
        except ReceiptRejected as e:
            log.warning("job %s: %s", job.job_id.hex(), e.message)
            raise

    # -- paying -----------------------------------------------------------------------

    def _pay_partial(self, job: _JobState) -> None:
        """Pay for the tokens received (the last usage opened), priced at the offer."""
        job.paid = True
        if job.serving is None or job.last_usage is None:
            return
        prompt, completion = job.last_usage
        offer = job.serving.offer
        amount = cost_nanoton(prompt, completion, offer.price_prompt, offer.price_completion)
        log.info("job %s broke mid-stream: paying %d nanoTON", job.job_id.hex(), amount)
        self._spend(amount, job.job_id.hex())

    def _spend(self, amount: int, job_id: str) -> None:
        self._ledger.add(amount, job_id)  # journaled now; snapshotted before any voucher
        self._wake_vouchers()

    def _wake_vouchers(self) -> None:
        self._voucher_idle.clear()
        self._voucher_wakeup.set()

    async def _voucher_loop(self) -> None:
        backoff = 0.1
        while True:
            await self._voucher_wakeup.wait()
            self._voucher_wakeup.clear()
            ledger = self._ledger
            while ledger.cumulative > ledger.posted or ledger.pending_jobs:
                snapshot = ledger.snapshot()
                # durable (fsync) before any voucher for this cumulative exists
                await asyncio.to_thread(ledger.save, snapshot)
                cumulative, job_ids = snapshot["cumulative"], snapshot["pending_jobs"]
                if await self._post_voucher(cumulative, job_ids):
                    ledger.acknowledge(cumulative, job_ids)
                    backoff = 0.1
                    self.last_voucher_error = None
                    if self.voucher_interval > 0 and not self._flushing:
                        await asyncio.sleep(self.voucher_interval)  # let spends coalesce
                else:
                    self._voucher_idle.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, VOUCHER_BACKOFF_MAX)
            self._voucher_idle.set()

    async def _post_voucher(self, cumulative: int, job_ids: list[str]) -> bool:
        voucher = SpendVoucher(
            global_id=self.global_id, escrow=self.escrow, vault=self.vault, cumulative=cumulative
        )
        submission = {
            "voucher": base64.b64encode(voucher.to_boc()).decode(),
            "signature": voucher.sign(self._spend_key).hex(),
            "spend_public": self.spend_public.hex(),
            "job_ids": job_ids,
        }
        try:
            async with self.session.post(
                f"{self.matcher_url}/v1/vouchers", json=submission
            ) as resp:
                if resp.status == 200:
                    return True
                if resp.status == 409 and await _already_holds(resp):
                    # An earlier post reached the matcher but its answer was lost: the
                    # matcher holds a voucher of ours at or above this cumulative.
                    return True
                self.last_voucher_error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
        except (aiohttp.ClientError, TimeoutError) as e:
            self.last_voucher_error = f"matcher unreachable: {e}"
        log.warning("voucher for %d not accepted yet: %s", cumulative, self.last_voucher_error)
        return False


# -- helpers ------------------------------------------------------------------------------


async def _empty() -> AsyncIterator[dict[str, Any]]:  # pragma: no cover - placeholder
    return
    yield


async def _already_holds(resp: aiohttp.ClientResponse) -> bool:
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        return False
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and error.get("code") == "voucher_not_increasing"


async def _matcher_error(resp: aiohttp.ClientResponse, what: str) -> ImagoError:
    try:
        data = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        data = {"message": f"{what}: HTTP {resp.status}"}
    return MatcherError.from_error_json(resp.status, data, f"{what}: HTTP {resp.status}")


def _relay_error(payload: bytes) -> RelayFailed:
    try:
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        return RelayFailed("the relay failed (unreadable RELAY_ERROR frame)", status=502)
    status = data.get("status")
    if not isinstance(status, int) or not 400 <= status <= 599:
        status = 502
    error = RelayFailed.from_error_json(status, data, "the relay failed")
    assert isinstance(error, RelayFailed)
    return error


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
    error = UpstreamError.from_error_json(status, data, "the node reported an error")
    assert isinstance(error, UpstreamError)
    return error


def _data_chunk(plaintext: bytes, job: _JobState) -> dict[str, Any]:
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
