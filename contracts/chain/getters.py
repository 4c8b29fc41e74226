"""Typed parsers for every get-method of the Imago contracts.

Each ``parse_*`` function turns a runGetMethod stack (decoded by ``contracts.chain.results``)
into a dataclass; each ``get_*`` coroutine runs the get-method through a client and parses
the result. A Tolk struct reply is flattened onto the stack field by field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytoniq_core import Address, Cell, Slice

from .addresses import ChildCodes
from .results import GetMethodResult
from .toncenter import ToncenterClient

__all__ = [
    "ESCROW_STATES",
    "PROVIDER_STATES",
    "EscrowData",
    "GetterError",
    "ProviderData",
    "RegistryData",
    "VaultData",
    "get_child_codes",
    "get_escrow_data",
    "get_vault_code_hashes",
    "get_provider_claimed",
    "get_provider_data",
    "get_registry_data",
    "get_registry_provider_address",
    "get_registry_vault_address",
    "get_vault_data",
    "get_vault_escrow_address",
    "get_vault_external_commit_fee",
    "get_vault_provider_address",
    "is_image_allowed",
    "is_model_allowed",
    "parse_escrow_data",
    "parse_provider_data",
    "parse_registry_data",
    "parse_vault_data",
]

PROVIDER_STATES = {0: "uninit", 1: "active", 2: "unbonding", 3: "slashed", 4: "withdrawn"}
ESCROW_STATES = {0: "open", 1: "closing", 2: "closed"}


class GetterError(RuntimeError):
    """A get-method failed (e.g. the account is not deployed)."""


class _Stack:
    def __init__(self, stack: list[Any]):
        self.items = list(stack)
        self.i = 0

    def _next(self) -> Any:
        if self.i >= len(self.items):
            raise GetterError("get-method result is shorter than expected")
        v = self.items[self.i]
        self.i += 1
        return v

    def int(self) -> int:
        v = self._next()
        if not isinstance(v, int):
            raise GetterError(f"stack[{self.i - 1}]: expected an int, got {type(v).__name__}")
        return v

    def bool(self) -> bool:
        return self.int() != 0

    def address(self) -> Address:
        a = self.address_opt()
        if a is None:
            raise GetterError(f"stack[{self.i - 1}]: expected an address")
        return a

    def address_opt(self) -> Address | None:
        v = self._next()
        if v is None:
            return None
        s = v if isinstance(v, Slice) else v.begin_parse()
        return s.load_address()

    def cell_opt(self) -> Cell | None:
        v = self._next()
        if v is None:
            return None
        return v.to_cell() if isinstance(v, Slice) else v

    def cell(self) -> Cell:
        c = self.cell_opt()
        if c is None:
            raise GetterError(f"stack[{self.i - 1}]: expected a cell")
        return c


@dataclass(frozen=True)
class RegistryData:
    owner: Address
    min_provider_stake: int
    unbonding_delay: int
    escrow_close_delay: int
    protocol_fee_bps: int
    slash_bounty_bps: int
    min_vault_stake: int
    provider_code_hash: bytes
    vault_code_hash: bytes
    escrow_code_hash: bytes
    register_fee: int  # value a RegisterProvider needs on top of the stake
    deploy_vault_fee: int  # value a DeployVault needs on top of the stake


def parse_registry_data(stack: list[Any]) -> RegistryData:
    s = _Stack(stack)
    return RegistryData(
        owner=s.address(),
        min_provider_stake=s.int(),
        unbonding_delay=s.int(),
        escrow_close_delay=s.int(),
        protocol_fee_bps=s.int(),
        slash_bounty_bps=s.int(),
        min_vault_stake=s.int(),
        provider_code_hash=s.int().to_bytes(32, "big"),
        vault_code_hash=s.int().to_bytes(32, "big"),
        escrow_code_hash=s.int().to_bytes(32, "big"),
        register_fee=s.int(),
        deploy_vault_fee=s.int(),
    )


@dataclass(frozen=True)
class ProviderData:
    registry: Address
    owner: Address
    seq: int
    state: int
    node_key: int
    stake: int
    unlock_time: int
    unbonding_delay: int
    slash_bounty_bps: int
    prev_key: int
    prev_key_until: int
    capabilities: Cell | None
    balance: int

    @property
    def state_name(self) -> str:
        return PROVIDER_STATES.get(self.state, str(self.state))


def parse_provider_data(stack: list[Any]) -> ProviderData:
    s = _Stack(stack)
    return ProviderData(
        registry=s.address(),
        owner=s.address(),
        seq=s.int(),
        state=s.int(),
        node_key=s.int(),
        stake=s.int(),
        unlock_time=s.int(),
        unbonding_delay=s.int(),
        slash_bounty_bps=s.int(),
        prev_key=s.int(),
        prev_key_until=s.int(),
        capabilities=s.cell_opt(),
        balance=s.int(),
    )


@dataclass(frozen=True)
class VaultData:
    registry: Address
    operator: Address
    operator_key: int
    protocol_fee_bps: int
    escrow_close_delay: int
    unbonding_delay: int
    stake: int
    charged_in: int
    paid_out: int
    fees_accrued: int
    fees_withdrawn: int
    last_epoch: int
    last_root: bytes
    committed_charged: int  # the last epoch commit's cumulative totals
    committed_paid: int  # ... payouts never take paid_out above it
    committed_fees: int
    unstaking: int  # stake requested by UnstakeVault (0: none)
    unlock_time: int  # ... withdrawable from this time
    ready: bool  # VaultInit received from the registry
    balance: int

    @property
    def payable(self) -> int:
        """What the vault may still pay providers (invariant 3)."""
        return self.charged_in - self.fees_accrued + self.stake - self.paid_out

    @property
    def committed_unpaid(self) -> int:
        """What the last epoch commit still lets the vault pay (payouts stop there)."""
        return self.committed_paid - self.paid_out

    @property
    def committable(self) -> int:
        """The highest paid total the next epoch commit may carry if it commits every
        charge: charged - fees + stake (and never below the last commit's)."""
        return max(self.committed_paid, self.charged_in - self.fees_accrued + self.stake)


def parse_vault_data(stack: list[Any]) -> VaultData:
    s = _Stack(stack)
    return VaultData(
        registry=s.address(),
        operator=s.address(),
        operator_key=s.int(),
        protocol_fee_bps=s.int(),
        escrow_close_delay=s.int(),
        unbonding_delay=s.int(),
        stake=s.int(),
        charged_in=s.int(),
        paid_out=s.int(),
        fees_accrued=s.int(),
        fees_withdrawn=s.int(),
        last_epoch=s.int(),
        last_root=s.int().to_bytes(32, "big"),
        committed_charged=s.int(),
        committed_paid=s.int(),
        committed_fees=s.int(),
        unstaking=s.int(),
        unlock_time=s.int(),
        ready=s.int() != 0,
        balance=s.int(),
    )


@dataclass(frozen=True)
class EscrowData:
    vault: Address
    owner: Address
    spend_key: int
    close_delay: int
    state: int
    unlock_time: int
    deposited: int
    charged: int
    balance: int

    @property
    def available(self) -> int:
        return self.deposited - self.charged

    @property
    def state_name(self) -> str:
        return ESCROW_STATES.get(self.state, str(self.state))


def parse_escrow_data(stack: list[Any]) -> EscrowData:
    s = _Stack(stack)
    return EscrowData(
        vault=s.address(),
        owner=s.address(),
        spend_key=s.int(),
        close_delay=s.int(),
        state=s.int(),
        unlock_time=s.int(),
        deposited=s.int(),
        charged=s.int(),
        balance=s.int(),
    )


async def _run(
    client: ToncenterClient, address: Address | str, method: str, args=()
) -> GetMethodResult:
    r = await client.run_get_method(address, method, list(args))
    if not r.ok:
        raise GetterError(f"{method} on {address}: exit code {r.exit_code}")
    return r


async def get_registry_data(client: ToncenterClient, registry: Address | str) -> RegistryData:
    return parse_registry_data((await _run(client, registry, "registry_data")).stack)


async def is_image_allowed(client: ToncenterClient, registry: Address | str, image: int) -> bool:
    return _Stack((await _run(client, registry, "is_image_allowed", [image])).stack).bool()


async def is_model_allowed(client: ToncenterClient, registry: Address | str, model: int) -> bool:
    return _Stack((await _run(client, registry, "is_model_allowed", [model])).stack).bool()


async def get_registry_provider_address(
    client: ToncenterClient, registry: Address | str, owner: Address, seq: int
) -> Address:
    r = await _run(client, registry, "provider_address", [owner, seq])
    return _Stack(r.stack).address()


async def get_registry_vault_address(
    client: ToncenterClient, registry: Address | str, operator: Address, operator_key: int
) -> Address:
    r = await _run(client, registry, "vault_address", [operator, operator_key])
    return _Stack(r.stack).address()


async def get_child_codes(client: ToncenterClient, registry: Address | str) -> ChildCodes:
    """The provider, vault and escrow code cells the Registry deploys and authenticates."""
    s = _Stack((await _run(client, registry, "child_codes")).stack)
    return ChildCodes(provider=s.cell(), vault=s.cell(), escrow=s.cell())


async def get_provider_data(client: ToncenterClient, provider: Address | str) -> ProviderData:
    return parse_provider_data((await _run(client, provider, "provider_data")).stack)


async def get_provider_claimed(
    client: ToncenterClient, provider: Address | str, vault: Address
) -> int:
    return _Stack((await _run(client, provider, "claimed", [vault])).stack).int()


async def get_vault_data(client: ToncenterClient, vault: Address | str) -> VaultData:
    return parse_vault_data((await _run(client, vault, "vault_data")).stack)


async def get_vault_external_commit_fee(client: ToncenterClient, vault: Address | str) -> int:
    """What an external epoch commit costs the operator's unwithdrawn fees on this Vault, at
    its chain's prices (``operations.EXTERNAL_COMMIT_FEE`` at mainnet's). A Vault whose code
    predates external commits has no such get-method: GetterError."""
    return _Stack((await _run(client, vault, "external_commit_fee")).stack).int()


async def get_vault_escrow_address(
    client: ToncenterClient, vault: Address | str, owner: Address, spend_key: int
) -> Address:
    r = await _run(client, vault, "escrow_address", [owner, spend_key])
    return _Stack(r.stack).address()


async def get_vault_provider_address(
    client: ToncenterClient, vault: Address | str, owner: Address, seq: int
) -> Address:
    r = await _run(client, vault, "provider_address", [owner, seq])
    return _Stack(r.stack).address()


async def get_vault_code_hashes(
    client: ToncenterClient, vault: Address | str
) -> tuple[bytes, bytes]:
    """(escrow code hash, provider code hash) the Vault authenticates its senders with."""
    s = _Stack((await _run(client, vault, "code_hashes")).stack)
    return s.int().to_bytes(32, "big"), s.int().to_bytes(32, "big")


async def get_escrow_data(client: ToncenterClient, escrow: Address | str) -> EscrowData:
    return parse_escrow_data((await _run(client, escrow, "escrow_data")).stack)
