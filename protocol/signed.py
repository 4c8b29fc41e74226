"""Signed off-chain objects: receipts, spend vouchers, payout vouchers, epoch commits.

Each object is one cell that starts with a 32-bit domain tag and names the network (its
global id, config param 19) and the contract it is for, so a signature made for one
purpose, network or contract is useless for another: the same StateInit has the same
address on every network, and a contract refuses an object whose global id is not its
chain's. The signature is ed25519 over the cell's representation hash: exactly what the
Tolk contracts check with ``isSignatureValid(cell.hash(), signature, key)``.

Every signer passes the global id explicitly (there is no default): ``MAINNET_GLOBAL_ID``,
``TESTNET_GLOBAL_ID``, ``DEVNET_GLOBAL_ID`` (the Imago devnet's own), or what
``ToncenterClient.get_global_id()`` reads from the chain. Every verifier compares it with
the network it expects (``check_network``).

TL-B (the contracts parse the same layouts, see ``contracts/common/signed.tolk``)::

    receipt#52435054 global_id:int32 escrow:MsgAddressInt job_id:uint256 time:uint32
        body:^[model:uint256 prompt_tokens:uint32 completion_tokens:uint32
               price_prompt:Coins price_completion:Coins amount:Coins]
        digests:^[request_hash:uint256 response_hash:uint256] = Receipt;
    spend#5350454e global_id:int32 escrow:MsgAddressInt vault:MsgAddressInt
        cumulative:Coins = SpendVoucher;
    payout#5041594f global_id:int32 vault:MsgAddressInt provider:MsgAddressInt epoch:uint64
        cumulative:Coins = PayoutVoucher;
    epoch#45504f43 global_id:int32 vault:MsgAddressInt epoch:uint64 root:uint256
        charged:Coins paid:Coins fees:Coins leaves:uint32 = EpochCommit;

Prices are nanoTON per million tokens. An epoch commit's charged, paid and fees are
cumulative totals (docs/contracts.md).

``hash``, ``to_boc``, ``encode``, ``from_boc`` and ``parse_boc`` take a fast path
(``contracts/protocol/cells.py``) that writes and reads these layouts directly, bit for
bit what pytoniq gives; pytoniq stays the fallback for anything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pytoniq_core import Address, Builder, Cell, Slice, begin_cell

from protocol import cells
from protocol.cells import BitReader, BitWriter, CellBits, Unsupported

__all__ = [
    "DEVNET_GLOBAL_ID",
    "MAINNET_GLOBAL_ID",
    "TESTNET_GLOBAL_ID",
    "EpochCommit",
    "PayoutVoucher",
    "Receipt",
    "SignedObjectError",
    "SpendVoucher",
    "check_network",
    "cost_nanoton",
    "model_hash",
    "network_global_id",
    "signature_valid",
]

TAG_RECEIPT = 0x52435054  # "RCPT"
TAG_SPEND = 0x5350454E  # "SPEN"
TAG_PAYOUT = 0x5041594F  # "PAYO"
TAG_EPOCH = 0x45504F43  # "EPOC"

TOKENS_PER_PRICE_UNIT = 1_000_000

# Network global ids (config param 19). Every signed object names its network; a contract
# refuses one whose global id is not its chain's.
MAINNET_GLOBAL_ID = -239
TESTNET_GLOBAL_ID = -3
DEVNET_GLOBAL_ID = -1000  # the Imago devnet's (contracts/devnet/server.mjs)


def network_global_id(global_id: int | None, *, devnet: bool) -> int:
    """The global id a party signs and checks with: ``global_id`` if given, else on the
    devnet the devnet's. Off the devnet there is no default: a party signing for mainnet
    must say so (or read it from its chain: ``ToncenterClient.get_global_id``)."""
    if global_id is not None:
        if not -(1 << 31) <= global_id < 1 << 31:
            raise ValueError(f"a global id is an int32, not {global_id}")
        return global_id
    if devnet:
        return DEVNET_GLOBAL_ID
    raise ValueError(
        "the network's global id is needed off the devnet: "
        f"mainnet {MAINNET_GLOBAL_ID}, testnet {TESTNET_GLOBAL_ID} (config param 19)"
    )


class SignedObjectError(ValueError):
    """A cell that does not parse as the expected signed object, or one for another
    network."""


def check_network(obj: _Signed, global_id: int) -> None:
    """Raise SignedObjectError unless ``obj`` names the network ``global_id``."""
    if obj.global_id != global_id:
        raise SignedObjectError(
            f"{type(obj).__name__} signed for network {obj.global_id}, not {global_id}"
        )


def signature_valid(signature: bytes, cell_hash: bytes, public_key: bytes) -> bool:
    """Ed25519 over a cell hash, as the contracts check it. Check a received object
    against the hash of the cell as received (``parse_boc``), which is what the
    contract will hash, never against a re-encoding of its fields."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, cell_hash)
    except InvalidSignature:
        return False
    return True


def model_hash(model_id: str) -> int:
    """The 256-bit on-chain id of a model name (sha256 of its UTF-8 name)."""
    return int.from_bytes(hashlib.sha256(model_id.encode()).digest(), "big")


def cost_nanoton(
    prompt_tokens: int, completion_tokens: int, price_prompt: int, price_completion: int
) -> int:
    """Cost of a job in nanoTON, rounded up so that a node is never paid less than owed."""
    numerator = prompt_tokens * price_prompt + completion_tokens * price_completion
    return -(-numerator // TOKENS_PER_PRICE_UNIT)


class _Signed:
    TAG: ClassVar[int]
    global_id: int

    def to_cell(self) -> Cell:
        b = begin_cell().store_uint(self.TAG, 32).store_int(self.global_id, 32)
        return self._store(b).end_cell()

    def _store(self, b: Builder) -> Builder:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _load(cls, global_id: int, s: Slice) -> Self:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_cell(cls, cell: Cell) -> Self:
        try:
            s = cell.begin_parse()
            tag = s.load_uint(32)
            if tag != cls.TAG:
                raise SignedObjectError(f"{cls.__name__}: wrong domain tag {tag:#010x}")
            obj = cls._load(s.load_int(32), s)
        except SignedObjectError:
            raise
        except Exception as e:  # pytoniq raises bare errors on short slices
            raise SignedObjectError(f"{cls.__name__}: malformed cell: {e}") from e
        if s.remaining_bits or s.remaining_refs:
            raise SignedObjectError(f"{cls.__name__}: trailing data")
        return obj

    # The fast path (contracts/protocol/cells.py) writes and reads these layouts directly;
    # pytoniq remains the reference and the fallback for whatever the fast path does not
    # handle (odd field values, other BOC forms, other address kinds), so results never
    # depend on it.

    def _fast_cells(self) -> tuple[CellBits, tuple[CellBits, ...]]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def _fast_load(cls, root: cells.ParsedCell) -> Self:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_boc(self) -> bytes:
        try:
            root, leaves = self._fast_cells()
            return cells.serialize_boc(root, leaves)
        except Unsupported:
            return self.to_cell().to_boc()

    @classmethod
    def from_boc(cls, boc: bytes) -> Self:
        return cls.parse_boc(boc)[0]

    @classmethod
    def parse_boc(cls, boc: bytes) -> tuple[Self, bytes]:
        """The object in a BOC and the representation hash of its cell as received (what a
        signature covers and a contract checks). Raises SignedObjectError."""
        if type(boc) is bytes:
            try:
                root = cells.parse_boc(boc)
                obj = cls._fast_load(root)  # reads fields only in their canonical form
                # Accept only a BOC that is exactly the canonical encoding of the cells
                # read, so that the cells received are the cells _fast_cells() writes for
                # obj, and their hash is that of the cell as received.
                canonical, cell_hash = cells.encode(root.bits, tuple(r.bits for r in root.refs))
                if canonical == boc:
                    return obj, cell_hash
            except Unsupported:
                pass
        try:
            cell = Cell.one_from_boc(boc)
        except Exception as e:
            raise SignedObjectError(f"{cls.__name__}: not a BOC: {e}") from e
        return cls.from_cell(cell), cell.hash

    def encode(self) -> tuple[bytes, bytes]:
        """``(self.to_boc(), self.hash)``, sharing the work: what a signer sends and signs."""
        try:
            root, leaves = self._fast_cells()
            return cells.encode(root, leaves)
        except Unsupported:
            cell = self.to_cell()
            return cell.to_boc(), cell.hash

    @property
    def hash(self) -> bytes:
        try:
            root, leaves = self._fast_cells()
            return cells.cell_hash(root, leaves)
        except Unsupported:
            return self.to_cell().hash

    def sign(self, key: Ed25519PrivateKey) -> bytes:
        return key.sign(self.hash)

    def verify(self, signature: bytes, public_key: bytes, *, global_id: int) -> bool:
        """Signed by ``public_key`` and for the network ``global_id``."""
        return self.global_id == global_id and signature_valid(signature, self.hash, public_key)


@dataclass(frozen=True, slots=True)
class Receipt(_Signed):
    """Node → client, one per job, signed by the node key."""

    TAG: ClassVar[int] = TAG_RECEIPT

    global_id: int
    escrow: Address
    job_id: int
    time: int
    model: int
    prompt_tokens: int
    completion_tokens: int
    price_prompt: int
    price_completion: int
    amount: int
    request_hash: bytes
    response_hash: bytes

    def _store(self, b: Builder) -> Builder:
        body = (
            begin_cell()
            .store_uint(self.model, 256)
            .store_uint(self.prompt_tokens, 32)
            .store_uint(self.completion_tokens, 32)
            .store_coins(self.price_prompt)
            .store_coins(self.price_completion)
            .store_coins(self.amount)
            .end_cell()
        )
        digests = (
            begin_cell()
            .store_bytes(_digest(self.request_hash))
            .store_bytes(_digest(self.response_hash))
            .end_cell()
        )
        return (
            b.store_address(self.escrow)
            .store_uint(self.job_id, 256)
            .store_uint(self.time, 32)
            .store_ref(body)
            .store_ref(digests)
        )

    @classmethod
    def _load(cls, global_id: int, s: Slice) -> Receipt:
        escrow = s.load_address()
        job_id = s.load_uint(256)
        time = s.load_uint(32)
        body = s.load_ref().begin_parse()
        digests = s.load_ref().begin_parse()
        return cls(
            global_id=global_id,
            escrow=escrow,
            job_id=job_id,
            time=time,
            model=body.load_uint(256),
            prompt_tokens=body.load_uint(32),
            completion_tokens=body.load_uint(32),
            price_prompt=body.load_coins(),
            price_completion=body.load_coins(),
            amount=body.load_coins(),
            request_hash=digests.load_bytes(32),
            response_hash=digests.load_bytes(32),
        )

    # The hot one, written as expressions over ints rather than with BitWriter/BitReader.
    # root: tag:32 global_id:32 escrow:267 job_id:256 time:32 = 619 bits; digests: 512 bits.

    def _fast_cells(self) -> tuple[CellBits, tuple[CellBits, ...]]:
        pp, pp_bits = cells.coins(self.price_prompt)
        pc, pc_bits = cells.coins(self.price_completion)
        am, am_bits = cells.coins(self.amount)
        body = (cells.uint(self.model, 256) << 64) | (cells.uint(self.prompt_tokens, 32) << 32)
        body = (body | cells.uint(self.completion_tokens, 32)) << pp_bits | pp
        body = ((body << pc_bits | pc) << am_bits) | am
        digests = (cells.bits256(self.request_hash) << 256) | cells.bits256(self.response_hash)
        head = (TAG_RECEIPT << 32) | cells.int32(self.global_id)
        escrow = _address_bits(self.escrow)
        root = (((head << 267) | escrow) << 288) | (cells.uint(self.job_id, 256) << 32)
        root |= cells.uint(self.time, 32)
        return (root, 619), ((body, 320 + pp_bits + pc_bits + am_bits), (digests, 512))

    @classmethod
    def _fast_load(cls, root: cells.ParsedCell) -> Receipt:
        refs = root.refs
        if len(refs) != 2:
            raise Unsupported("a receipt has two refs")
        body_cell, digests_cell = refs
        r, n = root.bits
        d, dn = digests_cell.bits
        if n != 619 or dn != 512 or body_cell.refs or digests_cell.refs or r >> 587 != TAG_RECEIPT:
            raise Unsupported("not a receipt's cells")
        body = BitReader(body_cell.bits)
        obj = cls(
            cells.read_int32((r >> 555) & 0xFFFFFFFF),
            Address(cells.read_std_address((r >> 288) & _ADDRESS_MASK)),
            (r >> 32) & _U256,
            r & 0xFFFFFFFF,
            body.uint(256),
            body.uint(32),
            body.uint(32),
            body.coins(),
            body.coins(),
            body.coins(),
            (d >> 256).to_bytes(32, "big"),
            (d & _U256).to_bytes(32, "big"),
        )
        body.end()
        return obj

    @property
    def priced_amount(self) -> int:
        """What the amount must be given the token counts and unit prices."""
        return cost_nanoton(
            self.prompt_tokens, self.completion_tokens, self.price_prompt, self.price_completion
        )


@dataclass(frozen=True, slots=True)
class SpendVoucher(_Signed):
    """Client → matcher: lets the vault charge the escrow up to ``cumulative`` in total."""

    TAG: ClassVar[int] = TAG_SPEND

    global_id: int
    escrow: Address
    vault: Address
    cumulative: int

    def _store(self, b: Builder) -> Builder:
        return b.store_address(self.escrow).store_address(self.vault).store_coins(self.cumulative)

    @classmethod
    def _load(cls, global_id: int, s: Slice) -> SpendVoucher:
        return cls(
            global_id=global_id,
            escrow=s.load_address(),
            vault=s.load_address(),
            cumulative=s.load_coins(),
        )

    # tag:32 global_id:32 escrow:267 vault:267 cumulative:Coins

    def _fast_cells(self) -> tuple[CellBits, tuple[CellBits, ...]]:
        c, c_bits = cells.coins(self.cumulative)
        head = (TAG_SPEND << 32) | cells.int32(self.global_id)
        bits = (head << 534) | (_address_bits(self.escrow) << 267)
        bits = ((bits | _address_bits(self.vault)) << c_bits) | c
        return (bits, 598 + c_bits), ()

    @classmethod
    def _fast_load(cls, root: cells.ParsedCell) -> SpendVoucher:
        v, n = root.bits
        c_bits = n - 598
        top = v >> c_bits if c_bits >= 0 else 0
        if root.refs or top >> 566 != TAG_SPEND:
            raise Unsupported("not a spend voucher's cell")
        return cls(
            cells.read_int32((top >> 534) & 0xFFFFFFFF),
            Address(cells.read_std_address((top >> 267) & _ADDRESS_MASK)),
            Address(cells.read_std_address(top & _ADDRESS_MASK)),
            cells.read_tail_coins(v, c_bits),
        )


@dataclass(frozen=True, slots=True)
class PayoutVoucher(_Signed):
    """Matcher → node: the vault pays ``provider`` up to ``cumulative`` in total.

    ``epoch`` is the epoch the voucher was issued in; the Vault refuses a voucher whose
    epoch it has not seen committed, which enforces invariant 6 on-chain.
    """

    TAG: ClassVar[int] = TAG_PAYOUT

    global_id: int
    vault: Address
    provider: Address
    epoch: int
    cumulative: int

    def _store(self, b: Builder) -> Builder:
        return (
            b.store_address(self.vault)
            .store_address(self.provider)
            .store_uint(self.epoch, 64)
            .store_coins(self.cumulative)
        )

    @classmethod
    def _load(cls, global_id: int, s: Slice) -> PayoutVoucher:
        return cls(
            global_id=global_id,
            vault=s.load_address(),
            provider=s.load_address(),
            epoch=s.load_uint(64),
            cumulative=s.load_coins(),
        )

    # tag:32 global_id:32 vault:267 provider:267 epoch:64 cumulative:Coins

    def _fast_cells(self) -> tuple[CellBits, tuple[CellBits, ...]]:
        c, c_bits = cells.coins(self.cumulative)
        head = (TAG_PAYOUT << 32) | cells.int32(self.global_id)
        bits = (head << 598) | (_address_bits(self.vault) << 331)
        bits |= (_address_bits(self.provider) << 64) | cells.uint(self.epoch, 64)
        return ((bits << c_bits) | c, 662 + c_bits), ()

    @classmethod
    def _fast_load(cls, root: cells.ParsedCell) -> PayoutVoucher:
        v, n = root.bits
        c_bits = n - 662
        top = v >> c_bits if c_bits >= 0 else 0
        if root.refs or top >> 630 != TAG_PAYOUT:
            raise Unsupported("not a payout voucher's cell")
        return cls(
            cells.read_int32((top >> 598) & 0xFFFFFFFF),
            Address(cells.read_std_address((top >> 331) & _ADDRESS_MASK)),
            Address(cells.read_std_address((top >> 64) & _ADDRESS_MASK)),
            top & 0xFFFFFFFFFFFFFFFF,
            cells.read_tail_coins(v, c_bits),
        )


@dataclass(frozen=True, slots=True)
class EpochCommit(_Signed):
    """Matcher → Vault: the Merkle root and the cumulative totals of the vault's ledger at
    the end of one settlement epoch: ``charged`` (received from escrows), ``paid`` (owed
    to providers: the sum of their latest payout vouchers), ``fees`` (protocol fees).
    The Vault refuses totals that go backwards or beyond its charges, and payouts above
    ``paid``."""

    TAG: ClassVar[int] = TAG_EPOCH

    global_id: int
    vault: Address
    epoch: int
    root: bytes
    charged: int
    paid: int
    fees: int
    leaves: int

    def _store(self, b: Builder) -> Builder:
        return (
            b.store_address(self.vault)
            .store_uint(self.epoch, 64)
            .store_bytes(_digest(self.root))
            .store_coins(self.charged)
            .store_coins(self.paid)
            .store_coins(self.fees)
            .store_uint(self.leaves, 32)
        )

    @classmethod
    def _load(cls, global_id: int, s: Slice) -> EpochCommit:
        return cls(
            global_id=global_id,
            vault=s.load_address(),
            epoch=s.load_uint(64),
            root=s.load_bytes(32),
            charged=s.load_coins(),
            paid=s.load_coins(),
            fees=s.load_coins(),
            leaves=s.load_uint(32),
        )

    def _fast_cells(self) -> tuple[CellBits, tuple[CellBits, ...]]:
        w = _write_address(BitWriter().uint(TAG_EPOCH, 32).int32(self.global_id), self.vault)
        w = w.uint(self.epoch, 64).bytes32(self.root)
        w = w.coins(self.charged).coins(self.paid).coins(self.fees)
        return w.uint(self.leaves, 32).end(), ()

    @classmethod
    def _fast_load(cls, root: cells.ParsedCell) -> EpochCommit:
        s = _open(root, TAG_EPOCH, 0)
        obj = cls(
            s.int32(),
            _read_address(s),
            s.uint(64),
            s.bytes32(),
            s.coins(),
            s.coins(),
            s.coins(),
            s.uint(32),
        )
        s.end()
        return obj


def _digest(value: bytes) -> bytes:
    if len(value) != 32:
        raise SignedObjectError(f"a digest is 32 bytes, got {len(value)}")
    return value


_U256 = (1 << 256) - 1
_ADDRESS_MASK = (1 << 267) - 1


def _address_bits(address: Address) -> int:
    # pytoniq's store_address writes any Address as addr_std without anycast.
    if not isinstance(address, Address):
        raise Unsupported("not an Address")
    return cells.std_address(address.wc, address.hash_part)


def _write_address(w: BitWriter, address: Address) -> BitWriter:
    if not isinstance(address, Address):
        raise Unsupported("not an Address")
    return w.address(address.wc, address.hash_part)


def _read_address(r: BitReader) -> Address:
    return Address(r.address())


def _open(cell: cells.ParsedCell, tag: int | None, refs: int) -> BitReader:
    """A reader over ``cell``, which has ``refs`` leaf refs and starts with ``tag``."""
    if len(cell.refs) != refs or any(ref.refs for ref in cell.refs):
        raise Unsupported("unexpected refs")
    r = BitReader(cell.bits)
    if tag is not None and r.uint(32) != tag:
        raise Unsupported("another domain tag")
    return r
