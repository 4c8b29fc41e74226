"""Messages, transactions and traces as toncenter shows them.

A :class:`Message` is a ``raw.message``, a :class:`Transaction` a ``raw.transaction`` whose
phase details (gas, fees, exit codes, bounces) are parsed from its BOC with pytoniq_core,
and a :class:`Trace` every transaction one message chain caused. Pure data: waiting for
them is in :mod:`contracts.chain.waiting`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pytoniq_core import Address, Builder, Cell, Slice
from pytoniq_core.tlb.transaction import MessageAny
from pytoniq_core.tlb.transaction import Transaction as TlbTransaction

from .results import _b64

__all__ = ["Message", "Trace", "Transaction", "external_message_hash_norm"]


def _addr_or_none(text: str | None) -> Address | None:
    if not text:
        return None
    return Address(text)


@dataclass
class Message:
    """A message as toncenter shows it (``raw.message``)."""

    hash: bytes
    source: str  # user-friendly, "" for external-in
    destination: str  # "" for external-out
    value: int
    fwd_fee: int
    ihr_fee: int
    created_lt: int
    body_b64: str
    init_state_b64: str
    comment: str
    bounce: bool | None = None
    bounced: bool | None = None

    @classmethod
    def from_json(cls, j: dict[str, Any]) -> Message:
        md = j.get("msg_data") or {}
        return cls(
            hash=_b64(j["hash"]) if j.get("hash") else b"",
            source=j.get("source") or "",
            destination=j.get("destination") or "",
            value=int(j.get("value") or 0),
            fwd_fee=int(j.get("fwd_fee") or 0),
            ihr_fee=int(j.get("ihr_fee") or 0),
            created_lt=int(j.get("created_lt") or 0),
            body_b64=md.get("body") or "",
            init_state_b64=md.get("init_state") or "",
            comment=j.get("message") or "",
            bounce=j.get("bounce"),
            bounced=j.get("bounced"),
        )

    @property
    def is_external_in(self) -> bool:
        return self.source == ""

    @cached_property
    def source_address(self) -> Address | None:
        return _addr_or_none(self.source)

    @cached_property
    def destination_address(self) -> Address | None:
        return _addr_or_none(self.destination)

    @cached_property
    def body(self) -> Cell:
        if not self.body_b64:
            return Cell.empty()
        return Cell.one_from_boc(_b64(self.body_b64))

    @property
    def op(self) -> int | None:
        """The 32-bit opcode at the start of the body, if any."""
        s = self.body.begin_parse()
        return s.load_uint(32) if s.remaining_bits >= 32 else None

    @property
    def query_id(self) -> int | None:
        s = self.body.begin_parse()
        if s.remaining_bits < 96:
            return None
        s.skip_bits(32)
        return s.load_uint(64)

    @cached_property
    def hash_norm(self) -> bytes | None:
        """Normalized hash of an external-in message (None for internal ones)."""
        if not self.is_external_in or not self.destination:
            return None
        return _norm_hash(Address(self.destination), self.body)


def _norm_hash(dest: Address, body: Cell) -> bytes:
    return (
        Builder()
        .store_uint(0b10, 2)
        .store_uint(0, 2)
        .store_address(dest)
        .store_coins(0)
        .store_bit(0)
        .store_bit(1)
        .store_ref(body)
        .end_cell()
        .hash
    )


def external_message_hash_norm(boc: bytes | Cell) -> bytes:
    """Normalized hash of a serialized external-in message (matches toncenter's hash_norm)."""
    cell = boc if isinstance(boc, Cell) else Cell.one_from_boc(boc)
    msg = MessageAny.deserialize(cell.begin_parse())
    return _norm_hash(msg.info.dest, msg.body)


@dataclass
class Transaction:
    """A transaction (``raw.transaction``); phase details are parsed from its BOC on demand."""

    account: str
    lt: int
    hash: bytes
    utime: int
    fee: int
    storage_fee: int
    other_fee: int
    in_msg: Message | None
    out_msgs: list[Message]
    data_b64: str

    @classmethod
    def from_json(cls, j: dict[str, Any], account: str = "") -> Transaction:
        tid = j["transaction_id"]
        addr = j.get("address")
        if isinstance(addr, dict):
            account = addr.get("account_address") or account
        return cls(
            account=account,
            lt=int(tid["lt"]),
            hash=_b64(tid["hash"]),
            utime=int(j.get("utime") or 0),
            fee=int(j.get("fee") or 0),
            storage_fee=int(j.get("storage_fee") or 0),
            other_fee=int(j.get("other_fee") or 0),
            in_msg=Message.from_json(j["in_msg"]) if j.get("in_msg") else None,
            out_msgs=[Message.from_json(m) for m in j.get("out_msgs") or []],
            data_b64=j.get("data") or "",
        )

    @cached_property
    def parsed(self) -> TlbTransaction:
        """The transaction parsed from its BOC (pytoniq_core TL-B)."""
        return TlbTransaction.deserialize(Slice.one_from_boc(_b64(self.data_b64)))

    @property
    def _compute(self) -> Any:
        return getattr(self.parsed.description, "compute_ph", None)

    @property
    def compute_skipped(self) -> bool:
        cp = self._compute
        return cp is None or cp.type_ == "skipped"

    @property
    def gas_used(self) -> int:
        """Gas used by the compute phase (0 if skipped)."""
        cp = self._compute
        return 0 if cp is None or cp.type_ == "skipped" else int(cp.gas_used)

    @property
    def gas_fees(self) -> int:
        cp = self._compute
        return 0 if cp is None or cp.type_ == "skipped" else int(cp.gas_fees)

    @property
    def exit_code(self) -> int | None:
        """Compute-phase exit code; None if the compute phase was skipped."""
        cp = self._compute
        return None if cp is None or cp.type_ == "skipped" else int(cp.exit_code)

    @property
    def compute_success(self) -> bool:
        cp = self._compute
        return cp is not None and cp.type_ != "skipped" and bool(cp.success)

    @property
    def action_result_code(self) -> int | None:
        action = getattr(self.parsed.description, "action", None)
        return None if action is None else int(action.result_code)

    @property
    def aborted(self) -> bool:
        return bool(getattr(self.parsed.description, "aborted", False))

    @property
    def success(self) -> bool:
        """Compute succeeded, actions (if any) succeeded, not aborted."""
        return self.compute_success and not self.aborted and self.action_result_code in (None, 0)

    @property
    def total_fees(self) -> int:
        return int(self.parsed.total_fees.grams)

    @property
    def bounced_in(self) -> bool:
        """The inbound message is a bounce."""
        return bool(self.in_msg and self.in_msg.bounced)

    @property
    def bounced_out(self) -> list[Message]:
        """Outbound messages that are bounces (this transaction bounced its inbound value)."""
        return [m for m in self.out_msgs if m.bounced]

    @property
    def address(self) -> Address:
        return Address((0, self.parsed.account_addr)) if not self.account else Address(self.account)


@dataclass
class Trace:
    """Every transaction a message chain caused, in execution (BFS) order."""

    transactions: list[Transaction] = field(default_factory=list)

    @property
    def root(self) -> Transaction:
        return self.transactions[0]

    @property
    def total_gas_used(self) -> int:
        return sum(t.gas_used for t in self.transactions)

    @property
    def total_fees(self) -> int:
        return sum(t.fee for t in self.transactions)

    @property
    def all_success(self) -> bool:
        return all(t.success for t in self.transactions)

    def __len__(self) -> int:
        return len(self.transactions)

    def __iter__(self):
        return iter(self.transactions)
