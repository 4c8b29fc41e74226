"""The base of every message body: ``op:uint32`` then typed fields, the field codecs, the
module's error, and ``ReturnExcess``, which every contract sends."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

from pytoniq_core import Builder, Cell, Slice, begin_cell

from protocol.signed import SignedObjectError

from .opcodes import OP_RETURN_EXCESS, OP_SWEPT

__all__ = ["MessageError", "ReturnExcess", "Swept"]


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
