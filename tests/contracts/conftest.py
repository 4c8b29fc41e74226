"""Fixtures for the contract tests: the session devnet (tests/chain/fixtures.py), funded
wallets, a deployed contract set (Registry owned by `gov`, a Vault of `operator`)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pytoniq_core import Address

from contracts.chain import operations
from contracts.chain.devnet import DevnetClient
from contracts.chain.messages.registry import RegistryParams
from contracts.chain.wallet import Wallet, WalletKeys
from protocol.signed import DEVNET_GLOBAL_ID
from tests.chain import fixtures as _chain_fixtures

TON = 1_000_000_000

# The devnet's network global id: every signed object names it (the contracts refuse one
# for another network; test_signed_objects_for_the_devnet checks the chain agrees).
G = DEVNET_GLOBAL_ID

# Short delays so that tests can move the clock past them (wallets sign messages valid for
# 120 s of wall time, so the devnet clock may run at most that far ahead).
TEST_PARAMS = RegistryParams(
    min_provider_stake=2 * TON,
    unbonding_delay=40,
    escrow_close_delay=20,
    protocol_fee_bps=200,
    slash_bounty_bps=1000,
    min_vault_stake=2 * TON,
)


class Key:
    """An ed25519 key (node key, spend key, operator key)."""

    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def int(self) -> int:
        return int.from_bytes(self.public, "big")

    def sign(self, obj) -> bytes:
        return obj.sign(self.private)


# The devnet and its adapter come from the chain tests' reusable fixtures.
devnet = _chain_fixtures.devnet
chain = _chain_fixtures.chain

WalletFactory = Callable[..., Awaitable[Wallet]]


class LongValidityWallet(Wallet):
    """Signs transfers valid for a day: the tests move the devnet clock ahead of wall time
    (chain time is monotonic), and a 120 s validity would expire."""

    def build_external(self, messages, *, seqno, deploy=False, valid_until=None):
        import time

        return super().build_external(
            messages, seqno=seqno, deploy=deploy, valid_until=int(time.time()) + 86400
        )


@pytest.fixture(scope="session")
def make_wallet(chain: DevnetClient) -> WalletFactory:
    async def make(amount: int = 100 * TON) -> Wallet:
        w = LongValidityWallet(chain, WalletKeys.generate(mnemonic=False))
        await chain.faucet(w.address, amount)
        await w.deploy()
        return w

    return make


@dataclass
class ContractSet:
    gov: Wallet
    operator: Wallet
    operator_key: Key
    registry: Address
    vault: Address
    params: RegistryParams


@pytest.fixture(scope="session")
async def contracts_set(chain: DevnetClient, make_wallet: WalletFactory) -> ContractSet:
    gov = await make_wallet(1000 * TON)
    operator = await make_wallet(1000 * TON)
    key = Key()
    dep = await operations.deploy_all(
        gov, params=TEST_PARAMS, operator=operator, operator_key=key.int, vault_stake=5 * TON
    )
    vault = Address(next(iter(dep.vaults.values())))
    return ContractSet(gov, operator, key, Address(dep.registry), vault, TEST_PARAMS)


@pytest.fixture
async def clock(chain: DevnetClient):
    """Pin the devnet clock to wall time; ``await clock.advance(s)`` moves it forward."""
    import time

    class Clock:
        now = 0

        async def advance(self, seconds: int) -> int:
            self.now = await chain.set_clock(self.now + seconds)
            return self.now

    c = Clock()
    # chain time never goes back: start from the later of wall time and chain time
    c.now = await chain.set_clock(max(int(time.time()), (await chain.clock())[0]))
    yield c
    await chain.set_clock(None)


__all__ = ["G", "TEST_PARAMS", "TON", "ContractSet", "Key", "os", "operations"]
