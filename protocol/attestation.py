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
import hmac
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.api import AttestationDoc

REPORT_DATA_DOMAIN = b"imago-attest/v1"
DEV_EVIDENCE_MAGIC = b"IMAGO-DEV/v1"
DEV_MEASUREMENT = hashlib.sha256(b"imago-dev-measurement").digest()


def image_hash(measurement: bytes) -> int:
    """The 256-bit id of an attested image in the Registry's ``images`` allowlist.

    ``measurement`` is what verification returns: the 48-byte mr_td of a TDX quote, or
    DEV_MEASUREMENT for dev evidence. Hashing makes every TEE's measurement fit the
    contract's uint256 key, whatever its length.
    """
    return int.from_bytes(hashlib.sha256(measurement).digest(), "big")


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
    """What a verifier accepts. ``allow_dev`` is true only on the devnet.

    ``allowed_measurements`` lists the TDX mr_td values accepted; empty accepts none.
    None means the caller checks the returned measurement itself (the matcher and the
    client SDK, against the Registry's on-chain allowlist): a verifier that does not
    must never pass None, or it accepts any TD.
    """

    allow_dev: bool = False
    allowed_measurements: frozenset[bytes] | None = frozenset()
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
    if doc.kind == "tdx":
        if doc.collateral is None:
            raise AttestationError("tdx attestation carries no DCAP collateral")
        verified = verify_tdx_quote(
            evidence,
            doc.collateral,
            now=int(time.time()) if policy.now is None else policy.now,
            allowed_mr_td=policy.allowed_measurements,
            expected_report_data=expected,
            accepted_tcb_statuses=policy.accepted_tcb_statuses,
        )
        return VerifiedAttestation("tdx", verified.mr_td, verified.tcb_status, ed_public, x_public)
    raise AttestationError(f"unsupported attestation kind {doc.kind!r}")


# --- TDX ------------------------------------------------------------------------------

TD_ATTRIBUTES_DEBUG = 0x01  # bit 0 of td_attributes (little-endian): the TD is debuggable


@dataclass(frozen=True)
class VerifiedTdxQuote:
    """What a TDX quote proved, once every check passed."""

    tcb_status: str
    advisory_ids: tuple[str, ...]
    mr_td: bytes
    td_attributes: bytes
    report_data: bytes


def verify_tdx_quote(
    quote: bytes,
    collateral: dict,
    *,
    now: int,
    allowed_mr_td: frozenset[bytes] | None,
    expected_report_data: bytes,
    accepted_tcb_statuses: Iterable[str] = frozenset({"UpToDate"}),
) -> VerifiedTdxQuote:
    """Verify a TDX quote offline with dcap-qvl against its DCAP collateral at ``now``.

    Checks, in order, each failure raising a distinct AttestationError: the quote
    parses as TDX; its signature chain and the collateral verify and are valid at
    ``now``; the TCB status is accepted; the DEBUG bit of td_attributes is off; mr_td
    is allowlisted (``allowed_mr_td`` None: the caller checks the returned mr_td);
    report_data equals ``expected_report_data``.
    """
    import dcap_qvl  # a compiled extension: imported only where TDX is verified

    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
    except ValueError as e:
        raise AttestationError(f"tdx: quote does not parse: {e}") from e
    if not parsed.is_tdx():
        raise AttestationError("tdx: the quote is not a TDX quote")
    try:
        dcap_collateral = dcap_qvl.QuoteCollateralV3.from_json(json.dumps(collateral))
    except (TypeError, ValueError) as e:
        raise AttestationError(f"tdx: collateral is malformed: {e}") from e
    try:
        verified = dcap_qvl.verify(bytes(quote), dcap_collateral, int(now))
    except ValueError as e:
        reason = str(e)
        if "Expired" in reason or "NotYetValid" in reason or "expired" in reason:
            raise AttestationError(
                f"tdx: collateral is not valid at {int(now)} (expired or not yet valid): {reason}"
            ) from e
        raise AttestationError(
            f"tdx: quote signature or collateral does not verify: {reason}"
        ) from e
    _check_structure(bytes(quote), parsed.header.version, collateral)
    report = json.loads(verified.to_json())["report"]
    td_report = next((report[key] for key in ("TD15", "TD10") if key in report), None)
    if td_report is None:
        raise AttestationError("tdx: the verified report is not a TD report")
    result = VerifiedTdxQuote(
        tcb_status=verified.status,
        advisory_ids=tuple(verified.advisory_ids),
        mr_td=bytes.fromhex(td_report["mr_td"]),
        td_attributes=bytes.fromhex(td_report["td_attributes"]),
        report_data=bytes.fromhex(td_report["report_data"]),
    )
    check_td_report(
        result,
        allowed_mr_td=allowed_mr_td,
        expected_report_data=expected_report_data,
        accepted_tcb_statuses=accepted_tcb_statuses,
    )
    return result


def _check_structure(quote: bytes, version: int, collateral: dict) -> None:
    """Close the gaps dcap-qvl leaves: it ignores the quote's trailing bytes, the outer
    certification-data type, PEM whitespace and the embedded root certificate (it pins
    its own). Here every byte counts: the layout is exact, the PEM chain canonical, its
    root the one in the (verified) collateral, and only zero padding follows."""
    if version == 4:
        body_end = 48 + 584
    elif version == 5 and len(quote) >= 54:
        body_end = 54 + int.from_bytes(quote[50:54], "little")
    else:
        raise AttestationError(f"tdx: unsupported quote version {version}")
    # Slices past the end are short, never an error: the layout checks below reject them.
    sig_len = int.from_bytes(quote[body_end : body_end + 4], "little")
    cert = body_end + 4 + 128  # ECDSA signature and attestation key
    outer_type = int.from_bytes(quote[cert : cert + 2], "little")
    outer_len = int.from_bytes(quote[cert + 2 : cert + 6], "little")
    qe = cert + 6 + 384 + 64  # QE report and its signature
    auth_len = int.from_bytes(quote[qe : qe + 2], "little")
    inner = qe + 2 + auth_len
    inner_type = int.from_bytes(quote[inner : inner + 2], "little")
    inner_len = int.from_bytes(quote[inner + 2 : inner + 6], "little")
    end = body_end + 4 + sig_len
    if sig_len != 128 + 6 + outer_len or outer_type != 6:
        raise AttestationError("tdx: signature data layout is not the QE certification form")
    if inner_type != 5 or inner + 6 + inner_len != end or len(quote) < end:
        raise AttestationError("tdx: certification data is not a PCK certificate chain")
    if any(quote[end:]):
        raise AttestationError("tdx: non-zero bytes after the quote's signature data")
    pem = quote[inner + 6 : end].rstrip(b"\0")
    try:
        chain = x509.load_pem_x509_certificates(pem)
        roots = x509.load_pem_x509_certificates(collateral["tcb_info_issuer_chain"].encode())
    except (ValueError, KeyError, AttributeError) as e:
        raise AttestationError(f"tdx: certificate chain does not parse: {e}") from e
    if b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain) != pem:
        raise AttestationError("tdx: PCK certificate chain is not in canonical PEM")
    if chain[-1] != roots[-1]:
        raise AttestationError("tdx: PCK chain root is not the collateral's root CA")


def check_td_report(
    verified: VerifiedTdxQuote,
    *,
    allowed_mr_td: frozenset[bytes] | None,
    expected_report_data: bytes,
    accepted_tcb_statuses: Iterable[str],
) -> None:
    """The policy checks on a TD report whose signature already verified.

    ``allowed_mr_td`` None skips the mr_td check: the caller checks it (see
    AttestationPolicy)."""
    if verified.tcb_status not in frozenset(accepted_tcb_statuses):
        raise AttestationError(
            f"tdx: TCB status {verified.tcb_status} is not accepted "
            f"(advisories: {', '.join(verified.advisory_ids) or 'none'})"
        )
    if not verified.td_attributes or verified.td_attributes[0] & TD_ATTRIBUTES_DEBUG:
        raise AttestationError("tdx: the TD runs in DEBUG mode (td_attributes bit 0 set)")
    if allowed_mr_td is not None and verified.mr_td not in allowed_mr_td:
        raise AttestationError(f"tdx: mr_td {verified.mr_td.hex()} is not in the allowlist")
    if not hmac.compare_digest(verified.report_data, expected_report_data):
        raise AttestationError("tdx: report_data does not match the keys and nonce")
