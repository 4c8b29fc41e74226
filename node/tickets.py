"""The matcher ticket keys a node trusts (see ``protocol.tickets``).

The node learns its matcher's key from the matcher URL it is configured with, before
each registration, or has it pinned (``--matcher-key``): then a different key from the
URL is refused. Until it knows a key it serves nothing. When the key changes (a
matcher restarted with a new one) the previous key stays accepted, so that tickets
already signed with it still pass; a ticket under no known key makes the node ask the
matcher again (at most every ``REFRESH_INTERVAL_S``) before it refuses the job.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from protocol.api import MatcherTicketKey
from protocol.tickets import TICKET_KEY_PATH, ticket_message

__all__ = ["REFRESH_INTERVAL_S", "MatcherKeys"]

log = logging.getLogger("imago.node.tickets")

REFRESH_INTERVAL_S = 1.0
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=5)


class MatcherKeys:
    """The current ticket key and the one before it, as parsed key objects."""

    def __init__(self, matcher_url: str | None, pinned: bytes | None = None) -> None:
        self._url = matcher_url.rstrip("/") + TICKET_KEY_PATH if matcher_url else None
        self.pinned = pinned
        self._keys: list[tuple[bytes, Ed25519PublicKey]] = []
        if pinned is not None:
            self._keys.append((pinned, Ed25519PublicKey.from_public_bytes(pinned)))
        self.session: aiohttp.ClientSession | None = None  # set while the app runs
        self._lock = asyncio.Lock()
        self._generation = 0  # counts key changes, so that waiters see a fetch they missed
        self._fetched_at = -REFRESH_INTERVAL_S

    @property
    def known(self) -> bool:
        return bool(self._keys)

    @property
    def current(self) -> bytes | None:
        return self._keys[0][0] if self._keys else None

    def learn(self, public: bytes) -> bool:
        """Trust ``public`` from now on; False if a pinned key forbids it."""
        if self.pinned is not None and public != self.pinned:
            return False
        if self.current != public:
            self._keys = [(public, Ed25519PublicKey.from_public_bytes(public)), *self._keys[:1]]
            self._generation += 1
        return True

    def valid(self, ticket: bytes, node_public: bytes, job_id: bytes, request_hash: bytes) -> bool:
        message = ticket_message(node_public, job_id, request_hash)
        for _, key in self._keys:
            try:
                key.verify(ticket, message)
            except InvalidSignature:
                continue
            return True
        return False

    async def verify(
        self, ticket: bytes, node_public: bytes, job_id: bytes, request_hash: bytes
    ) -> bool:
        """``valid``, or valid under a key the matcher has rotated to since."""
        if len(ticket) != 64:
            return False
        if self.valid(ticket, node_public, job_id, request_hash):
            return True
        if self.pinned is not None or not await self._refresh():
            return False
        return self.valid(ticket, node_public, job_id, request_hash)

    async def _refresh(self) -> bool:
        """Fetch the matcher's key unless fetched recently; True if the keys changed.

        One fetch at a time, and rate-limited: forged tickets must not become a flood
        of requests to the matcher."""
        generation = self._generation
        async with self._lock:
            if self._generation == generation and (
                time.monotonic() - self._fetched_at >= REFRESH_INTERVAL_S
            ):
                await self.update()
            return self._generation != generation

    async def update(self) -> bool:
        """Ask the matcher URL for its key and trust it; False (logged) if it could not be
        fetched or differs from the pinned key."""
        if self._url is None or self.session is None:
            return self.known
        self._fetched_at = time.monotonic()
        try:
            async with self.session.get(self._url, timeout=FETCH_TIMEOUT) as r:
                text = await r.text()
                if r.status != 200:
                    raise ValueError(f"{r.status}: {text[:200]}")
            public = bytes.fromhex(MatcherTicketKey.model_validate_json(text).ed25519_public)
            if len(public) != 32:
                raise ValueError("the key is not 32 bytes")
        except (aiohttp.ClientError, TimeoutError, ValueError, ValidationError) as e:
            log.warning("cannot fetch the matcher's ticket key from %s: %s", self._url, e)
            return False
        previous = self.current
        if not self.learn(public):
            log.error(
                "the matcher at %s signs tickets with %s, not the pinned --matcher-key %s: "
                "refusing it (not registering)",
                self._url,
                public.hex(),
                self.pinned.hex(),
            )
            return False
        if previous != public:
            log.info("matcher ticket key %s (from %s)", public.hex(), self._url)
        return True
