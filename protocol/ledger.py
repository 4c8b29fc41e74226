"""The epoch ledger's leaves and Merkle tree: pure data, no I/O.

Every epoch the matcher commits one root on its Vault. The tree is public down to its
aggregate leaves; each aggregate commits, through a sub-root, to salted per-job records
that only the party they concern may fetch. See ``docs/ledger.md`` for the format, which
an independent implementation recomputes in a few dozen lines.

Hashing (SHA-256, what TVM's ``SHA256U`` gives over a slice):

    leaf(payload) = sha256(0x00 || payload)
    node(l, r)    = sha256(0x01 || l || r)          # 520 bits: one cell, one SHA256U

A level with an odd count carries its last node up unchanged. The root of no leaves is
32 zero bytes. A proof lists the siblings from the leaf up, each with its side.

Payloads are fixed-width big-endian fields after a 4-byte tag (amounts are uint128,
addresses are workchain int8 + 32-byte account id):

    JOB1 salt:32 job_id:32 escrow:33 provider:33 model:32 prompt_tokens:u32
         completion_tokens:u32 price_prompt:u128 price_completion:u128 amount:u128
         receipt_hash:32                                             (per-job record)
    ESC1 escrow:33 epoch:u64 charged:u128 cumulative:u128 sub_root:32   (public)
    PRV1 provider:33 epoch:u64 earned:u128 cumulative:u128 sub_root:32  (public)

``charged`` is what the escrow's jobs in this epoch cost; ``cumulative`` what it has
been charged in all epochs up to this one. ``earned`` is what the provider's jobs in
this epoch pay it after the protocol fee; ``cumulative`` is its payout voucher's amount.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

__all__ = [
    "EMPTY_ROOT",
    "EscrowLeaf",
    "JobRecord",
    "LedgerFormatError",
    "ProofStep",
    "ProviderLeaf",
    "fee_of",
    "merkle_proof",
    "merkle_root",
    "node_hash",
    "records_auth_message",
    "records_headers",
    "leaf_hash",
    "verify_proof",
]

EMPTY_ROOT = bytes(32)
TAG_JOB = b"JOB1"
TAG_ESCROW = b"ESC1"
TAG_PROVIDER = b"PRV1"


class LedgerFormatError(ValueError):
    """A leaf, record or proof that does not follow the ledger format."""


def leaf_hash(payload: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + payload).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def fee_of(amount: int, fee_bps: int) -> int:
    """The protocol's share of one job, rounded up: the Vault accrues the fee of each
    charge rounded down, so providers' earnings never exceed what the Vault may pay."""
    return -(-amount * fee_bps // 10_000)


def _u(value: int, bits: int) -> bytes:
    if not 0 <= value < 1 << bits:
        raise LedgerFormatError(f"{value} does not fit in uint{bits}")
    return value.to_bytes(bits // 8, "big")


def _address(address: Address | str) -> Address:
    if isinstance(address, Address):
        return address
    try:
        return Address(address)
    except Exception as e:  # pytoniq's AddressError is no ValueError
        raise LedgerFormatError(f"not an address: {address!r}") from e


def _addr(address: Address | str) -> bytes:
    a = _address(address)
    return (a.wc & 0xFF).to_bytes(1, "big") + a.hash_part


def _raw(address: Address | str) -> str:
    return _address(address).to_str(is_user_friendly=False)


@dataclass(frozen=True)
class JobRecord:
    """One settled job, salted so that its hash reveals nothing to who lacks the salt."""

    salt: bytes
    job_id: bytes
    escrow: str
    provider: str
    model: bytes
    prompt_tokens: int
    completion_tokens: int
    price_prompt: int
    price_completion: int
    amount: int
    receipt_hash: bytes

    def payload(self) -> bytes:
        for name in ("salt", "job_id", "model", "receipt_hash"):
            if len(getattr(self, name)) != 32:
                raise LedgerFormatError(f"{name} must be 32 bytes")
        return b"".join(
            (
                TAG_JOB,
                self.salt,
                self.job_id,
                _addr(self.escrow),
                _addr(self.provider),
                self.model,
                _u(self.prompt_tokens, 32),
                _u(self.completion_tokens, 32),
                _u(self.price_prompt, 128),
                _u(self.price_completion, 128),
                _u(self.amount, 128),
                self.receipt_hash,
            )
        )

    def hash(self) -> bytes:
        return leaf_hash(self.payload())

    def to_json(self) -> dict:
        return {
            "salt": self.salt.hex(),
            "job_id": self.job_id.hex(),
            "escrow": _raw(self.escrow),
            "provider": _raw(self.provider),
            "model": self.model.hex(),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "price_prompt": str(self.price_prompt),
            "price_completion": str(self.price_completion),
            "amount": str(self.amount),
            "receipt_hash": self.receipt_hash.hex(),
        }

    @classmethod
    def from_json(cls, data: dict) -> JobRecord:
        try:
            return cls(
                salt=bytes.fromhex(data["salt"]),
                job_id=bytes.fromhex(data["job_id"]),
                escrow=_raw(data["escrow"]),
                provider=_raw(data["provider"]),
                model=bytes.fromhex(data["model"]),
                prompt_tokens=int(data["prompt_tokens"]),
                completion_tokens=int(data["completion_tokens"]),
                price_prompt=int(data["price_prompt"]),
                price_completion=int(data["price_completion"]),
                amount=int(data["amount"]),
                receipt_hash=bytes.fromhex(data["receipt_hash"]),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise LedgerFormatError(f"not a job record: {e}") from e


@dataclass(frozen=True)
class _Aggregate:
    TAG: ClassVar[bytes] = b""
    KIND: ClassVar[Literal["escrow", "provider"]] = "escrow"

    address: str
    epoch: int
    amount: int  # charged (escrow) or earned (provider) in this epoch
    cumulative: int
    sub_root: bytes

    def payload(self) -> bytes:
        if len(self.sub_root) != 32:
            raise LedgerFormatError("sub_root must be 32 bytes")
        return b"".join(
            (
                self.TAG,
                _addr(self.address),
                _u(self.epoch, 64),
                _u(self.amount, 128),
                _u(self.cumulative, 128),
                self.sub_root,
            )
        )

    def hash(self) -> bytes:
        return leaf_hash(self.payload())

    def to_json(self) -> dict:
        return {
            "kind": self.KIND,
            "address": _raw(self.address),
            "epoch": self.epoch,
            "amount": str(self.amount),
            "cumulative": str(self.cumulative),
            "sub_root": self.sub_root.hex(),
            "hash": self.hash().hex(),
        }

    @staticmethod
    def from_json(data: dict) -> EscrowLeaf | ProviderLeaf:
        kinds = {"escrow": EscrowLeaf, "provider": ProviderLeaf}
        try:
            cls = kinds[data["kind"]]
            return cls(
                address=_raw(data["address"]),
                epoch=int(data["epoch"]),
                amount=int(data["amount"]),
                cumulative=int(data["cumulative"]),
                sub_root=bytes.fromhex(data["sub_root"]),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise LedgerFormatError(f"not a ledger leaf: {e}") from e


@dataclass(frozen=True)
class EscrowLeaf(_Aggregate):
    TAG: ClassVar[bytes] = TAG_ESCROW
    KIND: ClassVar[Literal["escrow", "provider"]] = "escrow"


@dataclass(frozen=True)
class ProviderLeaf(_Aggregate):
    TAG: ClassVar[bytes] = TAG_PROVIDER
    KIND: ClassVar[Literal["escrow", "provider"]] = "provider"


@dataclass(frozen=True)
class ProofStep:
    sibling: bytes
    side: Literal["left", "right"]  # where the sibling sits

    def to_json(self) -> dict:
        return {"sibling": self.sibling.hex(), "side": self.side}

    @classmethod
    def from_json(cls, data: dict) -> ProofStep:
        try:
            side = data["side"]
            if side not in ("left", "right"):
                raise ValueError(f"side {side!r}")
            return cls(bytes.fromhex(data["sibling"]), side)
        except (KeyError, ValueError, TypeError) as e:
            raise LedgerFormatError(f"not a proof step: {e}") from e


def _levels(hashes: list[bytes]) -> list[list[bytes]]:
    levels = [list(hashes)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        above = [node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])
        levels.append(above)
    return levels


def merkle_root(hashes: list[bytes]) -> bytes:
    if not hashes:
        return EMPTY_ROOT
    return _levels(hashes)[-1][0]


def merkle_proof(hashes: list[bytes], index: int) -> list[ProofStep]:
    if not 0 <= index < len(hashes):
        raise LedgerFormatError(f"leaf index {index} outside 0..{len(hashes) - 1}")
    proof = []
    for level in _levels(hashes)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(ProofStep(level[sibling], "left" if sibling < index else "right"))
        index //= 2
    return proof


def verify_proof(leaf: bytes, proof: list[ProofStep], root: bytes) -> bool:
    h = leaf
    for step in proof:
        h = node_hash(step.sibling, h) if step.side == "left" else node_hash(h, step.sibling)
    return h == root


RECORDS_AUTH_WINDOW_S = 300


def records_auth_message(kind: str, address: str, epoch: int, unix_time: int) -> bytes:
    """What a party signs to fetch its own per-job records (``docs/ledger.md``)."""
    if kind not in ("escrow", "provider"):
        raise LedgerFormatError(f"kind {kind!r}")
    return b"\0".join(
        (b"imago-records", kind.encode(), _raw(address).encode(), str(epoch).encode(),
         str(unix_time).encode())
    )  # fmt: skip


def records_headers(
    key: Ed25519PrivateKey, kind: str, address: str, epoch: int, now: int | None = None
) -> dict[str, str]:
    """The three headers that authenticate a party's request for its own records."""
    now = int(time.time()) if now is None else now
    return {
        "Imago-Party-Key": key.public_key().public_bytes_raw().hex(),
        "Imago-Party-Time": str(now),
        "Imago-Party-Signature": key.sign(records_auth_message(kind, address, epoch, now)).hex(),
    }
