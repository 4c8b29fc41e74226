"""StateInits, child-address derivation and the Deployment record: pure, no I/O.

The storage layouts mirror ``contracts/<name>/storage.tolk``; the child addresses are
computed exactly as the contracts compute them (``contracts/common/children.tolk`` and
``calcDeployedVault`` in the Registry), so Python, the Registry and the Vault agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from pytoniq_core import Address, Cell, StateInit, begin_cell

from . import artifacts
from .messages.registry import RegistryParams

__all__ = [
    "DEFAULT_PARAMS",
    "PRODUCTION_PARAMS",
    "STORAGE_RESERVES",
    "ChildCodes",
    "Deployment",
    "Sender",
    "MAX_SLASH_BOUNTY_BPS",
    "address_of",
    "check_params",
    "escrow_address",
    "escrow_data",
    "escrow_state_init",
    "provider_address",
    "provider_data",
    "registry_address",
    "registry_data",
    "registry_state_init",
    "vault_address",
    "vault_data",
    "vault_state_init",
]

TON = 1_000_000_000

# Defaults for the devnet (short delays, so that a new user sees the whole cycle);
# governance changes them with UpdateParams.
DEFAULT_PARAMS = RegistryParams(
    min_provider_stake=10 * TON,
    unbonding_delay=300,
    escrow_close_delay=30,
    protocol_fee_bps=200,
    slash_bounty_bps=1000,
    min_vault_stake=10 * TON,
)

# Defaults for testnet and mainnet.
PRODUCTION_PARAMS = RegistryParams(
    min_provider_stake=100 * TON,
    unbonding_delay=7 * 24 * 3600,
    escrow_close_delay=24 * 3600,
    protocol_fee_bps=200,
    slash_bounty_bps=1000,
    min_vault_stake=1000 * TON,
)


# What each contract keeps on its balance for storage fees (the `*_STORAGE_RESERVE` constants
# of contracts/<name>/fees.tolk; tests/contracts/test_reserves.py checks both agree and that
# each covers ten years of storage at the chain's prices).
STORAGE_RESERVES = {
    "registry": TON,
    "vault": TON // 2,
    "provider": TON // 4,
    "escrow": TON // 10,
}


# The most of a slashed stake a reporter may get (contracts/common/common.tolk).
MAX_SLASH_BOUNTY_BPS = 5000


def check_params(params: RegistryParams) -> None:
    """Raise ValueError on params the Registry's UpdateParams refuses (103)."""
    if params.protocol_fee_bps > 10_000:
        raise ValueError(f"protocol_fee_bps {params.protocol_fee_bps} is above 10000 (100 %)")
    if params.slash_bounty_bps > MAX_SLASH_BOUNTY_BPS:
        raise ValueError(
            f"slash_bounty_bps {params.slash_bounty_bps} is above {MAX_SLASH_BOUNTY_BPS} (50 %)"
        )


class Sender(Protocol):
    """A wallet able to send one internal message and return the Trace it causes
    (``contracts.chain.wallet.Wallet`` is one)."""

    address: Address

    async def transfer(
        self,
        destination: Address,
        value: int,
        body: Cell | None = None,
        *,
        state_init: StateInit | None = None,
        bounce: bool | None = None,
    ) -> Any: ...


@dataclass(frozen=True)
class ChildCodes:
    provider: Cell
    vault: Cell
    escrow: Cell

    @classmethod
    def from_build(cls) -> ChildCodes:
        return cls(
            provider=artifacts.load("provider").code,
            vault=artifacts.load("vault").code,
            escrow=artifacts.load("escrow").code,
        )

    def to_cell(self) -> Cell:
        return (
            begin_cell()
            .store_ref(self.provider)
            .store_ref(self.vault)
            .store_ref(self.escrow)
            .end_cell()
        )


def address_of(state_init: StateInit, workchain: int = 0) -> Address:
    return Address((workchain, state_init.serialize().hash))


# --- Registry ----------------------------------------------------------------------------


def registry_data(owner: Address, params: RegistryParams, codes: ChildCodes | None = None) -> Cell:
    """owner:MsgAddressInt params:^RegistryParams images:(HashmapE 256 Bool)
    models:(HashmapE 256 Bool) codes:^ChildCodes"""
    codes = codes or ChildCodes.from_build()
    return (
        begin_cell()
        .store_address(owner)
        .store_ref(params.to_cell())
        .store_bit(0)
        .store_bit(0)
        .store_ref(codes.to_cell())
        .end_cell()
    )


def registry_state_init(
    owner: Address, params: RegistryParams = DEFAULT_PARAMS, codes: ChildCodes | None = None
) -> StateInit:
    return StateInit(code=artifacts.load("registry").code, data=registry_data(owner, params, codes))


def registry_address(
    owner: Address, params: RegistryParams = DEFAULT_PARAMS, codes: ChildCodes | None = None
) -> Address:
    return address_of(registry_state_init(owner, params, codes))


# --- Provider ----------------------------------------------------------------------------


def provider_data(registry: Address, owner: Address, seq: int) -> Cell:
    """The Provider's data before ProviderInit: registry owner seq state=0 node_key=0 stake=0
    unlock_time=0 claims=empty params=none."""
    return (
        begin_cell()
        .store_address(registry)
        .store_address(owner)
        .store_uint(seq, 32)
        .store_uint(0, 8)
        .store_uint(0, 256)
        .store_coins(0)
        .store_uint(0, 32)
        .store_bit(0)
        .store_bit(0)
        .end_cell()
    )


def provider_address(
    registry: Address, owner: Address, seq: int, code: Cell | None = None
) -> Address:
    code = code or artifacts.load("provider").code
    return address_of(StateInit(code=code, data=provider_data(registry, owner, seq)))


# --- Vault -------------------------------------------------------------------------------


def vault_data(registry: Address, operator: Address, operator_key: int) -> Cell:
    """The Vault's uninitialised data (``calcDeployedVault``): zeros, ``ready = false`` and
    consts with fee 0, delays 0 and empty code cells. The Registry's params and the child
    codes arrive later in ``VaultInit``, so the address does not depend on them."""
    empty = begin_cell().end_cell()
    consts = (
        begin_cell()
        .store_address(registry)
        .store_address(operator)
        .store_uint(operator_key, 256)
        .store_uint(0, 16)  # protocolFeeBps
        .store_uint(0, 32)  # escrowCloseDelay
        .store_uint(0, 32)  # unbondingDelay
        .store_ref(empty)
        .store_ref(empty)
        .end_cell()
    )
    b = begin_cell()
    for _ in range(5):  # stake chargedIn paidOut feesAccrued feesWithdrawn
        b.store_coins(0)
    b.store_uint(0, 64).store_uint(0, 256)  # lastEpoch lastRoot
    for _ in range(3):  # committedCharged committedPaid committedFees
        b.store_coins(0)
    b.store_coins(0).store_uint(0, 32).store_bit(0)  # unstaking unlockTime ready
    return b.store_ref(consts).end_cell()


def vault_state_init(
    registry: Address, operator: Address, operator_key: int, code: Cell | None = None
) -> StateInit:
    code = code or artifacts.load("vault").code
    return StateInit(code=code, data=vault_data(registry, operator, operator_key))


def vault_address(
    registry: Address, operator: Address, operator_key: int, code: Cell | None = None
) -> Address:
    """The Vault of ``operator`` (and its key) under ``registry``: independent of the
    Registry's params, so it does not move after ``UpdateParams``."""
    return address_of(vault_state_init(registry, operator, operator_key, code))


# --- Escrow ------------------------------------------------------------------------------


def escrow_data(vault: Address, owner: Address, spend_key: int, close_delay: int) -> Cell:
    return (
        begin_cell()
        .store_address(vault)
        .store_address(owner)
        .store_uint(spend_key, 256)
        .store_uint(close_delay, 32)
        .store_uint(0, 8)
        .store_uint(0, 32)
        .store_coins(0)
        .store_coins(0)
        .end_cell()
    )


def escrow_state_init(
    vault: Address, owner: Address, spend_key: int, close_delay: int, code: Cell | None = None
) -> StateInit:
    code = code or artifacts.load("escrow").code
    return StateInit(code=code, data=escrow_data(vault, owner, spend_key, close_delay))


def escrow_address(
    vault: Address, owner: Address, spend_key: int, close_delay: int, code: Cell | None = None
) -> Address:
    return address_of(escrow_state_init(vault, owner, spend_key, close_delay, code))


# --- deployment --------------------------------------------------------------------------


@dataclass
class Deployment:
    """Where the contract set lives; saved as ``$IMAGO_HOME/deployment.json``."""

    chain: str
    registry: str
    owner: str
    params: dict[str, int]
    code_hashes: dict[str, str]
    vaults: dict[str, str]  # operator wallet -> vault
    providers: dict[str, str]  # "owner/seq" -> provider
    escrows: dict[str, str]  # "owner/vault" -> escrow

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deployment:
        return cls(
            chain=data.get("chain", "devnet"),
            registry=data["registry"],
            owner=data["owner"],
            params={k: int(v) for k, v in data.get("params", {}).items()},
            code_hashes=dict(data.get("code_hashes", {})),
            vaults=dict(data.get("vaults", {})),
            providers=dict(data.get("providers", {})),
            escrows=dict(data.get("escrows", {})),
        )

    @property
    def registry_params(self) -> RegistryParams:
        return RegistryParams(**self.params)
