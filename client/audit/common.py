"""What the parts of the audit share: its errors, the kinds of leaf, and the small helpers
that read the matcher's JSON (addresses, amounts, base64, signatures, 32-byte hashes) and
say where a finding is."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pytoniq_core import Address

from protocol.ledger import EscrowLeaf, LedgerFormatError, ProviderLeaf

Kind = Literal["escrow", "provider"]
Leaf = EscrowLeaf | ProviderLeaf
Latest = tuple[int, int, int]  # a party's latest leaf: (cumulative, epoch, index)


class AuditError(Exception):
    """The audit could not run (the Vault could not be read, a bad key)."""


class SourceError(AuditError):
    """The matcher or the chain did not answer as documented."""


def _raw(address: Address | str) -> str:
    try:
        a = Address(address) if isinstance(address, str) else address
    except Exception as e:  # pytoniq's AddressError is no ValueError
        raise LedgerFormatError(f"not an address: {address!r}") from e
    return a.to_str(is_user_friendly=False)


def _amount(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LedgerFormatError(f"{what}: not an amount: {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise LedgerFormatError(f"{what}: not an amount: {value!r}") from None
    if n < 0:
        raise LedgerFormatError(f"{what}: negative")
    return n


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise LedgerFormatError(f"{what}: missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            raise LedgerFormatError(f"{what}: not base64") from None


def _signature(value: Any, what: str) -> bytes:
    """A 64-byte ed25519 signature, in hex (as receipts carry it) or base64."""
    if not isinstance(value, str) or not value:
        raise LedgerFormatError(f"{what}: missing")
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raw = _b64(value, what)
    if len(raw) != 64:
        raise LedgerFormatError(f"{what}: {len(raw)} bytes, expected 64")
    return raw


def _hex32(value: Any, what: str) -> bytes:
    try:
        raw = bytes.fromhex(str(value).removeprefix("0x"))
    except ValueError:
        raise LedgerFormatError(f"{what}: not hex") from None
    if len(raw) != 32:
        raise LedgerFormatError(f"{what}: {len(raw)} bytes, expected 32")
    return raw


def _where(epoch: int, index: int, leaf: Leaf | None = None, **more: Any) -> dict[str, Any]:
    w: dict[str, Any] = {"epoch": epoch, "leaf": index}
    if leaf is not None:
        w.update(kind=leaf.KIND, address=leaf.address)
    w.update(more)
    return w
