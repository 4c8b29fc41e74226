"""The Registry's allowlists as the matcher and the client read them: which attested
images and which models may get traffic.

Governance allows and revokes both on-chain (`imago registry allow-image|allow-model`);
an image is ``image_hash(measurement)``, a model ``model_hash(model id)``. Each getter
answer is kept for ``ttl_s`` per hash, so status polls of thousands of nodes every few
seconds cost one getter call per image or model and TTL, not one per node and poll; a
revocation therefore takes effect within one TTL of a poll (models), at the matcher's
next re-attestation (images; the client asks per request, so within one TTL).
Admission asks ``fresh``: it re-reads answers older than FRESH_S, so a node registering
just after governance allowed its model is not refused for a TTL on an old answer, while
a burst of admissions (a restart) still shares reads.

When the chain does not answer, the last answer stands (a healthy node is not evicted
by an outage) and the read is retried after ``retry_s`` (at most the TTL). With no
answer at all, ``AllowlistUnavailable`` lets the caller decide: admission refuses, a
poll leaves the model out until the chain answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import aiohttp
from pytoniq_core import Address

from contracts.chain.getters import GetterError, is_image_allowed, is_model_allowed
from contracts.chain.results import ToncenterError
from contracts.chain.toncenter import ToncenterClient
from protocol.attestation import image_hash
from protocol.signed import model_hash

__all__ = ["ALLOWLIST_TTL_S", "AllowlistUnavailable", "Allowlists"]

log = logging.getLogger(__name__)

ALLOWLIST_TTL_S = 30.0
FRESH_S = 2.0  # the oldest answer admission takes
RETRY_S = 5.0  # after a failed read, so that an outage is not hammered by every poll
MAX_ENTRIES = 10_000  # model ids come from nodes: bound what they can make us remember
MAX_MODELS_PER_NODE = 64  # and how many getter calls one node's status can cost

Kind = Literal["image", "model"]


class AllowlistUnavailable(Exception):
    """The Registry could not be read and no earlier answer is known."""


@dataclass
class _Answer:
    allowed: bool
    read_at: float  # of the last read that succeeded
    retry_at: float = 0.0  # after a failed read, the chain is not asked again before this


class Allowlists:
    def __init__(
        self,
        chain: ToncenterClient,
        registry: str,
        *,
        ttl_s: float = ALLOWLIST_TTL_S,
        retry_s: float = RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chain = chain
        self.registry = Address(registry)
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.clock = clock
        self._answers: dict[tuple[Kind, int], _Answer] = {}  # oldest read first
        self._reading: dict[tuple[Kind, int], asyncio.Future[bool]] = {}

    async def image_allowed(self, measurement: bytes, *, fresh: bool = False) -> bool:
        """Whether the Registry allows the image of this verified measurement."""
        return await self._allowed("image", image_hash(measurement), fresh)

    async def model_allowed(self, model_id: str, *, fresh: bool = False) -> bool:
        return await self._allowed("model", model_hash(model_id), fresh)

    async def allowed_models(self, model_ids: Iterable[str], *, admission: bool) -> frozenset[str]:
        """The ids among ``model_ids`` the Registry allows. At ``admission`` the answers
        are fresh and an id the chain has never answered for raises
        AllowlistUnavailable; otherwise such an id counts as not allowed (for now)."""
        unique = list(dict.fromkeys(model_ids))
        if len(unique) > MAX_MODELS_PER_NODE:
            log.warning(
                "a node offers %d models; only the first %d are considered",
                len(unique),
                MAX_MODELS_PER_NODE,
            )
            unique = unique[:MAX_MODELS_PER_NODE]
        answers = await asyncio.gather(
            *(self.model_allowed(m, fresh=admission) for m in unique), return_exceptions=True
        )
        allowed: set[str] = set()
        for model_id, answer in zip(unique, answers, strict=True):
            if isinstance(answer, AllowlistUnavailable):
                if admission:
                    raise answer
            elif isinstance(answer, BaseException):
                raise answer
            elif answer:
                allowed.add(model_id)
        return frozenset(allowed)

    async def _allowed(self, kind: Kind, value: int, fresh: bool) -> bool:
        key = (kind, value)
        answer = self._answers.get(key)
        if answer is not None:
            now = self.clock()
            max_age = min(FRESH_S, self.ttl_s) if fresh else self.ttl_s
            if now - answer.read_at < max_age or now < answer.retry_at:
                return answer.allowed
        reading = self._reading.get(key)
        if reading is None:
            # One read per hash however many nodes ask at once; shielded so that a
            # cancelled caller does not cancel the others' read.
            reading = asyncio.ensure_future(self._read(kind, value))
            self._reading[key] = reading
            reading.add_done_callback(lambda done: self._read_done(key, done))
        return await asyncio.shield(reading)

    def _read_done(self, key: tuple[Kind, int], done: asyncio.Future[bool]) -> None:
        self._reading.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: every awaiter may have been cancelled meanwhile

    async def _read(self, kind: Kind, value: int) -> bool:
        key = (kind, value)
        getter = is_image_allowed if kind == "image" else is_model_allowed
        try:
            allowed = await getter(self.chain, self.registry, value)
        except (GetterError, ToncenterError, aiohttp.ClientError, TimeoutError, ValueError) as e:
            now = self.clock()
            answer = self._answers.get(key)
            if answer is None:
                raise AllowlistUnavailable(
                    f"cannot read the {kind} allowlist of the Registry {self.registry.to_str()} "
                    f"for {value:064x}: {e}"
                ) from e
            log.warning(
                "cannot read the %s allowlist for %064x (%s); keeping the answer of %.0f s ago",
                kind,
                value,
                e,
                now - answer.read_at,
            )
            answer.retry_at = now + min(self.retry_s, self.ttl_s)
            return answer.allowed
        now = self.clock()
        previous = self._answers.pop(key, None)
        if previous is not None and previous.allowed != allowed:
            log.info(
                "registry: %s %064x is now %s", kind, value, "allowed" if allowed else "revoked"
            )
        self._answers[key] = _Answer(allowed, now)
        while len(self._answers) > MAX_ENTRIES:
            del self._answers[next(iter(self._answers))]
        return allowed
