"""TON amounts and user-friendly addresses."""

from __future__ import annotations

from decimal import Decimal

import pytest

from contracts.chain.units import (
    UnitsError,
    address_equal,
    format_address,
    format_ton,
    parse_address,
    parse_ton,
)

RAW = "0:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "nano"),
    [
        ("1.5", 1_500_000_000),
        ("1.5 TON", 1_500_000_000),
        (" 2 ton ", 2_000_000_000),
        ("0.000000001", 1),
        (".5", 500_000_000),
        ("10", 10_000_000_000),
        (3, 3_000_000_000),
        (Decimal("0.25"), 250_000_000),
    ],
)
def test_parse_ton(text, nano) -> None:
    assert parse_ton(text) == nano


@pytest.mark.parametrize("bad", ["", "abc", "1.0000000001", "-1", "1e3", "nan", "1,5", True])
def test_parse_ton_rejects(bad) -> None:
    with pytest.raises(UnitsError):
        parse_ton(bad)


def test_format_ton() -> None:
    assert format_ton(1_500_000_000) == "1.5 TON"
    assert format_ton(1) == "0.000000001 TON"
    assert format_ton(0) == "0 TON"
    assert format_ton(3_000_000_000, unit=False) == "3"
    assert format_ton(-2_500_000_000) == "-2.5 TON"
    assert format_ton(1_234_567_891, decimals=2) == "1.23 TON"
    for nano in (0, 1, 999_999_999, 10**9, 123_456_789_012):
        assert parse_ton(format_ton(nano)) == nano


def test_addresses() -> None:
    testnet_nb = format_address(RAW, testnet=True, bounceable=False)
    mainnet_b = format_address(RAW, testnet=False, bounceable=True)
    assert testnet_nb.startswith("0Q") and mainnet_b.startswith("EQ")
    assert address_equal(testnet_nb, mainnet_b) and address_equal(RAW, testnet_nb)
    assert not address_equal(RAW, "0:" + "cd" * 32)
    assert parse_address(testnet_nb).to_str(is_user_friendly=False) == RAW
    with pytest.raises(UnitsError):
        parse_address("not an address")
    with pytest.raises(UnitsError):
        parse_address("")
