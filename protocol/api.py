"""Typed JSON bodies exchanged between client, matcher and node (see docs/protocol.md).

Binary values travel as lowercase hex (keys, ids, hashes) or base64 (BOCs, quotes,
sealed blobs). Prices are nanoTON per million tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AttestationDoc",
    "EndFrame",
    "ErrorBody",
    "ErrorResponse",
    "MatcherTicketKey",
    "ModelOffer",
    "NodeIdentity",
    "NodeRegistration",
    "NodeStatus",
    "RelayRequest",
    "RouteCandidate",
    "RouteRequest",
    "RouteResponse",
    "SealedRequest",
    "StreamUsage",
    "VoucherSubmission",
    "registration_message",
    "relay_message",
]

Hex32 = str  # 64 hex chars
Hex64 = str  # 128 hex chars


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttestationDoc(_Model):
    """Evidence that ``ed25519_public`` and ``x25519_public`` live in an attested TEE.

    ``report_data`` of the evidence is SHA-512(b"imago-attest/v1" || ed25519_public ||
    x25519_public || nonce); see protocol.attestation.
    """

    kind: Literal["tdx", "dev"]
    ed25519_public: Hex32
    x25519_public: Hex32
    nonce: Hex32
    evidence: str  # base64: a TDX quote, or the dev statement
    collateral: dict | None = None  # DCAP collateral (public), so clients verify offline
    issued_at: int


class ModelOffer(_Model):
    id: str
    price_prompt: int = Field(ge=0)
    price_completion: int = Field(ge=0)
    max_model_len: int | None = None


class NodeIdentity(_Model):
    ed25519_public: Hex32
    x25519_public: Hex32
    attestation_kind: Literal["tdx", "dev"]
    provider: str | None = None  # the Provider contract address, if registered


class NodeStatus(_Model):
    models: list[ModelOffer]
    hardware: str
    max_concurrent: int
    active_jobs: int
    healthy: bool
    engine: str


class NodeRegistration(_Model):
    """Node → matcher: ``POST /v1/nodes``. The matcher then attests the node itself.

    ``signature`` is the node key's ed25519 signature over ``registration_message``, so
    nobody but the node can point its identity at another URL (a proxy of their own).
    """

    url: str
    ed25519_public: Hex32
    signed_at: int = 0  # unix time; the matcher accepts a few minutes of skew
    signature: Hex64 | None = None

    def message(self) -> bytes:
        return registration_message(self.url, self.ed25519_public, self.signed_at)


def registration_message(url: str, ed25519_public: str, signed_at: int) -> bytes:
    return f"imago-register/v1\n{url}\n{ed25519_public.lower()}\n{signed_at}".encode()


class MatcherTicketKey(_Model):
    """Matcher → node: ``GET /v1/ticket-key``, the key the matcher signs tickets with."""

    ed25519_public: Hex32


class RouteRequest(_Model):
    model: str
    max_price_prompt: int = Field(ge=0)
    max_price_completion: int = Field(ge=0)


class RouteCandidate(_Model):
    node_id: str  # hex of the node's ed25519 key
    attestation: AttestationDoc
    offer: ModelOffer


class RouteResponse(_Model):
    candidates: list[RouteCandidate]
    ttl_seconds: float  # how long a client may reuse this ranking


class RelayRequest(_Model):
    """Client → matcher: ``POST /v1/relay``; sealed copies for one or more candidates.

    The matcher tries them in its current preferred order and fails over to the next
    one if a node fails before its first byte. ``signature`` is the escrow's spend key
    over ``relay_message``: with a chain, the matcher relays only for whoever can spend
    from the escrow named (else anyone naming a funded escrow is served, unpaid).
    """

    job_id: Hex32
    model: str
    escrow: str
    sealed: dict[str, str]  # node_id → base64 sealed request
    signature: Hex64 | None = None


def relay_message(
    job_id: bytes, escrow: str, model: str, request_hashes: Mapping[str, bytes]
) -> bytes:
    """What a relay request's signature covers: the job, the escrow (raw form), the model
    and every sealed copy (node id and the SHA-256 of the sealed bytes), so it fits no
    other job or body."""
    copies = b"".join(bytes.fromhex(node) + request_hashes[node] for node in sorted(request_hashes))
    return (
        b"imago/relay/v1\x00"
        + job_id
        + hashlib.sha256(escrow.encode()).digest()
        + hashlib.sha256(model.encode()).digest()
        + hashlib.sha256(copies).digest()
    )


class SealedRequest(_Model):
    """The plaintext inside the HPKE envelope (only the node reads it)."""

    endpoint: Literal["chat/completions", "completions"]
    body: dict
    response_key: Hex32
    escrow: str
    max_price_prompt: int
    max_price_completion: int


class StreamUsage(_Model):
    """Running token counts the node attaches to every sealed DATA frame."""

    prompt_tokens: int
    completion_tokens: int


class EndFrame(_Model):
    """Clear END frame: what the matcher meters and the client checks."""

    receipt: str | None  # base64 BOC of the Receipt cell; None when nothing was served
    signature: Hex64 | None
    prompt_tokens: int
    completion_tokens: int


class VoucherJob(_Model):
    """One job a voucher pays for, and what the client pays for it: its receipt's amount,
    or, for a stream cut short, the cost of what the client received."""

    job_id: Hex32
    amount: int = Field(ge=0, lt=1 << 120)


class VoucherSubmission(_Model):
    """Client → matcher: ``POST /v1/vouchers`` after checking a receipt. The jobs' amounts
    add up to what the voucher adds to the previous one the matcher holds."""

    voucher: str  # base64 BOC of the SpendVoucher cell
    signature: Hex64
    spend_public: Hex32
    jobs: list[VoucherJob] = Field(max_length=100_000)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error JSON, used by every party's HTTP API (built and read in
    protocol.errors)."""

    error: ErrorBody
