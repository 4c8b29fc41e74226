"""The sealed request: one copy per top candidate, and the relay request that carries them.

Each copy is the request sealed (HPKE) to one attested node under a fresh response key
of its own; the relay request names them all, signed with the escrow's spend key over
``api.relay_message``, so the matcher may fail over between them and nobody else can
spend from the escrow.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.sdk.errors import AttestationRejected, MatcherError
from client.sdk.receipts import PriceCaps
from protocol.api import ModelOffer, RouteCandidate, RouteResponse, relay_message
from protocol.attestation import AttestationError
from protocol.envelope import ResponseOpener, new_response_key, request_hash, seal_request

__all__ = ["Copy", "relay_request", "seal_copies"]

log = logging.getLogger("imago.client")


@dataclass(slots=True)
class Copy:
    """One candidate's sealed copy of a job."""

    node_id: str
    ed25519_public: bytes
    offer: ModelOffer
    request_hash: bytes
    opener: ResponseOpener
    sealed_b64: str


async def seal_copies(
    route: RouteResponse,
    verified_x25519: Callable[[RouteCandidate], Awaitable[bytes]],
    *,
    endpoint: str,
    body: dict[str, Any],
    model: str,
    caps: PriceCaps,
    job_id: bytes,
    escrow: str,
    fanout: int,
) -> list[Copy]:
    """The request sealed for the first ``fanout`` candidates that offer ``model``
    within ``caps`` and whose attestation ``verified_x25519`` accepts (it returns the
    X25519 key to seal to)."""
    copies: list[Copy] = []
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
            x25519_public = await verified_x25519(candidate)
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
                "escrow": escrow,
                "max_price_prompt": caps.prompt,
                "max_price_completion": caps.completion,
            },
            separators=(",", ":"),
        ).encode()
        sealed = seal_request(x25519_public, job_id, plaintext)
        copies.append(
            Copy(
                node_id=candidate.node_id,
                ed25519_public=bytes.fromhex(candidate.attestation.ed25519_public),
                offer=offer,
                request_hash=request_hash(sealed),
                opener=ResponseOpener(response_key, job_id),
                sealed_b64=base64.b64encode(sealed).decode(),
            )
        )
        if len(copies) >= fanout:
            break
    if not copies:
        if not route.candidates:
            raise MatcherError("no node serves this model now", status=503, code="no_nodes")
        reasons = "; ".join(rejected)
        if unattested:
            raise AttestationRejected(f"no candidate node has an acceptable attestation: {reasons}")
        raise MatcherError(
            f"the matcher offered no node within this request's caps: {reasons}",
            status=402,
            error_type="invalid_request_error",
            code="price_cap_too_low",
        )
    return copies


def relay_request(
    job_id: bytes, model: str, escrow: str, copies: list[Copy], spend_key: Ed25519PrivateKey
) -> bytes:
    """The body of ``POST /v1/relay`` (``api.RelayRequest``) for these copies."""
    by_node = {c.node_id.lower(): c for c in copies}
    hashes = {node_id: c.request_hash for node_id, c in by_node.items()}
    authorization = relay_message(job_id, escrow, model, hashes)
    relay = {
        "job_id": job_id.hex(),
        "model": model,
        "escrow": escrow,
        "sealed": {node_id: c.sealed_b64 for node_id, c in by_node.items()},
        "signature": spend_key.sign(authorization).hex(),
    }
    return json.dumps(relay, separators=(",", ":")).encode()
