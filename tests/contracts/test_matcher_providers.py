"""The matcher's on-chain check of a node's Provider (marketplace.providers)."""

from __future__ import annotations

import pytest
from pytoniq_core import Address

from contracts.chain import getters, operations
from contracts.chain.messages.capabilities import Capabilities
from marketplace.providers import ProviderBook, ProviderRejected
from tests.contracts.conftest import TON, Key

CAPS = Capabilities("CPU", 0, 1, "local")


async def test_only_an_active_staked_provider_of_this_registry_backs_a_node(
    chain, contracts_set, make_wallet
) -> None:
    owner = await make_wallet()
    node_key, other_key = Key(), Key()
    provider, _ = await operations.register_provider(
        owner, chain, contracts_set.registry, node_key.public, 2 * TON, CAPS
    )
    book = ProviderBook(chain, contracts_set.registry.to_str(is_user_friendly=False))
    raw = provider.to_str(is_user_friendly=False)

    await book.check(raw, node_key.public)
    with pytest.raises(ProviderRejected, match="another node key"):
        await book.check(raw, other_key.public)
    with pytest.raises(ProviderRejected, match="not deployed"):
        await book.check(Address("0:" + "66" * 32).to_str(is_user_friendly=False), node_key.public)
    # Another contract answering the same getter is no Provider of this registry: the
    # vault is deployed, but not derived from (registry, owner, seq) with provider code.
    with pytest.raises(ProviderRejected):
        await book.check(contracts_set.vault.to_str(is_user_friendly=False), node_key.public)
    elsewhere = ProviderBook(chain, Address("0:" + "77" * 32).to_str(is_user_friendly=False))
    with pytest.raises(ProviderRejected):
        await elsewhere.check(raw, node_key.public)

    await operations.provider_unstake(owner, provider)
    assert (await getters.get_provider_data(chain, provider)).state_name == "unbonding"
    with pytest.raises(ProviderRejected, match="unbonding, not active"):
        await book.check(raw, node_key.public)
