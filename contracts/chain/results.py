"""What the toncenter v2 API answers, typed.

:class:`ToncenterError` is an error it answers (or the transport's). The frozen dataclasses
are the results of its account, get-method, sending, fee and masterchain calls, and
``encode_stack``/``decode_stack`` translate get-method stacks. Pure data: the calls are in
:mod:`contracts.chain.toncenter`; transactions and messages in
:mod:`contracts.chain.transactions`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pytoniq_core import Address, Builder, Cell, Slice

__all__ = [
    "AddressInfo",
    "FeeEstimate",
    "GetMethodResult",
    "MasterchainInfo",
    "SentMessage",
    "ToncenterError",
    "WalletInfo",
    "decode_stack",
    "encode_stack",
]


class ToncenterError(Exception):
    """An error answered by the API (``{"ok": false, "error", "code"}``) or the transport.

    ``code`` is toncenter's code (the HTTP status for most errors); ``status`` is the
    HTTP status (0 for transport failures); ``exit_code`` is set when the error
    reports a TVM exit code.
    """

    def __init__(self, code: int, message: str, *, status: int = 0, exit_code: int | None = None):
        super().__init__(f"toncenter error {code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.exit_code = exit_code


def _b64(data: str) -> bytes:
    return base64.b64decode(
        data + "=" * (-len(data) % 4), altchars=b"-_" if "-" in data or "_" in data else None
    )


def _addr(address: Address | str) -> Address:
    if isinstance(address, Address):
        return address
    try:
        return Address(address)
    except Exception as e:  # pytoniq_core raises several types
        raise ToncenterError(416, f"Incorrect address: {address!r}") from e


# ----------------------------------------------------------------- result types


@dataclass(frozen=True)
class AddressInfo:
    """getAddressInformation."""

    address: Address
    balance: int
    state: str  # "active" | "uninitialized" | "frozen"
    code: Cell | None
    data: Cell | None
    last_transaction_lt: int
    last_transaction_hash: bytes
    sync_utime: int
    frozen_hash: bytes | None = None

    @property
    def is_active(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True)
class WalletInfo:
    """getWalletInformation."""

    address: Address
    is_wallet: bool
    balance: int
    state: str
    seqno: int | None
    wallet_id: int | None
    wallet_type: str | None
    last_transaction_lt: int
    last_transaction_hash: bytes


@dataclass(frozen=True)
class GetMethodResult:
    """runGetMethod: exit code, gas and the decoded stack (ints, Cells, lists, None)."""

    exit_code: int
    gas_used: int
    stack: list[Any]

    @property
    def ok(self) -> bool:
        return self.exit_code in (0, 1)

    def int(self, i: int) -> int:
        v = self.stack[i]
        if not isinstance(v, int):
            raise TypeError(f"stack[{i}] is {type(v).__name__}, not int")
        return v

    def cell(self, i: int) -> Cell:
        v = self.stack[i]
        if isinstance(v, Slice):
            return v.to_cell()
        if not isinstance(v, Cell):
            raise TypeError(f"stack[{i}] is {type(v).__name__}, not a cell")
        return v

    def slice(self, i: int) -> Slice:
        v = self.stack[i]
        return v if isinstance(v, Slice) else self.cell(i).begin_parse()

    def address(self, i: int) -> Address | None:
        """A MsgAddress returned as a slice (None for addr_none)."""
        return self.slice(i).load_address()


@dataclass(frozen=True)
class SentMessage:
    """sendBocReturnHash: the message hash and its normalized hash (base64 decoded)."""

    hash: bytes
    hash_norm: bytes


@dataclass(frozen=True)
class FeeEstimate:
    in_fwd_fee: int
    storage_fee: int
    gas_fee: int
    fwd_fee: int

    @property
    def total(self) -> int:
        return self.in_fwd_fee + self.storage_fee + self.gas_fee + self.fwd_fee


@dataclass(frozen=True)
class MasterchainInfo:
    seqno: int
    workchain: int
    shard: str
    root_hash: str
    file_hash: str


# ----------------------------------------------------------------- stack codec


def encode_stack(items: Sequence[Any]) -> list[list[Any]]:
    """Python values -> toncenter input stack.

    int -> num, Cell -> tvm.Cell, Slice/Address -> tvm.Slice, bytes (<=32) -> num.
    """
    out: list[list[Any]] = []
    for v in items:
        if isinstance(v, bool):
            out.append(["num", hex(-1 if v else 0)])
        elif isinstance(v, int):
            out.append(["num", hex(v) if v >= 0 else "-" + hex(-v)])
        elif isinstance(v, bytes):
            out.append(["num", hex(int.from_bytes(v, "big"))])
        elif isinstance(v, Cell):
            out.append(["tvm.Cell", base64.b64encode(v.to_boc()).decode()])
        elif isinstance(v, Slice):
            out.append(["tvm.Slice", base64.b64encode(v.to_cell().to_boc()).decode()])
        elif isinstance(v, Address):
            cell = Builder().store_address(v).end_cell()
            out.append(["tvm.Slice", base64.b64encode(cell.to_boc()).decode()])
        else:
            raise TypeError(f"cannot pass {type(v).__name__} to a get-method")
    return out


def _decode_cell_value(v: Any) -> Cell:
    if isinstance(v, dict):
        v = v.get("bytes", "")
    return Cell.one_from_boc(_b64(v))


def _decode_tl(entry: dict[str, Any]) -> Any:
    t = entry.get("@type", "")
    if t == "tvm.stackEntryNumber":
        n = entry["number"]["number"]
        return int(n)
    if t == "tvm.stackEntryCell":
        return _decode_cell_value(entry["cell"])
    if t == "tvm.stackEntrySlice":
        return _decode_cell_value(entry["slice"]).begin_parse()
    if t == "tvm.stackEntryTuple":
        return [_decode_tl(e) for e in entry["tuple"]["elements"]]
    if t == "tvm.stackEntryList":
        return [_decode_tl(e) for e in entry["list"]["elements"]]
    return None


def decode_stack(stack: Iterable[Sequence[Any]]) -> list[Any]:
    """toncenter output stack -> Python values (int, Cell, Slice, list, None)."""
    out: list[Any] = []
    for entry in stack:
        kind, value = entry[0], entry[1] if len(entry) > 1 else None
        if kind in ("num", "number", "int"):
            s = str(value)
            neg = s.startswith("-")
            s = s[1:] if neg else s
            n = int(s, 16) if s.lower().startswith("0x") else int(s)
            out.append(-n if neg else n)
        elif kind in ("cell", "tvm.Cell"):
            out.append(_decode_cell_value(value))
        elif kind in ("slice", "tvm.Slice"):
            out.append(_decode_cell_value(value).begin_parse())
        elif kind in ("tuple", "list"):
            elements = value.get("elements", []) if isinstance(value, dict) else []
            out.append([_decode_tl(e) for e in elements])
        elif kind == "null":
            out.append(None)
        else:
            raise ToncenterError(0, f"unsupported stack entry {kind!r}")
    return out
