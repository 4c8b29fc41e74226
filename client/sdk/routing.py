"""Routes from the matcher and the attestations of their nodes, each cached.

A route is kept for the ``ttl_seconds`` the matcher gave it, and fetched once however
many requests wait for it. A node's attestation is verified here, once per node key
(for ``ATTESTATION_CACHE_SECONDS``); the Registry's image allowlist, when there is one,
is asked every time (its own cache follows revocations).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from client.sdk.errors import MatcherError, matcher_error
from client.sdk.receipts import PriceCaps
from contracts.chain.allowlists import Allowlists, AllowlistUnavailable
from protocol.api import RouteCandidate, RouteResponse
from protocol.attestation import (
    AttestationError,
    AttestationPolicy,
    image_hash,
    verify_attestation,
)

__all__ = ["ATTESTATION_CACHE_SECONDS", "Router"]

ATTESTATION_CACHE_SECONDS = 3600.0

_RouteKey = tuple[str, int, int]  # model, price caps


@dataclass(slots=True)
class _Cached:
    value: Any
    expires: float


class Router:
    """Routes from the matcher at ``matcher_url``; node attestations under ``policy``
    (and ``allowlists``, the Registry's, if given)."""

    def __init__(
        self, matcher_url: str, policy: AttestationPolicy, allowlists: Allowlists | None
    ) -> None:
        self.matcher_url = matcher_url
        self.policy = policy
        self.allowlists = allowlists
        self.routes: dict[_RouteKey, _Cached] = {}
        self._fetches: dict[_RouteKey, asyncio.Future[RouteResponse]] = {}
        self._attested: dict[tuple[str, str, str], _Cached] = {}

    async def route(
        self, session: aiohttp.ClientSession, model: str, caps: PriceCaps
    ) -> tuple[RouteResponse, bool]:
        """The route for ``model`` within ``caps``, and whether it came from the cache."""
        key = (model, caps.prompt, caps.completion)
        now = time.monotonic()
        cached = self.routes.get(key)
        if cached is not None and cached.expires > now:
            return cached.value, True
        inflight = self._fetches.get(key)
        if inflight is None:  # one fetch per key, however many requests wait for it
            inflight = asyncio.ensure_future(self._fetch(session, key, model, caps))
            self._fetches[key] = inflight
            inflight.add_done_callback(lambda done: self._fetched(key, done))
        return await asyncio.shield(inflight), False

    def forget(self, model: str, caps: PriceCaps) -> None:
        self.routes.pop((model, caps.prompt, caps.completion), None)

    def _fetched(self, key: _RouteKey, done: asyncio.Future[Any]) -> None:
        self._fetches.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here: the waiters may all have gone

    async def _fetch(
        self, session: aiohttp.ClientSession, key: _RouteKey, model: str, caps: PriceCaps
    ) -> RouteResponse:
        payload = {
            "model": model,
            "max_price_prompt": caps.prompt,
            "max_price_completion": caps.completion,
        }
        try:
            async with session.post(f"{self.matcher_url}/v1/route", json=payload) as resp:
                if resp.status != 200:
                    raise await matcher_error(resp, "routing failed")
                route = RouteResponse.model_validate_json(await resp.read())
        except aiohttp.ClientError as e:
            raise MatcherError(f"matcher unreachable: {e}", status=503) from e
        except ValueError as e:
            raise MatcherError(f"matcher sent a malformed route: {e}", status=502) from e
        if route.ttl_seconds > 0:
            self.routes[key] = _Cached(route, time.monotonic() + route.ttl_seconds)
        return route

    async def verified_x25519(self, candidate: RouteCandidate) -> bytes:
        """The candidate's X25519 key, once its attestation is accepted; AttestationError
        otherwise."""
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
