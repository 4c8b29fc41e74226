"""The fast codec of the signed objects (contracts/protocol/cells.py via signed.py) agrees
bit for bit with pytoniq, the reference: hashes, BOCs, parses; and on malformed or unusual
BOCs it behaves exactly as the pytoniq path does (SignedObjectError, or the same object
and the hash of the cell as received)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pytoniq_core import Address, Cell, begin_cell

from protocol import cells
from protocol.signed import (
    DEVNET_GLOBAL_ID,
    MAINNET_GLOBAL_ID,
    TAG_RECEIPT,
    TESTNET_GLOBAL_ID,
    EpochCommit,
    PayoutVoucher,
    Receipt,
    SignedObjectError,
    SpendVoucher,
    check_network,
)

MAX_COINS = 2**120 - 1


def _uint(bits: int) -> st.SearchStrategy[int]:
    top = 2**bits - 1
    return st.one_of(st.sampled_from([0, 1, top, top >> 1]), st.integers(0, top))


coins = st.one_of(
    st.sampled_from([0, 1, 255, 256, MAX_COINS, 2**112, 2**112 - 1]),
    st.integers(0, MAX_COINS),
    st.integers(0, 2**40),
)
# an epoch commit's three Coins share the cell: at most 13 bytes each to stay in 1023 bits
epoch_coins = st.one_of(st.sampled_from([0, 1, 2**104 - 1]), st.integers(0, 2**104 - 1))
global_ids = st.one_of(
    st.sampled_from([MAINNET_GLOBAL_ID, TESTNET_GLOBAL_ID, DEVNET_GLOBAL_ID, 0, -(2**31)]),
    st.integers(-(2**31), 2**31 - 1),
)
digest = st.binary(min_size=32, max_size=32)
address = st.builds(
    lambda wc, h: Address((wc, h)),
    st.one_of(st.sampled_from([0, -1, -128, 127]), st.integers(-128, 127)),
    digest,
)

receipts = st.builds(
    Receipt,
    global_ids,
    address,
    _uint(256),
    _uint(32),
    _uint(256),
    _uint(32),
    _uint(32),
    coins,
    coins,
    coins,
    digest,
    digest,
)
spends = st.builds(SpendVoucher, global_ids, address, address, coins)
payouts = st.builds(PayoutVoucher, global_ids, address, address, _uint(64), coins)
epochs = st.builds(
    EpochCommit,
    global_ids,
    address,
    _uint(64),
    digest,
    epoch_coins,
    epoch_coins,
    epoch_coins,
    _uint(32),
)
any_object = st.one_of(receipts, spends, payouts, epochs)

A = Address("0:" + "ab" * 32)
B = Address("-1:" + "cd" * 32)
G = DEVNET_GLOBAL_ID
SAMPLES = [
    Receipt(
        2**31 - 1,
        A,
        2**256 - 1,
        2**32 - 1,
        2**256 - 1,
        2**32 - 1,
        2**32 - 1,
        *[MAX_COINS] * 3,
        b"\xff" * 32,
        b"\xff" * 32,
    ),
    Receipt(-(2**31), B, 0, 0, 0, 0, 0, 0, 0, 0, b"\0" * 32, b"\0" * 32),
    Receipt(
        G, A, 7, 1_700_000_000, 99, 1234, 5678, 10**9, 3 * 10**9, 12_345, b"\1" * 32, b"\2" * 32
    ),
    SpendVoucher(MAINNET_GLOBAL_ID, A, B, 10**12),
    SpendVoucher(0, A, A, 0),
    PayoutVoucher(TESTNET_GLOBAL_ID, B, A, 2**64 - 1, MAX_COINS),
    EpochCommit(-1, B, 3, b"\3" * 32, MAX_COINS, MAX_COINS, 2**88 - 1, 2**32 - 1),  # 1023 bits
    EpochCommit(G, A, 0, b"\0" * 32, 0, 0, 0, 0),
]
TYPES = (Receipt, SpendVoucher, PayoutVoucher, EpochCommit)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_parse(cls: type, boc: bytes) -> tuple[object, bytes]:
    """What the code did before the fast path: pytoniq parse, from_cell, the hash as received."""
    try:
        cell = Cell.one_from_boc(boc)
    except Exception as e:
        raise SignedObjectError(str(e)) from e
    return cls.from_cell(cell), cell.hash


def outcome(parse, cls: type, boc: bytes) -> object:
    try:
        return parse(cls, boc)
    except SignedObjectError:
        return SignedObjectError


def fast_parse(cls: type, boc: bytes) -> tuple[object, bytes]:
    return cls.parse_boc(boc)


def assert_agrees(obj: object) -> None:
    cell = obj.to_cell()
    ref_boc = cell.to_boc()
    # The fast path itself (not a fallback) produces exactly pytoniq's bits.
    root, leaves = obj._fast_cells()
    assert cells.encode(root, leaves) == (ref_boc, cell.hash)
    assert obj.hash == cell.hash
    assert obj.to_boc() == ref_boc
    assert obj.encode() == (ref_boc, cell.hash)
    assert type(obj)._fast_load(cells.parse_boc(ref_boc)) == obj
    assert type(obj).parse_boc(ref_boc) == (obj, cell.hash)
    assert type(obj).from_boc(ref_boc) == obj
    assert type(obj).from_cell(Cell.one_from_boc(ref_boc)) == obj


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_samples_agree_with_pytoniq(obj: object) -> None:
    assert_agrees(obj)


@FAST
@given(receipts)
@example(SAMPLES[0])
def test_receipt_agrees_with_pytoniq(obj: Receipt) -> None:
    assert_agrees(obj)


@FAST
@given(spends)
def test_spend_voucher_agrees_with_pytoniq(obj: SpendVoucher) -> None:
    assert_agrees(obj)


@FAST
@given(payouts)
def test_payout_voucher_agrees_with_pytoniq(obj: PayoutVoucher) -> None:
    assert_agrees(obj)


@FAST
@given(epochs)
def test_epoch_commit_agrees_with_pytoniq(obj: EpochCommit) -> None:
    assert_agrees(obj)


def test_sign_and_verify_use_the_cell_hash() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    for obj in SAMPLES:
        sig = obj.sign(key)
        key.public_key().verify(sig, obj.to_cell().hash)
        assert obj.verify(sig, pub, global_id=obj.global_id)


def test_an_object_for_another_network_is_refused() -> None:
    """A voucher or receipt signed for another network's global id verifies for no other
    network, and check_network names the mismatch."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    for obj in SAMPLES:
        other = dataclasses.replace(obj, global_id=MAINNET_GLOBAL_ID ^ obj.global_id ^ G)
        assert other.global_id != obj.global_id and other.hash != obj.hash
        sig = obj.sign(key)
        assert not obj.verify(sig, pub, global_id=other.global_id)
        assert not other.verify(sig, pub, global_id=other.global_id)  # not its signature
        check_network(obj, obj.global_id)
        with pytest.raises(SignedObjectError, match="network"):
            check_network(obj, other.global_id)


# --- malformed and unusual BOCs: the same outcome as the pytoniq path, errors typed ---


def assert_same_outcome(cls: type, boc: bytes) -> None:
    got = outcome(fast_parse, cls, boc)  # anything but SignedObjectError propagates
    assert got == outcome(reference_parse, cls, boc)


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_truncated_and_extended(obj: object) -> None:
    boc = obj.to_boc()
    cls = type(obj)
    for n in range(len(boc)):
        with pytest.raises(SignedObjectError):
            cls.parse_boc(boc[:n])
    for extra in (b"\0", b"\x01", boc[-1:], b"\0" * 4, boc):
        with pytest.raises(SignedObjectError):
            cls.parse_boc(boc + extra)


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_wrong_magic_and_wrong_type(obj: object) -> None:
    boc = obj.to_boc()
    for magic in (b"\0\0\0\0", b"\xb5\xee\x9c\x73", b"\x68\xff\x65\xf3", b"\xac\xc3\xa7\x28"):
        with pytest.raises(SignedObjectError):
            type(obj).parse_boc(magic + boc[4:])
    for other in TYPES:
        if other is not type(obj):
            with pytest.raises(SignedObjectError):
                other.parse_boc(boc)
            with pytest.raises(SignedObjectError):
                other.from_boc(boc)


def test_short_headers() -> None:
    for size in range(12):
        for offset_bytes in (1, 2, 3):
            head = bytes((1, offset_bytes, 1, 1, 0)) + b"\0" * 8
            for cls in TYPES:
                with pytest.raises(SignedObjectError):
                    cls.parse_boc((cells.BOC_MAGIC + head)[:size])


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_every_bit_flip(obj: object) -> None:
    boc = obj.to_boc()
    for i in range(len(boc) * 8):
        flipped = bytearray(boc)
        flipped[i >> 3] ^= 0x80 >> (i & 7)
        assert_same_outcome(type(obj), bytes(flipped))


@settings(max_examples=300, deadline=None)
@given(
    any_object,
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    st.sampled_from(TYPES),
)
def test_random_byte_edits(obj: object, edits: list[tuple[int, int]], cls: type) -> None:
    boc = bytearray(obj.to_boc())
    for pos, byte in edits:
        boc[pos % len(boc)] = byte
    assert_same_outcome(cls, bytes(boc))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(TYPES))
def test_garbage(data: bytes, cls: type) -> None:
    assert_same_outcome(cls, cells.BOC_MAGIC + b"\x01\x01" + data)
    assert_same_outcome(cls, cells.BOC_MAGIC + b"\x01\x02" + data)
    assert_same_outcome(cls, cells.BOC_MAGIC + b"\x01" + data)
    assert_same_outcome(cls, data)


def _receipt_cell(root_bits, body=None, digests=None, refs=None) -> Cell:
    r = SAMPLES[2]
    canonical = r.to_cell()
    b = root_bits(begin_cell().store_uint(TAG_RECEIPT, 32).store_int(r.global_id, 32))
    if refs is None:
        refs = [body or canonical.refs[0], digests or canonical.refs[1]]
    for ref in refs:
        b = b.store_ref(ref)
    return b.end_cell()


def test_wrong_ref_count_and_wrong_tag() -> None:
    r = SAMPLES[2]
    canonical = r.to_cell()

    def fields(b):
        b = b.store_int(r.global_id, 32).store_address(r.escrow)
        return b.store_uint(r.job_id, 256).store_uint(r.time, 32)

    wrong_refs = (
        [],
        [canonical.refs[0]],
        [*canonical.refs, canonical.refs[1]],
        canonical.refs[::-1],
    )

    def fields_after_id(b):
        return b.store_address(r.escrow).store_uint(r.job_id, 256).store_uint(r.time, 32)

    for refs in wrong_refs:
        boc = _receipt_cell(fields_after_id, refs=refs).to_boc()
        with pytest.raises(SignedObjectError):
            Receipt.parse_boc(boc)
    wrong_tag = begin_cell().store_uint(TAG_RECEIPT ^ 1, 32)
    wrong_tag = fields(wrong_tag).store_ref(canonical.refs[0]).store_ref(canonical.refs[1])
    with pytest.raises(SignedObjectError):
        Receipt.parse_boc(wrong_tag.end_cell().to_boc())
    trailing = fields(begin_cell().store_uint(TAG_RECEIPT, 32)).store_uint(0, 1)
    trailing = trailing.store_ref(canonical.refs[0]).store_ref(canonical.refs[1])
    with pytest.raises(SignedObjectError):
        Receipt.parse_boc(trailing.end_cell().to_boc())


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_other_boc_forms_fall_back_to_pytoniq(obj: object) -> None:
    cell = obj.to_cell()
    for boc in (
        cell.to_boc(hash_crc32=True),
        cell.to_boc(has_idx=True),
        cell.to_boc(has_idx=True, hash_crc32=True),
    ):
        with pytest.raises(cells.Unsupported):
            cells.parse_boc(boc)
        assert type(obj).parse_boc(boc) == (obj, cell.hash)
    assert type(obj).from_boc(obj.to_boc().hex()) == obj  # pytoniq also took hex


def test_non_canonical_cells_are_hashed_as_received() -> None:
    """A receipt whose cells do not round-trip (Coins with a leading zero byte, an anycast
    address) still parses as before, and parse_boc gives the hash of the cell received,
    not of the re-encoding."""
    r = SAMPLES[2]
    body = (
        begin_cell()
        .store_uint(r.model, 256)
        .store_uint(r.prompt_tokens, 32)
        .store_uint(r.completion_tokens, 32)
        .store_uint(5, 4)  # 10**9 fits 4 bytes; written in 5
        .store_uint(r.price_prompt, 40)
        .store_coins(r.price_completion)
        .store_coins(r.amount)
        .end_cell()
    )
    odd = _receipt_cell(
        lambda b: b.store_address(r.escrow).store_uint(r.job_id, 256).store_uint(r.time, 32),
        body=body,
    )
    anycast = _receipt_cell(
        lambda b: (
            b.store_bits("101")
            .store_uint(3, 5)
            .store_uint(5, 3)
            .store_int(0, 8)
            .store_bytes(r.escrow.hash_part)
            .store_uint(r.job_id, 256)
            .store_uint(r.time, 32)
        )
    )
    for cell in (odd, anycast):
        boc = cell.to_boc()
        parsed, h = Receipt.parse_boc(boc)
        assert parsed == r
        assert h == cell.hash != r.hash
        assert (parsed, h) == reference_parse(Receipt, boc)


def test_unencodable_values_fail_as_before() -> None:
    """Values the fast writer refuses go to pytoniq, which fails (or not) as it did."""
    r = SAMPLES[2]
    bad = [
        Receipt(r.global_id, r.escrow, 2**256, *_fields(r)[3:]),
        Receipt(r.global_id, r.escrow, -1, *_fields(r)[3:]),
        Receipt(*_fields(r)[:10], b"short", r.response_hash),
        Receipt(2**31, *_fields(r)[1:]),
        SpendVoucher(G, A, B, 2**120),
        SpendVoucher(G, A, B, -5),
        SpendVoucher(-(2**31) - 1, A, B, 5),
        PayoutVoucher(G, A, B, 2**64, 1),
        EpochCommit(G, A, 1, b"\0" * 31, 1, 2, 3, 4),
    ]
    for obj in bad:
        with pytest.raises(Exception) as slow:
            obj.to_cell()
        with pytest.raises(slow.type):
            _ = obj.hash
        with pytest.raises(slow.type):
            obj.to_boc()
        with pytest.raises(slow.type):
            obj.encode()
    # An address pytoniq accepts but the fast writer does not (a str) still encodes.
    s = SpendVoucher(G, "0:" + "ab" * 32, B, 1)  # type: ignore[arg-type]
    assert s.hash == SpendVoucher(G, A, B, 1).hash
    assert s.to_boc() == SpendVoucher(G, A, B, 1).to_boc()
    assert s.encode() == SpendVoucher(G, A, B, 1).encode()


def _fields(obj: object) -> tuple:
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))
