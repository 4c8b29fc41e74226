"""What the chain says about a node before the matcher gives it traffic.

A node that names its Provider contract is admitted only if that contract is a genuine
child of the matcher's Registry (its address is derived from the Registry, its owner
and seq with the provider code of this build, so no other code can pose as one), is
active, holds at least the Registry's minimum stake, and binds the very ed25519 key
the node attested. Its stake is then what a fraud proof can slash.
"""

from __future__ import annotations

from pytoniq_core import Address

from contracts.chain.addresses import provider_address
from contracts.chain.getters import GetterError, get_provider_data, get_registry_data
from contracts.chain.results import ToncenterError
from contracts.chain.toncenter import ToncenterClient

__all__ = ["ProviderBook", "ProviderRejected", "ProviderUnknown"]


class ProviderRejected(Exception):
    """The node's Provider contract does not back it; the message says why."""


class ProviderUnknown(Exception):
    """The chain could not be read: neither a yes nor a no about the Provider."""


class ProviderBook:
    def __init__(self, chain: ToncenterClient, registry: str) -> None:
        self.chain = chain
        self.registry = Address(registry)

    async def check(self, provider: str, node_key: bytes) -> None:
        try:
            address = Address(provider)
        except Exception as e:  # pytoniq raises bare errors
            raise ProviderRejected(f"{provider!r} is not a TON address") from e
        try:
            data = await get_provider_data(self.chain, address)
            params = await get_registry_data(self.chain, self.registry)
        except (GetterError, ValueError) as e:
            raise ProviderRejected(f"provider {provider} is not deployed ({e})") from e
        except ToncenterError as e:
            raise ProviderUnknown(f"the chain did not answer about provider {provider}: {e}") from e
        if provider_address(self.registry, data.owner, data.seq) != address:
            raise ProviderRejected(f"{provider} is not a Provider of registry {self.registry}")
        if data.state_name != "active":
            raise ProviderRejected(f"provider {provider} is {data.state_name}, not active")
        if data.node_key.to_bytes(32, "big") != node_key:
            raise ProviderRejected("the provider binds another node key than the attested one")
        if data.stake < params.min_provider_stake:
            raise ProviderRejected(
                f"the provider's stake {data.stake} is below the minimum "
                f"{params.min_provider_stake} nanoTON"
            )
