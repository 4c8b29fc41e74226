"""TON amounts and addresses as people read and type them.

Amounts live in nanoTON (int) everywhere in code; this module converts at the edge:
``parse_ton("1.5") == 1_500_000_000`` and ``format_ton(1_500_000_000) == "1.5 TON"``.
Addresses are shown user-friendly: url-safe base64, with the testnet flag on the
devnet and testnet, bounceable for contracts and non-bounceable for wallets that
may not be deployed yet.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from pytoniq_core import Address

__all__ = [
    "NANO_PER_TON",
    "UnitsError",
    "address_equal",
    "format_address",
    "format_ton",
    "parse_address",
    "parse_ton",
    "to_nano",
]

NANO_PER_TON = 1_000_000_000
_MAX_COINS = (1 << 120) - 1
_AMOUNT_RE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*(ton)?\s*$", re.IGNORECASE)


class UnitsError(ValueError):
    """An amount or address that cannot be read."""


def parse_ton(text: str | int | Decimal) -> int:
    """Parse a TON amount ("1.5", "1.5 TON", "0.000000001") into nanoTON.

    Integers and Decimals are taken as TON too. Rejects negatives, more than nine
    decimal places and values beyond the 120-bit coin range.
    """
    if isinstance(text, bool):
        raise UnitsError("an amount cannot be a bool")
    if isinstance(text, int):
        value = Decimal(text)
    elif isinstance(text, Decimal):
        value = text
    elif isinstance(text, str):
        m = _AMOUNT_RE.match(text)
        if m is None:
            raise UnitsError(f"not a TON amount: {text!r} (expected e.g. 1.5 or '1.5 TON')")
        try:
            value = Decimal(m.group(1))
        except InvalidOperation as e:
            raise UnitsError(f"not a TON amount: {text!r}") from e
    else:
        raise UnitsError(f"not a TON amount: {text!r}")
    if not value.is_finite():
        raise UnitsError(f"not a finite amount: {text!r}")
    if value < 0:
        raise UnitsError(f"amount must not be negative: {text!r}")
    nano = value * NANO_PER_TON
    if nano != nano.to_integral_value():
        raise UnitsError(f"at most 9 decimal places (1 nanoTON): {text!r}")
    result = int(nano)
    if result > _MAX_COINS:
        raise UnitsError(f"amount too large: {text!r}")
    return result


def to_nano(ton: str | int | Decimal) -> int:
    """Alias of :func:`parse_ton`."""
    return parse_ton(ton)


def format_ton(nano: int, *, unit: bool = True, decimals: int | None = None) -> str:
    """Format nanoTON as TON: 1_500_000_000 -> "1.5 TON"; trailing zeros dropped.

    ``decimals`` rounds down to that many places (display only).
    """
    if isinstance(nano, bool) or not isinstance(nano, int):
        raise UnitsError(f"nanoTON must be an int, got {nano!r}")
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_TON)
    frac_s = f"{frac:09d}"
    if decimals is not None:
        frac_s = frac_s[: max(0, decimals)]
    frac_s = frac_s.rstrip("0")
    text = f"{sign}{whole}"
    if frac_s:
        text += "." + frac_s
    return f"{text} TON" if unit else text


def parse_address(value: str | Address) -> Address:
    """Read a raw ("0:ab..") or user-friendly address; raise UnitsError if invalid."""
    if isinstance(value, Address):
        return value
    if not isinstance(value, str) or not value.strip():
        raise UnitsError("an address is required")
    try:
        return Address(value.strip())
    except Exception as e:  # pytoniq_core raises several types
        raise UnitsError(f"not a TON address: {value!r}") from e


def format_address(address: str | Address, *, testnet: bool = True, bounceable: bool = True) -> str:
    """User-friendly, url-safe form. Bounceable for contracts, non-bounceable for wallets."""
    addr = parse_address(address)
    return addr.to_str(
        is_user_friendly=True, is_url_safe=True, is_bounceable=bounceable, is_test_only=testnet
    )


def address_equal(a: str | Address | None, b: str | Address | None) -> bool:
    """Whether two addresses (any format) name the same account."""
    if a is None or b is None or a == "" or b == "":
        return (a in (None, "")) and (b in (None, ""))
    pa, pb = parse_address(a), parse_address(b)
    return pa.wc == pb.wc and pa.hash_part == pb.hash_part
