"""Attestation evidence shared by the node (producer), the matcher and the client (verifiers).

Every attestation binds the node's two public keys and a verifier's nonce into the 64
bytes of report data the TEE signs::

    report_data = SHA-512(b"imago-attest/v1" || ed25519_public || x25519_public || nonce)

Two kinds of evidence:
- ``tdx``: an Intel TDX quote whose report_data is the above (verified with dcap-qvl).
- ``dev``: a software statement for the devnet only: ``b"IMAGO-DEV/v1" || report_data ||
  ed25519 signature`` by the node key over the first 76 bytes. It proves possession of
  the key, nothing about the machine, so verifiers accept it only in devnet mode.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from contracts.protocol.api import AttestationDoc

REPORT_DATA_DOMAIN = b"imago-attest/v1"
DEV_EVIDENCE_MAGIC = b"IMAGO-DEV/v1"
DEV_MEASUREMENT = hashlib.sha256(b"imago-dev-measurement").digest()


class AttestationError(ValueError):
    """Evidence that does not verify; the message says which check failed."""


def report_data(ed25519_public: bytes, x25519_public: bytes, nonce: bytes) -> bytes:
    if len(ed25519_public) != 32 or len(x25519_public) != 32 or len(nonce) != 32:
        raise AttestationError("keys and nonce are 32 bytes each")
    return hashlib.sha512(REPORT_DATA_DOMAIN + ed25519_public + x25519_public + nonce).digest()


def make_dev_evidence(node_key: Ed25519PrivateKey, data: bytes) -> bytes:
    statement = DEV_EVIDENCE_MAGIC + data
    return statement + node_key.sign(statement)


def verify_dev_evidence(
    evidence: bytes, ed25519_public: bytes, expected_report_data: bytes
) -> None:
    size = len(DEV_EVIDENCE_MAGIC) + 64 + 64
    if len(evidence) != size or not evidence.startswith(DEV_EVIDENCE_MAGIC):
        raise AttestationError("dev evidence is malformed")
    statement, signature = evidence[:-64], evidence[-64:]
    if statement[len(DEV_EVIDENCE_MAGIC) :] != expected_report_data:
        raise AttestationError("dev evidence: report_data does not match the keys and nonce")
    try:
        Ed25519PublicKey.from_public_bytes(ed25519_public).verify(signature, statement)
    except InvalidSignature as e:
        raise AttestationError("dev evidence: bad signature") from e


@dataclass(frozen=True)
class AttestationPolicy:
    """What a verifier accepts. ``allow_dev`` is true only on the devnet."""

    allow_dev: bool = False
    allowed_measurements: frozenset[bytes] = frozenset()  # TDX mr_td values
    accepted_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    now: int | None = None  # pin the verification time (tests); None = wall clock


@dataclass(frozen=True)
class VerifiedAttestation:
    kind: str
    measurement: bytes
    tcb_status: str
    ed25519_public: bytes
    x25519_public: bytes


def verify_attestation(
    doc: AttestationDoc, policy: AttestationPolicy, expected_nonce: bytes | None = None
) -> VerifiedAttestation:
    """Check that ``doc`` binds its keys (and ``expected_nonce``, if given) to a TEE
    the policy accepts. Raises AttestationError naming the failed check."""
    ed_public = bytes.fromhex(doc.ed25519_public)
    x_public = bytes.fromhex(doc.x25519_public)
    nonce = bytes.fromhex(doc.nonce)
    if expected_nonce is not None and nonce != expected_nonce:
        raise AttestationError("attestation nonce is not the verifier's")
    expected = report_data(ed_public, x_public, nonce)
    evidence = base64.b64decode(doc.evidence)
    if doc.kind == "dev":
        if not policy.allow_dev:
            raise AttestationError("dev attestation is accepted only on the devnet")
        verify_dev_evidence(evidence, ed_public, expected)
        return VerifiedAttestation("dev", DEV_MEASUREMENT, "Dev", ed_public, x_public)
    raise AttestationError(f"unsupported attestation kind {doc.kind!r}")
