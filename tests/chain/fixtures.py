"""Reusable devnet fixtures (a pytest plugin module).

Use them from a conftest with ``from tests.chain.fixtures import devnet, chain, make_wallet``
or as a plugin (``pytest_plugins = ["tests.chain.fixtures"]`` in the root conftest).

* ``devnet`` (session): a devnet on a free port in a temp dir; ``.url``, ``.chain`` (an
  open :class:`~contracts.chain.devnet.DevnetClient`), ``.process``, ``.state_dir``.
* ``chain`` (session): the same adapter, for tests that need only the API.
* ``make_wallet`` (session): ``await make_wallet(amount)`` gives a funded, deployed v5r1
  :class:`~contracts.chain.wallet.Wallet`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from contracts.chain.devnet import DevnetClient, DevnetProcess
from contracts.chain.wallet import Wallet, WalletKeys

TON = 1_000_000_000

__all__ = ["TON", "DevnetFixture", "about", "chain", "devnet", "make_wallet"]


def about(balance: int, expected: int, storage_slack: int = 10_000) -> bool:
    """A balance equal to ``expected`` up to the storage fee an account pays as time passes."""
    return expected - storage_slack <= balance <= expected


@dataclass
class DevnetFixture:
    process: DevnetProcess
    chain: DevnetClient

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def state_dir(self) -> Path:
        return self.process.state_dir

    def client(self) -> DevnetClient:
        """A new adapter on this devnet (close it yourself)."""
        return self.process.client()


@pytest.fixture(scope="session")
async def devnet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevnetFixture]:
    with DevnetProcess(tmp_path_factory.mktemp("devnet"), port=0) as proc:
        async with proc.client() as client:
            yield DevnetFixture(proc, client)


@pytest.fixture(scope="session")
async def chain(devnet: DevnetFixture) -> DevnetClient:
    return devnet.chain


WalletFactory = Callable[..., Awaitable[Wallet]]


@pytest.fixture(scope="session")
def make_wallet(devnet: DevnetFixture) -> WalletFactory:
    async def make(amount: int = 100 * TON, *, deploy: bool = True) -> Wallet:
        w = Wallet(devnet.chain, WalletKeys.generate(mnemonic=False))
        await devnet.chain.faucet(w.address, amount)
        if deploy:
            await w.deploy()
        return w

    return make
