"""A small, fast codec for the fixed cell layouts of the signed objects (signed.py).

Only what those layouts need: ordinary cells (no exotic cells, no levels) of at most
1023 bits, a root whose refs are leaves, standard addresses, Coins. It writes the bits
directly into an int, computes TON representation hashes and serializes the standard
BOC exactly as pytoniq's ``Cell.to_boc()`` does by default (``b5ee9c72``, no index,
no CRC32C, no cache bits). Anything outside that raises :class:`Unsupported`, and the
caller falls back to pytoniq, so correctness never depends on this module handling a
case; it only has to agree bit-for-bit with pytoniq on the cases it accepts, which the
property tests in ``tests/contracts/test_signed_codec.py`` check.

No I/O, no pytoniq.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "BOC_MAGIC",
    "BitReader",
    "BitWriter",
    "CellBits",
    "ParsedCell",
    "Unsupported",
    "bits256",
    "cell_hash",
    "coins",
    "encode",
    "int32",
    "parse_boc",
    "read_int32",
    "read_std_address",
    "read_tail_coins",
    "serialize_boc",
    "std_address",
    "uint",
]

BOC_MAGIC = b"\xb5\xee\x9c\x72"
MAX_CELL_BITS = 1023
_ZERO_DEPTH = b"\x00\x00"
_sha256 = hashlib.sha256

CellBits = tuple[int, int]
"""The data of an ordinary cell: (value, bit length), the first bit being the most
significant of ``value``."""


class Unsupported(Exception):
    """Not a value or a BOC this fast codec handles; use the general (pytoniq) path."""


# Field encoders for layouts written as one expression (Receipt, the vouchers): each
# validates and returns the field's bits as an int (Coins: and their width).

_U256 = (1 << 256) - 1


def uint(value: int, bits: int) -> int:
    if type(value) is not int or value < 0 or value >> bits:
        raise Unsupported("not a uint of that width")
    return value


def int32(value: int) -> int:
    """An int32 (two's complement) as its 32 bits."""
    if type(value) is not int or not -(1 << 31) <= value < 1 << 31:
        raise Unsupported("not an int32")
    return value & 0xFFFFFFFF


def read_int32(bits: int) -> int:
    """The int32 whose 32 bits these are."""
    return bits - (1 << 32) if bits >> 31 else bits


def bits256(value: bytes) -> int:
    if type(value) is not bytes or len(value) != 32:
        raise Unsupported("not 32 bytes")
    return int.from_bytes(value, "big")


def coins(value: int) -> tuple[int, int]:
    """Coins = VarUInteger 16 as (bits, width): a 4-bit byte length, then the bytes."""
    if type(value) is not int or value < 0:
        raise Unsupported("not a Coins amount")
    length = (value.bit_length() + 7) >> 3
    if length > 15:
        raise Unsupported("Coins amount too large")
    return (length << (length << 3)) | value, 4 + (length << 3)


def std_address(workchain: int, hash_part: bytes) -> int:
    """addr_std$10 anycast:(Maybe Anycast)=0 workchain_id:int8 address:bits256 (267 bits)."""
    if type(workchain) is not int or not -128 <= workchain <= 127:
        raise Unsupported("workchain is not an int8")
    return ((0x400 | (workchain & 0xFF)) << 256) | bits256(hash_part)


def read_std_address(bits: int) -> tuple[int, bytes]:
    """The (workchain, hash) of 267 address bits, if addr_std without anycast."""
    head = bits >> 256
    if head >> 8 != 0b100:
        raise Unsupported("not addr_std without anycast")
    workchain = head & 0xFF
    if workchain >= 128:
        workchain -= 256
    return workchain, (bits & _U256).to_bytes(32, "big")


def read_tail_coins(bits: int, width: int) -> int:
    """Coins that are exactly the last ``width`` bits of ``bits``, in their shortest form."""
    length = (bits >> (width - 4)) & 0xF if width >= 4 else -1
    value = bits & ((1 << (width - 4)) - 1) if width >= 4 else 0
    if width != 4 + (length << 3) or (value.bit_length() + 7) >> 3 != length:
        raise Unsupported("not Coins in their shortest form")
    return value


class BitWriter:
    """Appends fields to the bits of one cell, most significant bit first."""

    __slots__ = ("n", "v")

    def __init__(self) -> None:
        self.v = 0
        self.n = 0

    def uint(self, value: int, bits: int) -> BitWriter:
        self.v = (self.v << bits) | uint(value, bits)
        self.n += bits
        return self

    def int32(self, value: int) -> BitWriter:
        self.v = (self.v << 32) | int32(value)
        self.n += 32
        return self

    def bytes32(self, value: bytes) -> BitWriter:
        self.v = (self.v << 256) | bits256(value)
        self.n += 256
        return self

    def coins(self, value: int) -> BitWriter:
        """Coins = VarUInteger 16: a 4-bit byte length, then that many big-endian bytes."""
        bits, width = coins(value)
        self.v = (self.v << width) | bits
        self.n += width
        return self

    def address(self, workchain: int, hash_part: bytes) -> BitWriter:
        """addr_std$10 anycast:(Maybe Anycast)=0 workchain_id:int8 address:bits256."""
        self.v = (self.v << 267) | std_address(workchain, hash_part)
        self.n += 267
        return self

    def end(self) -> CellBits:
        if self.n > MAX_CELL_BITS:
            raise Unsupported("more than 1023 bits")
        return self.v, self.n


class BitReader:
    """Reads fields from the bits of one cell; running short raises Unsupported."""

    __slots__ = ("n", "v")

    def __init__(self, bits: CellBits) -> None:
        self.v, self.n = bits

    def uint(self, bits: int) -> int:
        n = self.n - bits
        if n < 0:
            raise Unsupported("cell too short")
        self.n = n
        return (self.v >> n) & ((1 << bits) - 1)

    def int32(self) -> int:
        return read_int32(self.uint(32))

    def bytes32(self) -> bytes:
        return self.uint(256).to_bytes(32, "big")

    def coins(self) -> int:
        length = self.uint(4)
        value = self.uint(length << 3)
        if (value.bit_length() + 7) >> 3 != length:
            # pytoniq reads it, but it would not round-trip: not for the fast path
            raise Unsupported("Coins not in their shortest form")
        return value

    def address(self) -> tuple[int, bytes]:
        """A standard address without anycast, as (workchain, hash); others are Unsupported."""
        return read_std_address(self.uint(267))

    def end(self) -> None:
        if self.n:
            raise Unsupported("trailing bits")


def _repr_head(bits: CellBits, refs: int) -> bytes:
    """Descriptors d1 d2 then the data bytes, completed with a 1 bit and zeros."""
    value, n = bits
    rem = n & 7
    if rem:
        pad = 8 - rem
        value = (value << pad) | (1 << (pad - 1))
    size = (n + 7) >> 3
    return bytes((refs, (n >> 3) + size)) + value.to_bytes(size, "big")


def cell_hash(root: CellBits, leaves: tuple[CellBits, ...] = ()) -> bytes:
    """The representation hash of an ordinary cell whose refs are ordinary leaves."""
    return _hash_heads(_repr_head(root, len(leaves)), [_repr_head(leaf, 0) for leaf in leaves])


def serialize_boc(root: CellBits, leaves: tuple[CellBits, ...] = ()) -> bytes:
    """What pytoniq's ``Cell.to_boc()`` returns for this cell, byte for byte."""
    return _boc_heads(_repr_head(root, len(leaves)), [_repr_head(leaf, 0) for leaf in leaves])


def encode(root: CellBits, leaves: tuple[CellBits, ...] = ()) -> tuple[bytes, bytes]:
    """``(serialize_boc(root, leaves), cell_hash(root, leaves))``."""
    root_head = _repr_head(root, len(leaves))
    leaf_heads = [_repr_head(leaf, 0) for leaf in leaves]
    return _boc_heads(root_head, leaf_heads), _hash_heads(root_head, leaf_heads)


def _hash_heads(root_head: bytes, leaf_heads: list[bytes]) -> bytes:
    if not leaf_heads:
        return _sha256(root_head).digest()
    h = _sha256(root_head)
    h.update(_ZERO_DEPTH * len(leaf_heads))  # a leaf has depth 0
    for head in leaf_heads:
        h.update(_sha256(head).digest())
    return h.digest()


def _boc_heads(root_head: bytes, leaf_heads: list[bytes]) -> bytes:
    # pytoniq orders cells root first, then depth-first, a repeated cell moving to its
    # last occurrence; equal leaves are one cell.
    order: list[bytes] = []
    for head in leaf_heads:
        if head in order:
            order.remove(head)
        order.append(head)
    cells = len(order) + 1
    if cells > 255:
        raise Unsupported("too many cells")
    payload = root_head + bytes(order.index(h) + 1 for h in leaf_heads)
    payload += b"".join(order)
    total = len(payload)
    offset_bytes = (total.bit_length() + 7) >> 3
    # flags: no index, no CRC32C, no cache bits; size_bytes = 1 (cells <= 255)
    return (
        BOC_MAGIC
        + bytes((1, offset_bytes, cells, 1, 0))
        + total.to_bytes(offset_bytes, "big")
        + b"\x00"
        + payload
    )


class ParsedCell:
    """An ordinary cell read from a BOC: its bits and its refs."""

    __slots__ = ("bits", "refs")

    def __init__(self, bits: CellBits, refs: list[ParsedCell]) -> None:
        self.bits = bits
        self.refs = refs


def parse_boc(boc: bytes) -> ParsedCell:
    """The root of a BOC in the form :func:`serialize_boc` writes (one root, 1-byte cell
    indices, no index, no CRC32C, ordinary cells). Lenient about what the caller checks
    anyway by re-serializing and comparing bytes; raises Unsupported on anything else."""
    if len(boc) < 11 or boc[:4] != BOC_MAGIC or boc[4] != 1 or boc[7] != 1 or boc[8] != 0:
        raise Unsupported("not a plain one-root BOC")
    offset_bytes = boc[5]
    if not 1 <= offset_bytes <= 2:
        raise Unsupported("unexpected offset size")
    cells = boc[6]
    i = 9 + offset_bytes
    total = int.from_bytes(boc[9:i], "big")
    if len(boc) != i + 1 + total or boc[i] != 0:
        raise Unsupported("unexpected root or length")
    i += 1
    end = len(boc)
    raw: list[tuple[CellBits, bytes]] = []
    for _ in range(cells):
        if i + 2 > end:
            raise Unsupported("truncated cell")
        d1 = boc[i]
        d2 = boc[i + 1]
        if d1 > 4:
            raise Unsupported("exotic, level, hashes or too many refs")
        size = (d2 + 1) >> 1
        j = i + 2 + size
        if j + d1 > end:
            raise Unsupported("truncated cell")
        value = int.from_bytes(boc[i + 2 : j], "big")
        n = size << 3
        if d2 & 1:
            if not value & 0x7F:
                raise Unsupported("no completion tag in the last 7 bits")
            tail = (value & -value).bit_length()  # the completion 1 and the zeros after it
            value >>= tail
            n -= tail
        raw.append(((value, n), boc[j : j + d1]))
        i = j + d1
    if i != end:
        raise Unsupported("cell data length mismatch")
    built: list[ParsedCell | None] = [None] * cells
    for ci in range(cells - 1, -1, -1):
        bits, ref_ids = raw[ci]
        refs: list[ParsedCell] = []
        for r in ref_ids:
            if not ci < r < cells:
                raise Unsupported("refs not in topological order")
            ref = built[r]
            assert ref is not None
            refs.append(ref)
        built[ci] = ParsedCell(bits, refs)
    root = built[0] if cells else None
    if root is None:
        raise Unsupported("no cells")
    return root
