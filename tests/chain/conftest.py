"""Fixtures of the chain tests come from tests/chain/fixtures.py (reusable as a plugin)."""

from tests.chain.fixtures import chain, devnet, make_wallet  # noqa: F401
