"""Message bodies the Registry receives and sends, and its parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pytoniq_core import Address, Cell

from .body import U16, U32, U64, U256, _Body, _f
from .opcodes import (
    OP_CHANGE_OWNER,
    OP_DEPLOY_VAULT,
    OP_FORWARDED_FUNDS,
    OP_REGISTER_PROVIDER,
    OP_SET_IMAGE,
    OP_SET_MODEL,
    OP_SLASHED_STAKE,
    OP_SWEEP_REGISTRY,
    OP_UPDATE_PARAMS,
)

__all__ = [
    "SweepRegistry",
    "ChangeOwner",
    "DeployVault",
    "ForwardedFunds",
    "RegisterProvider",
    "RegistryParams",
    "SetImage",
    "SetModel",
    "SlashedStake",
    "UpdateParams",
]


@dataclass(frozen=True, slots=True)
class RegistryParams(_Body):
    """min_provider_stake:Coins unbonding_delay:uint32 escrow_close_delay:uint32
    protocol_fee_bps:uint16 slash_bounty_bps:uint16 min_vault_stake:Coins = RegistryParams;"""

    min_provider_stake: int = _f("coins")
    unbonding_delay: int = _f(U32)
    escrow_close_delay: int = _f(U32)
    protocol_fee_bps: int = _f(U16)
    slash_bounty_bps: int = _f(U16)
    min_vault_stake: int = _f("coins")


@dataclass(frozen=True, slots=True)
class UpdateParams(_Body):
    """update_params#52470001 query_id:uint64 params:^RegistryParams = UpdateParams;"""

    OP: ClassVar[int] = OP_UPDATE_PARAMS
    query_id: int = _f(U64)
    params: RegistryParams = _f(("refobj", RegistryParams))


@dataclass(frozen=True, slots=True)
class SetImage(_Body):
    """set_image#52470002 query_id:uint64 image:uint256 allowed:Bool = SetImage;"""

    OP: ClassVar[int] = OP_SET_IMAGE
    query_id: int = _f(U64)
    image: int = _f(U256)
    allowed: bool = _f("bool")


@dataclass(frozen=True, slots=True)
class SetModel(_Body):
    """set_model#52470003 query_id:uint64 model:uint256 allowed:Bool = SetModel;"""

    OP: ClassVar[int] = OP_SET_MODEL
    query_id: int = _f(U64)
    model: int = _f(U256)
    allowed: bool = _f("bool")


@dataclass(frozen=True, slots=True)
class ChangeOwner(_Body):
    """change_owner#52470004 query_id:uint64 new_owner:MsgAddressInt = ChangeOwner;"""

    OP: ClassVar[int] = OP_CHANGE_OWNER
    query_id: int = _f(U64)
    new_owner: Address = _f("address")


@dataclass(frozen=True, slots=True)
class RegisterProvider(_Body):
    """register_provider#52470010 query_id:uint64 seq:uint32 node_key:uint256
    capabilities:^Capabilities = RegisterProvider;"""

    OP: ClassVar[int] = OP_REGISTER_PROVIDER
    query_id: int = _f(U64)
    seq: int = _f(U32)
    node_key: int = _f(U256)
    capabilities: Cell = _f("ref")


@dataclass(frozen=True, slots=True)
class DeployVault(_Body):
    """deploy_vault#52470011 query_id:uint64 operator_key:uint256 = DeployVault;"""

    OP: ClassVar[int] = OP_DEPLOY_VAULT
    query_id: int = _f(U64)
    operator_key: int = _f(U256)


@dataclass(frozen=True, slots=True)
class SlashedStake(_Body):
    """slashed_stake#52470020 query_id:uint64 owner:MsgAddressInt seq:uint32 = SlashedStake;"""

    OP: ClassVar[int] = OP_SLASHED_STAKE
    query_id: int = _f(U64)
    owner: Address = _f("address")
    seq: int = _f(U32)


@dataclass(frozen=True, slots=True)
class ForwardedFunds(_Body):
    """forwarded_funds#52470021 query_id:uint64 = ForwardedFunds;"""

    OP: ClassVar[int] = OP_FORWARDED_FUNDS
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class SweepRegistry(_Body):
    """sweep_registry#52470005 query_id:uint64 = SweepRegistry;  (owner)"""

    OP: ClassVar[int] = OP_SWEEP_REGISTRY
    query_id: int = _f(U64)
