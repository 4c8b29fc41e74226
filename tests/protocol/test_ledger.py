"""The epoch ledger format: roots, proofs and leaves, against a from-scratch reading of
docs/ledger.md (the reference implementation below is written from the doc, not the code)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.ledger import (
    EMPTY_ROOT,
    EscrowLeaf,
    JobRecord,
    LedgerFormatError,
    ProofStep,
    ProviderLeaf,
    fee_of,
    merkle_proof,
    merkle_root,
    verify_proof,
)

ESCROW = "0:" + "e5" * 32
PROVIDER = "0:" + "9a" * 32


def reference_root(leaves: list[bytes]) -> bytes:
    """docs/ledger.md, step by step."""
    if not leaves:
        return bytes(32)
    level = leaves
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level), 2):
            if i + 1 < len(level):
                nxt.append(hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest())
            else:
                nxt.append(level[i])
        level = nxt
    return level[0]


def job(n: int, amount: int = 1000) -> JobRecord:
    return JobRecord(
        salt=bytes([n]) * 32,
        job_id=n.to_bytes(32, "big"),
        escrow=ESCROW,
        provider=PROVIDER,
        model=hashlib.sha256(b"m").digest(),
        prompt_tokens=10,
        completion_tokens=20,
        price_prompt=20_000_000,
        price_completion=60_000_000,
        amount=amount,
        receipt_hash=bytes(32),
    )


hashes = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40)


@given(hashes)
def test_root_matches_the_documented_algorithm(leaves: list[bytes]) -> None:
    assert merkle_root(leaves) == reference_root(leaves)


@given(hashes, st.data())
def test_every_leaf_has_a_proof_and_a_wrong_leaf_has_none(leaves: list[bytes], data) -> None:
    root = merkle_root(leaves)
    i = data.draw(st.integers(0, len(leaves) - 1))
    proof = merkle_proof(leaves, i)
    assert verify_proof(leaves[i], proof, root)
    assert not verify_proof(hashlib.sha256(leaves[i]).digest(), proof, root)
    if proof:
        flipped = [ProofStep(proof[0].sibling, "left" if proof[0].side == "right" else "right")]
        assert not verify_proof(leaves[i], flipped + proof[1:], root) or (
            proof[0].sibling == leaves[i]
        )


def test_empty_tree_and_out_of_range_proof() -> None:
    assert merkle_root([]) == EMPTY_ROOT
    with pytest.raises(LedgerFormatError):
        merkle_proof([bytes(32)], 1)


def test_leaves_round_trip_and_differ_by_kind() -> None:
    sub = merkle_root([job(1).hash(), job(2).hash()])
    e = EscrowLeaf(ESCROW, 3, 2000, 5000, sub)
    p = ProviderLeaf(ESCROW, 3, 2000, 5000, sub)
    assert e.hash() != p.hash()  # the tag separates them
    assert EscrowLeaf.from_json(e.to_json()) == e
    assert ProviderLeaf.from_json(p.to_json()) == p
    assert JobRecord.from_json(job(1).to_json()) == job(1)
    assert len(job(1).payload()) == 4 + 32 + 32 + 33 + 33 + 32 + 4 + 4 + 16 * 3 + 32


def test_the_salt_hides_a_record() -> None:
    a, b = job(1), job(2)
    assert a.hash() != JobRecord(**{**a.__dict__, "salt": b.salt}).hash()


def test_fields_out_of_range_are_refused() -> None:
    with pytest.raises(LedgerFormatError):
        JobRecord(**{**job(1).__dict__, "amount": 1 << 128}).payload()
    with pytest.raises(LedgerFormatError):
        EscrowLeaf(ESCROW, 1, 1, 1, b"short").payload()


def test_json_from_elsewhere_fails_as_a_format_error() -> None:
    leaf = EscrowLeaf(ESCROW, 1, 1, 1, bytes(32)).to_json()
    for bad in ({**leaf, "address": "0:zz"}, {**leaf, "address": ""}, {**leaf, "amount": "x"}):
        with pytest.raises(LedgerFormatError):
            EscrowLeaf.from_json(bad)
    with pytest.raises(LedgerFormatError):
        JobRecord.from_json({**job(1).to_json(), "provider": "nowhere"})


@given(st.integers(0, 10**15), st.integers(0, 10_000))
def test_fee_rounds_up_and_never_exceeds_the_amount(amount: int, bps: int) -> None:
    fee = fee_of(amount, bps)
    assert amount * bps / 10_000 <= fee <= amount
    assert fee - amount * bps // 10_000 in (0, 1)
