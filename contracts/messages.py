"""Typed builders and parsers for every message body of the Imago contracts.

One frozen dataclass per message, with ``to_cell()`` and ``from_cell()``; the opcodes are
module constants (``OP_*``) and each class's ``OP``. The layouts are those of the Tolk
structs in ``contracts/<name>/messages.tolk`` (TL-B in each class docstring).

Signed objects travel as ``signature:bits512`` next to a reference to the object's cell
(``contracts.protocol.signed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

from pytoniq_core import Address, Builder, Cell, Slice, begin_cell

from .protocol.signed import EpochCommit, PayoutVoucher, Receipt, SignedObjectError, SpendVoucher

__all__ = [
    "MESSAGES",
    "Capabilities",
    "Charge",
    "ModelPrice",
    "ChangeOwner",
    "Claim",
    "Close",
    "CommitEpoch",
    "Deposit",
    "DeployVault",
    "EscrowCharged",
    "EscrowRefund",
    "EscrowWithdraw",
    "FeesPaid",
    "ForwardedFunds",
    "MessageError",
    "PayoutPaid",
    "PayoutRequest",
    "ProviderInit",
    "ProviderPayout",
    "ProviderTopUp",
    "RegisterProvider",
    "RegistryParams",
    "ReturnExcess",
    "RotateKey",
    "SetImage",
    "SetModel",
    "SignedPayout",
    "SignedReceipt",
    "Slash",
    "SlashBounty",
    "SlashedStake",
    "StakeReturned",
    "SweepProvider",
    "SweepRegistry",
    "Swept",
    "TopUpStake",
    "Unstake",
    "UpdateCapabilities",
    "UnstakeVault",
    "UpdateParams",
    "VaultInit",
    "VaultStakeReturned",
    "WithdrawFees",
    "WithdrawStake",
    "WithdrawVaultStake",
    "parse_body",
]

# --- opcodes -----------------------------------------------------------------------------
OP_RETURN_EXCESS = 0xD53276DB
OP_SWEPT = 0x53574550
# registry
OP_UPDATE_PARAMS = 0x52470001
OP_SET_IMAGE = 0x52470002
OP_SET_MODEL = 0x52470003
OP_CHANGE_OWNER = 0x52470004
OP_SWEEP_REGISTRY = 0x52470005
OP_REGISTER_PROVIDER = 0x52470010
OP_DEPLOY_VAULT = 0x52470011
OP_SLASHED_STAKE = 0x52470020
OP_FORWARDED_FUNDS = 0x52470021
# provider
OP_PROVIDER_INIT = 0x50520001
OP_PROVIDER_TOP_UP = 0x50520010
OP_ROTATE_KEY = 0x50520011
OP_UPDATE_CAPABILITIES = 0x50520012
OP_UNSTAKE = 0x50520013
OP_WITHDRAW_STAKE = 0x50520014
OP_CLAIM = 0x50520015
OP_SLASH = 0x50520016
OP_SWEEP_PROVIDER = 0x50520017
OP_PROVIDER_PAYOUT = 0x50520020
OP_STAKE_RETURNED = 0x50520021
OP_SLASH_BOUNTY = 0x50520022
# vault
OP_ESCROW_CHARGED = 0x56410001
OP_PAYOUT_REQUEST = 0x56410002
OP_PAYOUT_PAID = 0x56410003
OP_COMMIT_EPOCH = 0x56410004
OP_WITHDRAW_FEES = 0x56410005
OP_TOP_UP_STAKE = 0x56410006
OP_VAULT_INIT = 0x56410007
OP_UNSTAKE_VAULT = 0x56410008
OP_WITHDRAW_VAULT_STAKE = 0x56410009
OP_FEES_PAID = 0x56410011
OP_VAULT_STAKE_RETURNED = 0x56410012
# escrow
OP_DEPOSIT = 0x45530001
OP_CHARGE = 0x45530002
OP_CLOSE = 0x45530003
OP_ESCROW_WITHDRAW = 0x45530004
OP_ESCROW_REFUND = 0x45530010


class MessageError(ValueError):
    """A cell that does not parse as the expected message."""


# --- field codecs --------------------------------------------------------------------------
# Each field of a message dataclass declares its TL-B kind in metadata: ("uint", n), "coins",
# "address", "bool", "bits512", "ref" (a raw cell), or a nested codec class for refs.


def _f(kind: Any) -> Any:
    return field(metadata={"tlb": kind})


def _store(b: Builder, kind: Any, value: Any) -> None:
    if isinstance(kind, tuple) and kind[0] == "uint":
        b.store_uint(value, kind[1])
    elif kind == "coins":
        b.store_coins(value)
    elif kind == "address":
        b.store_address(value)
    elif kind == "bool":
        b.store_bit(1 if value else 0)
    elif kind == "bits512":
        if len(value) != 64:
            raise MessageError("a signature is 64 bytes")
        b.store_bytes(value)
    elif kind == "ref":
        b.store_ref(value)
    elif isinstance(kind, tuple) and kind[0] == "refobj":
        b.store_ref(value.to_cell())
    else:  # pragma: no cover - programming error
        raise TypeError(kind)


def _load(s: Slice, kind: Any) -> Any:
    if isinstance(kind, tuple) and kind[0] == "uint":
        return s.load_uint(kind[1])
    if kind == "coins":
        return s.load_coins()
    if kind == "address":
        return s.load_address()
    if kind == "bool":
        return bool(s.load_bit())
    if kind == "bits512":
        return s.load_bytes(64)
    if kind == "ref":
        return s.load_ref()
    if isinstance(kind, tuple) and kind[0] == "refobj":
        return kind[1].from_cell(s.load_ref())
    raise TypeError(kind)  # pragma: no cover


class _Body:
    """Base of every message: ``op:uint32`` then the fields in declaration order."""

    OP: ClassVar[int | None] = None

    def store(self, b: Builder) -> Builder:
        if self.OP is not None:
            b.store_uint(self.OP, 32)
        for f in fields(self):  # type: ignore[arg-type]
            _store(b, f.metadata["tlb"], getattr(self, f.name))
        return b

    def to_cell(self) -> Cell:
        return self.store(begin_cell()).end_cell()

    @classmethod
    def load(cls, s: Slice) -> Self:
        if cls.OP is not None:
            op = s.load_uint(32)
            if op != cls.OP:
                raise MessageError(f"{cls.__name__}: opcode {op:#010x}, expected {cls.OP:#010x}")
        values = {f.name: _load(s, f.metadata["tlb"]) for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**values)

    @classmethod
    def from_cell(cls, cell: Cell) -> Self:
        try:
            s = cell.begin_parse()
            obj = cls.load(s)
        except (MessageError, SignedObjectError):
            raise
        except Exception as e:
            raise MessageError(f"{cls.__name__}: malformed cell: {e}") from e
        if s.remaining_bits or s.remaining_refs:
            raise MessageError(f"{cls.__name__}: trailing data")
        return obj


U32, U64, U16, U256 = ("uint", 32), ("uint", 64), ("uint", 16), ("uint", 256)


def _signed_ref(cls: type) -> tuple[str, type]:
    return ("refobj", cls)


# --- nested structures --------------------------------------------------------------------


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
class SignedPayout(_Body):
    """signature:bits512 voucher:^PayoutVoucher = SignedPayout;"""

    signature: bytes = _f("bits512")
    voucher: PayoutVoucher = _f(("refobj", PayoutVoucher))


@dataclass(frozen=True, slots=True)
class SignedReceipt(_Body):
    """signature:bits512 receipt:^Receipt = SignedReceipt;"""

    signature: bytes = _f("bits512")
    receipt: Receipt = _f(("refobj", Receipt))


# --- common ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReturnExcess(_Body):
    """return_excess#d53276db query_id:uint64 = ReturnExcess;"""

    OP: ClassVar[int] = OP_RETURN_EXCESS
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class Swept(_Body):
    """swept#53574550 query_id:uint64 = Swept;  (to the owner, with what was swept)"""

    OP: ClassVar[int] = OP_SWEPT
    query_id: int = _f(U64)


# --- registry ----------------------------------------------------------------------------


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
class SweepRegistry(_Body):
    """sweep_registry#52470005 query_id:uint64 = SweepRegistry;  (owner)"""

    OP: ClassVar[int] = OP_SWEEP_REGISTRY
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class ForwardedFunds(_Body):
    """forwarded_funds#52470021 query_id:uint64 = ForwardedFunds;"""

    OP: ClassVar[int] = OP_FORWARDED_FUNDS
    query_id: int = _f(U64)


# --- provider ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderInit(_Body):
    """provider_init#50520001 query_id:uint64 stake:Coins node_key:uint256
    unbonding_delay:uint32 slash_bounty_bps:uint16 capabilities:^Capabilities
    owner:MsgAddressInt = ProviderInit;  (owner: the registrant, for a bounce refund)"""

    OP: ClassVar[int] = OP_PROVIDER_INIT
    query_id: int = _f(U64)
    stake: int = _f("coins")
    node_key: int = _f(U256)
    unbonding_delay: int = _f(U32)
    slash_bounty_bps: int = _f(U16)
    capabilities: Cell = _f("ref")
    owner: Address = _f("address")


@dataclass(frozen=True, slots=True)
class ProviderTopUp(_Body):
    """provider_top_up#50520010 query_id:uint64 = ProviderTopUp;"""

    OP: ClassVar[int] = OP_PROVIDER_TOP_UP
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class RotateKey(_Body):
    """rotate_key#50520011 query_id:uint64 node_key:uint256 = RotateKey;"""

    OP: ClassVar[int] = OP_ROTATE_KEY
    query_id: int = _f(U64)
    node_key: int = _f(U256)


@dataclass(frozen=True, slots=True)
class UpdateCapabilities(_Body):
    """update_capabilities#50520012 query_id:uint64 capabilities:^Capabilities
    = UpdateCapabilities;"""

    OP: ClassVar[int] = OP_UPDATE_CAPABILITIES
    query_id: int = _f(U64)
    capabilities: Cell = _f("ref")


@dataclass(frozen=True, slots=True)
class Unstake(_Body):
    """unstake#50520013 query_id:uint64 = Unstake;"""

    OP: ClassVar[int] = OP_UNSTAKE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class WithdrawStake(_Body):
    """withdraw_stake#50520014 query_id:uint64 = WithdrawStake;"""

    OP: ClassVar[int] = OP_WITHDRAW_STAKE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class Claim(_Body):
    """claim#50520015 query_id:uint64 signed:^SignedPayout = Claim;"""

    OP: ClassVar[int] = OP_CLAIM
    query_id: int = _f(U64)
    signed: SignedPayout = _f(("refobj", SignedPayout))


@dataclass(frozen=True, slots=True)
class Slash(_Body):
    """slash#50520016 query_id:uint64 proof1:^SignedReceipt proof2:^SignedReceipt = Slash;"""

    OP: ClassVar[int] = OP_SLASH
    query_id: int = _f(U64)
    proof1: SignedReceipt = _f(("refobj", SignedReceipt))
    proof2: SignedReceipt = _f(("refobj", SignedReceipt))


@dataclass(frozen=True, slots=True)
class SweepProvider(_Body):
    """sweep_provider#50520017 query_id:uint64 = SweepProvider;  (owner; withdrawn or slashed)"""

    OP: ClassVar[int] = OP_SWEEP_PROVIDER
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class ProviderPayout(_Body):
    """provider_payout#50520020 query_id:uint64 amount:Coins = ProviderPayout;"""

    OP: ClassVar[int] = OP_PROVIDER_PAYOUT
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class StakeReturned(_Body):
    """stake_returned#50520021 query_id:uint64 amount:Coins = StakeReturned;"""

    OP: ClassVar[int] = OP_STAKE_RETURNED
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class SlashBounty(_Body):
    """slash_bounty#50520022 query_id:uint64 amount:Coins = SlashBounty;"""

    OP: ClassVar[int] = OP_SLASH_BOUNTY
    query_id: int = _f(U64)
    amount: int = _f("coins")


# --- vault -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PayoutRequest(_Body):
    """payout_request#56410002 query_id:uint64 claimed_before:Coins cumulative:Coins
    owner:MsgAddressInt seq:uint32 signed:^SignedPayout = PayoutRequest;"""

    OP: ClassVar[int] = OP_PAYOUT_REQUEST
    query_id: int = _f(U64)
    claimed_before: int = _f("coins")
    cumulative: int = _f("coins")
    owner: Address = _f("address")
    seq: int = _f(U32)
    signed: SignedPayout = _f(("refobj", SignedPayout))


@dataclass(frozen=True, slots=True)
class PayoutPaid(_Body):
    """payout_paid#56410003 query_id:uint64 amount:Coins cumulative:Coins = PayoutPaid;
    (Vault -> the provider's owner)"""

    OP: ClassVar[int] = OP_PAYOUT_PAID
    query_id: int = _f(U64)
    amount: int = _f("coins")
    cumulative: int = _f("coins")


@dataclass(frozen=True, slots=True)
class CommitEpoch(_Body):
    """commit_epoch#56410004 query_id:uint64 signature:bits512 commit:^EpochCommit = CommitEpoch;"""

    OP: ClassVar[int] = OP_COMMIT_EPOCH
    query_id: int = _f(U64)
    signature: bytes = _f("bits512")
    commit: EpochCommit = _f(("refobj", EpochCommit))


@dataclass(frozen=True, slots=True)
class WithdrawFees(_Body):
    """withdraw_fees#56410005 query_id:uint64 amount:Coins = WithdrawFees;"""

    OP: ClassVar[int] = OP_WITHDRAW_FEES
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class TopUpStake(_Body):
    """top_up_stake#56410006 query_id:uint64 = TopUpStake;"""

    OP: ClassVar[int] = OP_TOP_UP_STAKE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class VaultInit(_Body):
    """vault_init#56410007 query_id:uint64 protocol_fee_bps:uint16 escrow_close_delay:uint32
    unbonding_delay:uint32 escrow_code:^Cell provider_code:^Cell = VaultInit;
    (Registry -> Vault at deployment; stored on the first one, the value is stake)"""

    OP: ClassVar[int] = OP_VAULT_INIT
    query_id: int = _f(U64)
    protocol_fee_bps: int = _f(("uint", 16))
    escrow_close_delay: int = _f(U32)
    unbonding_delay: int = _f(U32)
    escrow_code: Cell = _f("ref")
    provider_code: Cell = _f("ref")


@dataclass(frozen=True, slots=True)
class UnstakeVault(_Body):
    """unstake_vault#56410008 query_id:uint64 amount:Coins = UnstakeVault;  (operator)"""

    OP: ClassVar[int] = OP_UNSTAKE_VAULT
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class WithdrawVaultStake(_Body):
    """withdraw_vault_stake#56410009 query_id:uint64 = WithdrawVaultStake;  (operator)"""

    OP: ClassVar[int] = OP_WITHDRAW_VAULT_STAKE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class VaultStakeReturned(_Body):
    """vault_stake_returned#56410012 query_id:uint64 amount:Coins = VaultStakeReturned;"""

    OP: ClassVar[int] = OP_VAULT_STAKE_RETURNED
    query_id: int = _f(U64)
    amount: int = _f("coins")


@dataclass(frozen=True, slots=True)
class FeesPaid(_Body):
    """fees_paid#56410011 query_id:uint64 amount:Coins = FeesPaid;"""

    OP: ClassVar[int] = OP_FEES_PAID
    query_id: int = _f(U64)
    amount: int = _f("coins")


# --- escrow ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deposit(_Body):
    """deposit#45530001 query_id:uint64 = Deposit;  (an empty body deposits too)"""

    OP: ClassVar[int] = OP_DEPOSIT
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class Charge(_Body):
    """charge#45530002 query_id:uint64 signature:bits512 voucher:^SpendVoucher = Charge;"""

    OP: ClassVar[int] = OP_CHARGE
    query_id: int = _f(U64)
    signature: bytes = _f("bits512")
    voucher: SpendVoucher = _f(("refobj", SpendVoucher))


@dataclass(frozen=True, slots=True)
class Close(_Body):
    """close#45530003 query_id:uint64 = Close;"""

    OP: ClassVar[int] = OP_CLOSE
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class EscrowWithdraw(_Body):
    """withdraw#45530004 query_id:uint64 = EscrowWithdraw;"""

    OP: ClassVar[int] = OP_ESCROW_WITHDRAW
    query_id: int = _f(U64)


@dataclass(frozen=True, slots=True)
class EscrowCharged(_Body):
    """escrow_charged#56410001 query_id:uint64 amount:Coins owner:MsgAddressInt
    spend_key:uint256 excess_to:MsgAddressInt = EscrowCharged;"""

    OP: ClassVar[int] = OP_ESCROW_CHARGED
    query_id: int = _f(U64)
    amount: int = _f("coins")
    owner: Address = _f("address")
    spend_key: int = _f(U256)
    excess_to: Address = _f("address")


@dataclass(frozen=True, slots=True)
class EscrowRefund(_Body):
    """escrow_refund#45530010 query_id:uint64 amount:Coins = EscrowRefund;"""

    OP: ClassVar[int] = OP_ESCROW_REFUND
    query_id: int = _f(U64)
    amount: int = _f("coins")


# --- capabilities -------------------------------------------------------------------------

TAG_CAPABILITIES = 0x43415031  # "CAP1"


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A served model and its prices (nanoTON per million tokens)."""

    model: int  # sha256 of the model id (contracts.protocol.signed.model_hash)
    price_prompt: int
    price_completion: int


def _text(value: str) -> Cell:
    raw = value.encode()
    if len(raw) > 127:
        raise MessageError("a text field holds at most 127 bytes")
    return begin_cell().store_bytes(raw).end_cell()


def _load_text(cell: Cell) -> str:
    s = cell.begin_parse()
    return s.load_bytes(s.remaining_bits // 8).decode()


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a node declares in its Provider contract::

    capabilities#43415031 gpu_count:uint8 gpu_memory_gb:uint16 gpu_model:^Text
        region:^Text models:(Maybe ^ModelEntry) = Capabilities;
    model_entry$_ model:uint256 price_prompt:Coins price_completion:Coins
        next:(Maybe ^ModelEntry) = ModelEntry;
    text$_ {n:#} utf8:(bits (n * 8)) = Text;   // n <= 127
    """

    gpu_model: str
    gpu_memory_gb: int
    gpu_count: int
    region: str
    models: tuple[ModelPrice, ...] = ()

    def to_cell(self) -> Cell:
        nxt: Cell | None = None
        for m in reversed(self.models):
            b = (
                begin_cell()
                .store_uint(m.model, 256)
                .store_coins(m.price_prompt)
                .store_coins(m.price_completion)
            )
            b.store_maybe_ref(nxt)
            nxt = b.end_cell()
        b = (
            begin_cell()
            .store_uint(TAG_CAPABILITIES, 32)
            .store_uint(self.gpu_count, 8)
            .store_uint(self.gpu_memory_gb, 16)
            .store_ref(_text(self.gpu_model))
            .store_ref(_text(self.region))
        )
        b.store_maybe_ref(nxt)
        return b.end_cell()

    @classmethod
    def from_cell(cls, cell: Cell) -> Capabilities:
        try:
            s = cell.begin_parse()
            if s.load_uint(32) != TAG_CAPABILITIES:
                raise MessageError("Capabilities: wrong tag")
            count = s.load_uint(8)
            memory = s.load_uint(16)
            gpu = _load_text(s.load_ref())
            region = _load_text(s.load_ref())
            models: list[ModelPrice] = []
            nxt = s.load_maybe_ref()
            while nxt is not None:
                e = nxt.begin_parse()
                models.append(ModelPrice(e.load_uint(256), e.load_coins(), e.load_coins()))
                nxt = e.load_maybe_ref()
        except MessageError:
            raise
        except Exception as e:
            raise MessageError(f"Capabilities: malformed cell: {e}") from e
        return cls(gpu, memory, count, region, tuple(models))


MESSAGES: dict[int, type[_Body]] = {
    cls.OP: cls  # type: ignore[misc]
    for cls in (
        ReturnExcess, UpdateParams, SetImage, SetModel, ChangeOwner, RegisterProvider,
        DeployVault, SlashedStake, ForwardedFunds, ProviderInit, ProviderTopUp, RotateKey,
        UpdateCapabilities, Unstake, WithdrawStake, Claim, Slash, ProviderPayout,
        StakeReturned, SlashBounty, PayoutRequest, PayoutPaid, CommitEpoch, WithdrawFees,
        TopUpStake, FeesPaid, Deposit, Charge, Close, EscrowWithdraw, EscrowCharged,
        EscrowRefund, VaultInit, UnstakeVault, WithdrawVaultStake, VaultStakeReturned,
        Swept, SweepRegistry, SweepProvider,
    )
}  # fmt: skip


def parse_body(cell: Cell) -> _Body | None:
    """Parse any message body of the protocol by its opcode; None for an empty body."""
    s = cell.begin_parse()
    if s.remaining_bits < 32:
        if s.remaining_bits == 0 and s.remaining_refs == 0:
            return None
        raise MessageError("body shorter than an opcode")
    op = s.preload_uint(32)
    cls = MESSAGES.get(op)
    if cls is None:
        raise MessageError(f"unknown opcode {op:#010x}")
    return cls.from_cell(cell)
