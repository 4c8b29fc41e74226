"""Admitted nodes: attestation at admission and on a schedule, status polling, and the
live measurements routing ranks by.

A node gets traffic only while its last attestation verified under the matcher's
policy and its last status poll (or relay) found it healthy. Attestation failures
remove it (it must register again); network failures only take it out of rotation
until a poll succeeds.

With a Registry, the attested image must be on its allowlist (at admission and at every
re-attestation), and a node offers only the models the Registry allows (filtered at
admission and at every status poll); a node with offers but none allowed is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import aiohttp
from pydantic import ValidationError
from pytoniq_core import Address
from yarl import URL

from contracts.chain.allowlists import Allowlists, AllowlistUnavailable
from marketplace.db import now_ms
from marketplace.ledger import Ledger
from marketplace.providers import ProviderBook, ProviderRejected, ProviderUnknown
from protocol.api import (
    AttestationDoc,
    ModelOffer,
    NodeIdentity,
    NodeRegistration,
    NodeStatus,
)
from protocol.attestation import (
    AttestationError,
    AttestationPolicy,
    VerifiedAttestation,
    image_hash,
    verify_attestation,
)

__all__ = ["AdmissionError", "NodeRegistry", "NodeState", "NodeStats"]

log = logging.getLogger(__name__)

EWMA = 0.2  # weight of the newest sample
UNHEALTHY_AFTER_POLL_FAILURES = 2
MAX_PARALLEL_CHECKS = 64


# Refusals that say the node itself is unfit (not that it or the chain was unreachable):
# the node is recorded rejected and leaves the registry until it registers again.
REJECTING_CODES = frozenset(
    {"attestation_failed", "image_not_allowed", "model_not_allowed", "provider_rejected"}
)


class AdmissionError(Exception):
    """The node was not admitted; the message says why, ``status`` is the HTTP answer."""

    def __init__(self, message: str, code: str = "attestation_failed", status: int = 403) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class NodeStats:
    """What the matcher measured itself (EWMA) and the relays it has open right now."""

    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    success: float = 1.0
    inflight: int = 0
    relayed: int = 0

    def record_success(self, ttft_ms: float, duration_ms: float, completion_tokens: int) -> None:
        self.relayed += 1
        self.success += EWMA * (1.0 - self.success)
        self.ttft_ms = (
            ttft_ms if self.ttft_ms is None else self.ttft_ms + EWMA * (ttft_ms - self.ttft_ms)
        )
        generation_s = (duration_ms - ttft_ms) / 1000.0
        if completion_tokens > 1 and generation_s > 0.001:
            rate = completion_tokens / generation_s
            self.tokens_per_s = (
                rate
                if self.tokens_per_s is None
                else self.tokens_per_s + EWMA * (rate - self.tokens_per_s)
            )

    def record_failure(self) -> None:
        self.relayed += 1
        self.success -= EWMA * self.success


def _raw_address(address: str | None) -> str | None:
    if not address:
        return None
    try:
        return Address(address).to_str(is_user_friendly=False)
    except Exception:  # noqa: BLE001 - pytoniq raises bare errors; an odd name stays as is
        return address


@dataclass
class NodeState:
    node_id: str
    url: str
    identity: NodeIdentity
    attestation: AttestationDoc
    verified: VerifiedAttestation
    status: NodeStatus
    healthy: bool = True
    poll_failures: int = 0
    attested_at: float = field(default_factory=time.time)
    stats: NodeStats = field(default_factory=NodeStats)
    offers: dict[str, ModelOffer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.set_status(self.status)
        self.public = bytes.fromhex(self.node_id)
        self.jobs_url = URL(f"{self.url}/v1/jobs")

    def set_status(self, status: NodeStatus, allowed: Collection[str] | None = None) -> None:
        """Take a status; only the models in ``allowed`` (None: all) are offered."""
        self.status = status
        self.offers = {
            offer.id: offer for offer in status.models if allowed is None or offer.id in allowed
        }

    @property
    def load(self) -> float:
        """Share of the node's capacity in use: its own count plus relays we opened
        since it last reported (both counted, which errs towards spreading load)."""
        capacity = max(self.status.max_concurrent, 1)
        return (self.status.active_jobs + self.stats.inflight) / capacity

    @property
    def routable(self) -> bool:
        return self.healthy and self.status.healthy


async def _check_image(
    allowlists: Allowlists, verified: VerifiedAttestation, *, fresh: bool
) -> None:
    try:
        allowed = await allowlists.image_allowed(verified.measurement, fresh=fresh)
    except AllowlistUnavailable as e:
        raise AdmissionError(str(e), "chain_unavailable", 503) from e
    if not allowed:
        raise AdmissionError(
            f"the {verified.kind} image {image_hash(verified.measurement):064x} "
            f"(measurement {verified.measurement.hex()}) is not allowed on the Registry "
            "(governance: `imago registry allow-image`)",
            "image_not_allowed",
        )


class NodeRegistry:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        ledger: Ledger,
        policy: AttestationPolicy,
        *,
        timeout_s: float = 5.0,
        providers: ProviderBook | None = None,
        allowlists: Allowlists | None = None,
    ) -> None:
        if policy.allowed_measurements is None and allowlists is None:
            # None hands the TDX measurement check to us: without the Registry's
            # allowlist to check it against, any TD would pass.
            raise ValueError(
                "a policy without allowed TDX measurements needs the Registry's allowlists"
            )
        self.session = session
        self.ledger = ledger
        self.policy = policy
        self.providers = providers
        self.allowlists = allowlists
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.nodes: dict[str, NodeState] = {}
        self._admitting: dict[str, asyncio.Lock] = {}

    # --- node HTTP calls --------------------------------------------------------------

    async def _get_json(self, url: str) -> dict:
        async with self.session.get(url, timeout=self.timeout) as resp:
            if resp.status != 200:
                raise AdmissionError(f"{url} answered {resp.status}", "node_unreachable")
            return await resp.json(content_type=None)

    async def _attest(
        self, url: str, identity: NodeIdentity, *, admission: bool
    ) -> tuple[AttestationDoc, VerifiedAttestation]:
        nonce = os.urandom(32)
        async with self.session.post(
            f"{url}/v1/attest", json={"nonce": nonce.hex()}, timeout=self.timeout
        ) as resp:
            if resp.status != 200:
                raise AdmissionError(f"/v1/attest answered {resp.status}", "node_unreachable")
            doc = AttestationDoc.model_validate_json(await resp.read())
        if doc.ed25519_public != identity.ed25519_public or (
            doc.x25519_public != identity.x25519_public
        ):
            raise AdmissionError("the attestation binds other keys than the node's identity")
        if doc.kind != identity.attestation_kind:
            raise AdmissionError("the attestation kind differs from the node's identity")
        try:
            # dcap-qvl takes milliseconds: keep it off the event loop.
            verified = await asyncio.to_thread(verify_attestation, doc, self.policy, nonce)
        except AttestationError as e:
            raise AdmissionError(str(e)) from e
        if self.allowlists is not None:
            await _check_image(self.allowlists, verified, fresh=admission)
        if self.providers is not None:  # with a chain, the stake must back the attested key
            if identity.provider is None:
                raise AdmissionError("the node names no Provider contract", "provider_rejected")
            try:
                await self.providers.check(identity.provider, verified.ed25519_public)
            except ProviderRejected as e:
                raise AdmissionError(str(e), "provider_rejected") from e
            except ProviderUnknown as e:
                raise AdmissionError(str(e), "chain_unavailable", 503) from e
        return doc, verified

    async def _allowed_models(
        self, status: NodeStatus, *, admission: bool
    ) -> frozenset[str] | None:
        """The offered models the Registry allows; None without a Registry (all)."""
        if self.allowlists is None:
            return None
        try:
            return await self.allowlists.allowed_models(
                (offer.id for offer in status.models), admission=admission
            )
        except AllowlistUnavailable as e:
            raise AdmissionError(str(e), "chain_unavailable", 503) from e

    # --- admission --------------------------------------------------------------------

    async def admit(self, registration: NodeRegistration) -> NodeState:
        url = registration.url.rstrip("/")
        node_id = registration.ed25519_public.lower()
        lock = self._admitting.setdefault(node_id, asyncio.Lock())
        async with lock:
            try:
                identity = NodeIdentity.model_validate(await self._get_json(f"{url}/v1/identity"))
                if identity.ed25519_public.lower() != node_id:
                    raise AdmissionError("the node's identity is not the registered key")
                status = NodeStatus.model_validate(await self._get_json(f"{url}/v1/status"))
                doc, verified = await self._attest(url, identity, admission=True)
                allowed = await self._allowed_models(status, admission=True)
                if allowed is not None and status.models and not allowed:
                    offered = ", ".join(sorted({offer.id for offer in status.models}))
                    raise AdmissionError(
                        f"none of the node's models ({offered}) is allowed on the Registry "
                        "(governance: `imago registry allow-model`)",
                        "model_not_allowed",
                    )
            except AdmissionError as e:
                if e.code in REJECTING_CODES:
                    self._save_rejected(node_id, url, str(e))
                raise
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise AdmissionError(
                    f"cannot reach the node at {url}: {e!r}", "node_unreachable"
                ) from e
            except (ValidationError, ValueError) as e:
                raise AdmissionError(f"the node answered malformed JSON: {e}", "bad_node") from e
            node = NodeState(node_id, url, identity, doc, verified, status)
            node.set_status(status, allowed)
            previous = self.nodes.get(node_id)
            if previous is not None:  # a re-registration keeps what was measured
                node.stats = previous.stats
            self.nodes[node_id] = node
            self._save(node, "admitted", admitted=True)
            log.info("admitted node %s at %s (%s)", node_id[:16], url, doc.kind)
            return node

    def _save(self, node: NodeState, state: str, reason: str = "", admitted=False) -> None:
        fields = {
            "node_id": node.node_id,
            "url": node.url,
            "x25519_public": node.identity.x25519_public,
            "attestation_kind": node.attestation.kind,
            "measurement": node.verified.measurement.hex(),
            "tcb_status": node.verified.tcb_status,
            "state": state,
            "reason": reason,
            "models": json.dumps([o.model_dump() for o in node.offers.values()]),
            "provider": _raw_address(node.identity.provider),
            "attested_at": int(node.attested_at * 1000),
        }
        if admitted:
            fields["admitted_at"] = now_ms()
        self.ledger.save_node(fields)

    def _save_rejected(self, node_id: str, url: str, reason: str) -> None:
        self.nodes.pop(node_id, None)
        self.ledger.save_node(
            {
                "node_id": node_id,
                "url": url,
                "x25519_public": "",
                "attestation_kind": "",
                "state": "rejected",
                "reason": reason[:500],
            }
        )

    async def readmit_known(self) -> int:
        """At start: attest again every node the database knows and did not reject, so
        that a restarted matcher (or a new replica) serves without waiting for nodes to
        register again. Returns how many were admitted."""
        from sqlalchemy import select

        from marketplace.db import NodeRecord

        table = NodeRecord.__table__
        rows = await self.ledger.call(
            lambda conn: conn.execute(
                select(table.c.node_id, table.c.url).where(table.c.state != "rejected")
            ).all()
        )
        admitted = 0

        async def one(node_id: str, url: str) -> None:
            nonlocal admitted
            if node_id in self.nodes:
                return
            try:
                await self.admit(NodeRegistration(url=url, ed25519_public=node_id))
                admitted += 1
            except AdmissionError as e:
                log.info("known node %s not re-admitted: %s", node_id[:16], e)

        semaphore = asyncio.Semaphore(MAX_PARALLEL_CHECKS)

        async def bounded(node_id: str, url: str) -> None:
            async with semaphore:
                await one(node_id, url)

        await asyncio.gather(*(bounded(node_id, url) for node_id, url in rows))
        return admitted

    # --- periodic checks (APScheduler jobs) -------------------------------------------

    async def _bounded(self, check, nodes: list[NodeState]) -> None:
        """Run ``check`` over ``nodes``, at most MAX_PARALLEL_CHECKS at a time."""
        semaphore = asyncio.Semaphore(MAX_PARALLEL_CHECKS)

        async def one(node: NodeState) -> None:
            async with semaphore:
                if self.session.closed:
                    return
                try:
                    await check(node)
                except Exception:  # one node's surprise must not stop the round
                    log.exception("check of node %s failed", node.node_id[:16])

        await asyncio.gather(*(one(node) for node in nodes))

    async def reattest_all(self) -> None:
        await self._bounded(self.reattest, list(self.nodes.values()))

    async def reattest(self, node: NodeState) -> None:
        try:
            doc, verified = await self._attest(node.url, node.identity, admission=False)
        except AdmissionError as e:
            if e.code in REJECTING_CODES:
                log.warning("node %s failed re-attestation: %s", node.node_id[:16], e)
                self._save_rejected(node.node_id, node.url, str(e))
            else:
                self.mark_unhealthy(node, str(e))
            return
        except (aiohttp.ClientError, TimeoutError, OSError, ValidationError, ValueError) as e:
            self.mark_unhealthy(node, f"re-attestation failed: {e!r}")
            return
        node.attestation, node.verified, node.attested_at = doc, verified, time.time()
        self._save(node, "admitted")

    async def poll_all(self) -> None:
        await self._bounded(self.poll, list(self.nodes.values()))

    async def poll(self, node: NodeState) -> None:
        try:
            status = NodeStatus.model_validate(await self._get_json(f"{node.url}/v1/status"))
        except (
            AdmissionError,
            aiohttp.ClientError,
            TimeoutError,
            OSError,
            ValidationError,
            ValueError,
        ) as e:
            node.poll_failures += 1
            if node.poll_failures >= UNHEALTHY_AFTER_POLL_FAILURES:
                self.mark_unhealthy(node, f"status poll failed: {e!r}")
            return
        node.poll_failures = 0
        # Cached answers; a model the chain has never answered for waits for its
        # answer, and an outage keeps the last answers, so the node keeps serving.
        allowed = await self._allowed_models(status, admission=False)
        before = node.offers
        node.set_status(status, allowed)
        offered = {offer.id for offer in status.models}
        revoked = [m for m in before if m not in node.offers and m in offered]
        if revoked:
            log.info("node %s: %s no longer allowed on the Registry", node.node_id[:16], revoked)
        if not node.healthy:
            node.healthy = True
            self._save(node, "admitted")
            log.info("node %s is healthy again", node.node_id[:16])
        elif node.offers != before:
            self._save(node, "admitted")

    def mark_unhealthy(self, node: NodeState, reason: str) -> None:
        if node.healthy:
            log.warning("node %s out of rotation: %s", node.node_id[:16], reason)
            node.healthy = False
            self._save(node, "unhealthy", reason[:500])

    # --- queries ----------------------------------------------------------------------

    def serving(self, model: str) -> list[NodeState]:
        return [n for n in self.nodes.values() if model in n.offers]

    def models(self) -> dict[str, list[tuple[NodeState, ModelOffer]]]:
        out: dict[str, list[tuple[NodeState, ModelOffer]]] = {}
        for node in self.nodes.values():
            if node.routable:
                for offer in node.offers.values():
                    out.setdefault(offer.id, []).append((node, offer))
        return out
