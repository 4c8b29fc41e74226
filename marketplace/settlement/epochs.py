"""Building one epoch of the ledger, in one database transaction.

Every job a client's voucher covers and no epoch holds yet goes into the epoch being
built: its salted record (``protocol.ledger.JobRecord``) joins the sub-tree of its
escrow and of its provider, each aggregate leaf carries its running cumulative, and
the epoch's root and cumulative totals go into an operator-signed ``EpochCommit``. The
provider leaves' payout vouchers are signed in the same transaction and published only
once the commit is confirmed on-chain (invariant 6).

A crash before the transaction commits leaves nothing; after it, everything. The
service then sends the stored commit until the Vault holds it (``service.py``).
"""

from __future__ import annotations

import base64
import logging
import os
from collections import defaultdict
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address
from sqlalchemy import Connection, bindparam, func, select, update

from marketplace.db import (
    AccountRecord,
    EpochRecord,
    JobRecord,
    LeafRecord,
    NodeRecord,
    PayoutRecord,
    SpendVoucherRecord,
    now_ms,
)
from protocol.ledger import EscrowLeaf, ProviderLeaf, fee_of, merkle_root
from protocol.ledger import JobRecord as LedgerJob
from protocol.signed import EpochCommit, PayoutVoucher, Receipt, SignedObjectError, model_hash

__all__ = [
    "BuiltEpoch",
    "EpochConflict",
    "EpochPlan",
    "build_epoch",
    "job_record",
    "plan_epoch",
    "write_epoch",
]

log = logging.getLogger(__name__)

JOBS = JobRecord.__table__
NODES = NodeRecord.__table__
VOUCHERS = SpendVoucherRecord.__table__
EPOCHS = EpochRecord.__table__
LEAVES = LeafRecord.__table__
ACCOUNTS = AccountRecord.__table__
PAYOUTS = PayoutRecord.__table__
NO_RECEIPT = bytes(32)


@dataclass(frozen=True)
class BuiltEpoch:
    epoch: int
    root: bytes
    leaves: int
    jobs: int
    epoch_charged: int
    epoch_earned: int


def job_record(job, provider: str, salt: bytes) -> LedgerJob:
    """The ledger record of a job row (the one way one is made: building, serving)."""
    receipt_hash, prices = NO_RECEIPT, (0, 0)
    prompt, completion = int(job.prompt_tokens), int(job.completion_tokens)
    if job.receipt_boc:
        try:
            receipt, receipt_hash = Receipt.parse_boc(base64.b64decode(job.receipt_boc))
            prices = (receipt.price_prompt, receipt.price_completion)
        except (ValueError, SignedObjectError):  # it verified when relayed
            log.error("job %s: its stored receipt does not parse", job.job_id)
    return LedgerJob(
        salt=salt,
        job_id=bytes.fromhex(job.job_id),
        escrow=job.escrow,
        provider=provider,
        model=model_hash(job.model).to_bytes(32, "big"),
        prompt_tokens=prompt,
        completion_tokens=completion,
        price_prompt=prices[0],
        price_completion=prices[1],
        amount=int(job.amount),
        receipt_hash=receipt_hash,
    )


def _accounts(conn: Connection, kind: str, addresses: list[str]) -> dict[str, int]:
    rows = conn.execute(
        select(ACCOUNTS.c.address, ACCOUNTS.c.cumulative).where(
            ACCOUNTS.c.kind == kind, ACCOUNTS.c.address.in_(addresses)
        )
    ).all()
    return {address: int(cumulative) for address, cumulative in rows}


def _save_account(
    conn: Connection, kind: str, address: str, cumulative: int, epoch: int, known: bool
) -> None:
    if known:
        conn.execute(
            update(ACCOUNTS)
            .where(ACCOUNTS.c.kind == kind, ACCOUNTS.c.address == address)
            .values(cumulative=cumulative, last_epoch=epoch)
        )
    else:
        conn.execute(
            ACCOUNTS.insert().values(
                kind=kind, address=address, cumulative=cumulative, last_epoch=epoch
            )
        )


@dataclass
class EpochPlan:
    """An epoch computed from one consistent read, not written yet."""

    epoch: int
    vault: str
    root: bytes
    totals: tuple[int, int, int]  # cumulative charged, paid, fees
    epoch_charged: int
    epoch_earned: int
    commit: tuple[str, str]  # base64 BOC, signature
    leaves: list[tuple[EscrowLeaf | ProviderLeaf, tuple[str, str] | None]]
    known: dict[tuple[str, str], bool]  # (kind, address) -> has an account row
    payouts: list[tuple[str, int, str, str]]  # provider, cumulative, BOC, signature
    taken: list[tuple[str, str, str | None]]  # job id, salt hex, provider

    def built(self) -> BuiltEpoch:
        return BuiltEpoch(self.epoch, self.root, len(self.leaves), len(self.taken),
                          self.epoch_charged, self.epoch_earned)  # fmt: skip


class EpochConflict(RuntimeError):
    """The database moved between the plan and its write (another builder): plan again."""


def plan_epoch(
    conn: Connection,
    *,
    vault: str,
    fee_bps: int,
    operator_key: Ed25519PrivateKey,
    global_id: int,
) -> EpochPlan | None:
    """Compute the next epoch from every covered job no epoch holds, reading only (so it
    runs on a connection of its own, beside the ledger's writer); None if there is none
    (an epoch with nothing in it is never committed)."""
    last = conn.execute(select(EPOCHS).order_by(EPOCHS.c.epoch.desc()).limit(1)).first()
    epoch = (last.epoch if last is not None else 0) + 1
    rows = conn.execute(
        select(
            JOBS.c.job_id, JOBS.c.escrow, JOBS.c.node_id, JOBS.c.model, JOBS.c.amount,
            JOBS.c.prompt_tokens, JOBS.c.completion_tokens, JOBS.c.receipt_boc,
        ).where(JOBS.c.epoch.is_(None), JOBS.c.voucher_cumulative.is_not(None))
    ).all()  # fmt: skip
    if not rows:
        return None
    node_ids = sorted({r.node_id for r in rows if r.node_id})
    providers = {
        node_id: provider
        for node_id, provider in conn.execute(
            select(NODES.c.node_id, NODES.c.provider).where(NODES.c.node_id.in_(node_ids))
        )
    }
    by_escrow: dict[str, list[LedgerJob]] = defaultdict(list)
    by_provider: dict[str, list[LedgerJob]] = defaultdict(list)
    taken: list[tuple[str, str, str | None]] = []
    for row in rows:
        amount = int(row.amount)
        if amount == 0:  # nothing to pay: it joins the epoch without a record
            taken.append((row.job_id, "", None))
            continue
        provider = providers.get(row.node_id) if row.node_id else None
        if provider is None:
            # The client paid, and nobody can be credited: keep it out until the node's
            # Provider is known (a matcher with --registry always knows it).
            log.error("job %s: its node names no Provider; it waits", row.job_id)
            continue
        salt = os.urandom(32)
        record = job_record(row, provider, salt)
        by_escrow[row.escrow].append(record)
        by_provider[provider].append(record)
        taken.append((row.job_id, salt.hex(), provider))
    if not by_escrow:
        return None

    escrow_prev = _accounts(conn, "escrow", list(by_escrow))
    provider_prev = _accounts(conn, "provider", list(by_provider))
    vouchers = {
        v.escrow: v
        for v in conn.execute(select(VOUCHERS).where(VOUCHERS.c.escrow.in_(list(by_escrow))))
    }
    leaves: list[tuple[EscrowLeaf | ProviderLeaf, tuple[str, str] | None]] = []
    epoch_charged = epoch_earned = 0
    for escrow in sorted(by_escrow):
        records = sorted(by_escrow[escrow], key=lambda r: r.job_id)
        charged = sum(r.amount for r in records)
        cumulative = escrow_prev.get(escrow, 0) + charged
        voucher = vouchers.get(escrow)
        signed = None
        if voucher is not None and int(voucher.cumulative) == cumulative:
            signed = (voucher.voucher_boc, voucher.signature)
        else:  # the attribution rules make this impossible; never charge more than leaves
            log.error("escrow %s: its leaves add to %d, its voucher to %s", escrow, cumulative,
                      voucher.cumulative if voucher is not None else None)  # fmt: skip
        sub_root = merkle_root([r.hash() for r in records])
        leaves.append((EscrowLeaf(escrow, epoch, charged, cumulative, sub_root), signed))
        epoch_charged += charged
    payouts = []
    for provider in sorted(by_provider):
        records = sorted(by_provider[provider], key=lambda r: r.job_id)
        earned = sum(r.amount - fee_of(r.amount, fee_bps) for r in records)
        cumulative = provider_prev.get(provider, 0) + earned
        sub_root = merkle_root([r.hash() for r in records])
        leaves.append((ProviderLeaf(provider, epoch, earned, cumulative, sub_root), None))
        epoch_earned += earned
        payout = PayoutVoucher(global_id, Address(vault), Address(provider), epoch, cumulative)
        boc, digest = payout.encode()
        payouts.append(
            (provider, cumulative, base64.b64encode(boc).decode(), operator_key.sign(digest).hex())
        )

    root = merkle_root([leaf.hash() for leaf, _ in leaves])
    charged_total = (int(last.charged) if last is not None else 0) + epoch_charged
    paid_total = (int(last.paid) if last is not None else 0) + epoch_earned
    totals = (charged_total, paid_total, charged_total - paid_total)
    commit = EpochCommit(global_id, Address(vault), epoch, root, *totals, len(leaves))
    commit_boc, commit_hash = commit.encode()
    known = {("escrow", a): a in escrow_prev for a in by_escrow}
    known |= {("provider", a): a in provider_prev for a in by_provider}
    return EpochPlan(
        epoch, vault, root, totals, epoch_charged, epoch_earned,
        (base64.b64encode(commit_boc).decode(), operator_key.sign(commit_hash).hex()),
        leaves, known, payouts, taken,
    )  # fmt: skip


def write_epoch(conn: Connection, plan: EpochPlan) -> BuiltEpoch:
    """Write a planned epoch in one transaction (the ledger's writer runs it: short).
    Raises EpochConflict if another epoch was written since the plan or one of its jobs
    was taken by one."""
    last = conn.execute(select(func.max(EPOCHS.c.epoch))).scalar_one()
    if (last or 0) + 1 != plan.epoch:
        raise EpochConflict(f"epoch {plan.epoch} was planned after {last or 0}'s successor")
    taken = conn.execute(  # one statement for every job (executemany), not one each
        update(JOBS)
        .where(JOBS.c.job_id == bindparam("b_job_id"), JOBS.c.epoch.is_(None))
        .values(epoch=plan.epoch, salt=bindparam("b_salt"), provider=bindparam("b_provider")),
        [{"b_job_id": j, "b_salt": s or None, "b_provider": p} for j, s, p in plan.taken],
    ).rowcount
    if taken != len(plan.taken):
        raise EpochConflict(f"{len(plan.taken) - taken} of epoch {plan.epoch}'s jobs moved")
    charged, paid, fees = plan.totals
    conn.execute(
        EPOCHS.insert().values(
            epoch=plan.epoch, vault=plan.vault, state="built", root=plan.root.hex(),
            charged=charged, paid=paid, fees=fees, epoch_charged=plan.epoch_charged,
            epoch_earned=plan.epoch_earned, leaves=len(plan.leaves),
            commit_boc=plan.commit[0], commit_signature=plan.commit[1], built_at=now_ms(),
        )
    )  # fmt: skip
    for idx, (leaf, signed) in enumerate(plan.leaves):
        conn.execute(
            LEAVES.insert().values(
                epoch=plan.epoch, idx=idx, kind=leaf.KIND, address=leaf.address,
                amount=leaf.amount, cumulative=leaf.cumulative, sub_root=leaf.sub_root.hex(),
                voucher_boc=signed[0] if signed else None,
                voucher_signature=signed[1] if signed else None,
            )
        )  # fmt: skip
        known = plan.known[(leaf.KIND, leaf.address)]
        _save_account(conn, leaf.KIND, leaf.address, leaf.cumulative, plan.epoch, known)
    for provider, cumulative, boc, signature in plan.payouts:
        conn.execute(
            PAYOUTS.insert().values(provider=provider, epoch=plan.epoch, cumulative=cumulative,
                                    voucher_boc=boc, signature=signature)
        )  # fmt: skip
    return plan.built()


def build_epoch(conn: Connection, **settings) -> BuiltEpoch | None:
    """Plan and write the next epoch on one connection (tests, benchmarks; the service
    plans beside the writer, then writes)."""
    plan = plan_epoch(conn, **settings)
    return write_epoch(conn, plan) if plan is not None else None
