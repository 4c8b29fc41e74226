"""ImagoClient: the confidential request path, client side (docs/protocol.md, "Client").

Per request: a route from the matcher (cached for its ``ttl_seconds``), each candidate's
attestation verified here (once per node key; client.sdk.routing), the request sealed to
the top candidates with a fresh response key each (client.sdk.sealing), one ``POST
/v1/relay``, the frames opened in order and the node's receipt checked in full
(client.sdk.stream) before a cumulative spend voucher is signed and handed to the
matcher (client.sdk.vouchers).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from client.sdk.errors import (
    InvalidRequest,
    MatcherError,
    ReceiptRejected,
    RelayFailed,
    ResponseTampered,
    matcher_error,
)
from client.sdk.receipts import PriceCaps
from client.sdk.routing import Router
from client.sdk.sealing import relay_request, seal_copies
from client.sdk.stream import Completion, CompletionStream, JobState, ResponseReader, UsageMode
from client.sdk.vouchers import Vouchers
from contracts.chain.allowlists import Allowlists
from protocol.attestation import AttestationPolicy
from protocol.envelope import new_job_id
from protocol.signed import network_global_id

__all__ = ["Completion", "CompletionStream", "Endpoint", "ImagoClient"]

Endpoint = Literal["chat/completions", "completions"]
ENDPOINTS: frozenset[str] = frozenset({"chat/completions", "completions"})


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
        self._session = session
        self._own_session = session is None
        self._read_timeout = read_timeout
        self._router = Router(self.matcher_url, policy, allowlists)
        self._vouchers = Vouchers(
            global_id=self.global_id,
            matcher_url=self.matcher_url,
            escrow=self.escrow,
            vault=self.vault,
            spend_key=spend_key,
            state_path=state_path,
            session=lambda: self.session,
            interval=voucher_interval,
        )

    # -- lifetime ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10, sock_read=self._read_timeout
                ),
            )
        self._vouchers.start()

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Try to hand outstanding vouchers to the matcher, then stop."""
        await self._vouchers.close(flush_timeout)
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
        return self._vouchers.ledger.cumulative

    @property
    def acknowledged_spend(self) -> int:
        return self._vouchers.ledger.posted

    @property
    def last_voucher_error(self) -> str | None:
        return self._vouchers.last_error

    @property
    def voucher_interval(self) -> float:
        return self._vouchers.interval

    @voucher_interval.setter
    def voucher_interval(self, seconds: float) -> None:
        self._vouchers.interval = seconds

    async def flush_vouchers(self, timeout: float = 5.0) -> None:
        """Wait until the matcher holds a voucher for the whole cumulative spend."""
        await self._vouchers.flush(timeout)

    # -- public API -------------------------------------------------------------------

    async def models(self) -> dict[str, Any]:
        """The matcher's OpenAI model list (with Imago prices and node counts)."""
        try:
            async with self.session.get(f"{self.matcher_url}/v1/models") as resp:
                if resp.status != 200:
                    raise await matcher_error(resp, "listing models failed")
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
        usage_mode: UsageMode = ("include" if include_usage else "strip") if streaming else "keep"
        router = self._router
        for attempt in range(2):
            route, cached = await router.route(self.session, model, caps)
            job_id = new_job_id()
            result.job_id = job_id.hex()
            copies = await seal_copies(
                route,
                router.verified_x25519,
                endpoint=endpoint,
                body=body,
                model=model,
                caps=caps,
                job_id=job_id,
                escrow=self.escrow_str,
                fanout=self.fanout,
            )
            job = JobState(job_id=job_id, copies=copies)
            try:
                resp = await self.session.post(
                    f"{self.matcher_url}/v1/relay",
                    data=relay_request(job_id, model, self.escrow_str, copies, self._spend_key),
                    headers={"Content-Type": "application/json"},
                )
            except aiohttp.ClientError as e:
                router.forget(model, caps)
                if cached and attempt == 0:
                    continue
                raise MatcherError(f"matcher unreachable: {e}", status=503) from e
            if resp.status != 200:
                error = await matcher_error(resp, "relay refused")
                resp.release()
                router.forget(model, caps)
                if cached and attempt == 0 and error.status >= 500:
                    continue
                raise error
            retry = False
            reader = ResponseReader(
                job,
                model=model,
                caps=caps,
                escrow=self.escrow,
                global_id=self.global_id,
                usage_mode=usage_mode,
                result=result,
                pay=self._vouchers.spend,
            )
            chunks = reader.chunks(resp)
            try:
                async for item in chunks:
                    if item is None:  # failed before any byte: a fresh route may help
                        router.forget(model, caps)
                        if cached and attempt == 0:
                            retry = True
                            break
                        continue  # the frames raise the relay error next
                    yield item
            finally:
                await chunks.aclose()
                resp.close()
                if not job.paid and job.serving is not None and job.last_usage is not None:
                    # broken or abandoned mid-stream: pay for what was received
                    reader.pay_partial()
            if not retry:
                return
        raise RelayFailed("no node could take the job", status=503)  # pragma: no cover


async def _empty() -> AsyncIterator[dict[str, Any]]:  # pragma: no cover - placeholder
    return
    yield
