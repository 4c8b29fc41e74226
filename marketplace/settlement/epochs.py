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
from sqlalchemy import Connection, func, select, update

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

__all__ = ["BuiltEpoch", "build_epoch", "job_record", "unsettled_jobs"]

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


def unsettled_jobs(conn: Connection) -> int:
    """Jobs a voucher covers that no epoch holds yet."""
    return conn.execute(
        select(func.count())
        .select_from(JOBS)
        .where(JOBS.c.epoch.is_(None), JOBS.c.voucher_cumulative.is_not(None))
    ).scalar_one()


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


def _save_account(conn: Connection, kind: str, address: str, cumulative: int, epoch: int, known):
    if address in known:
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


def build_epoch(
    conn: Connection,
    *,
    vault: str,
    fee_bps: int,
    operator_key: Ed25519PrivateKey,
    global_id: int,
) -> BuiltEpoch | None:
    """Build the next epoch from every covered job no epoch holds; None if there is
    none (an epoch with nothing in it is never committed)."""
    last = conn.execute(select(EPOCHS).order_by(EPOCHS.c.epoch.desc()).limit(1)).first()
    epoch = (last.epoch if last is not None else 0) + 1
    rows = conn.execute(
        select(
            JOBS.c.job_id, JOBS.c.escrow, JOBS.c.node_id, JOBS.c.model, JOBS.c.amount,
            JOBS.c.prompt_tokens, JOBS.c.completion_tokens, JOBS.c.receipt_boc,
        )
        .where(JOBS.c.epoch.is_(None), JOBS.c.voucher_cumulative.is_not(None))
        .with_for_update()
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
    taken: list[tuple[str, str, str | None]] = []  # (job id, salt hex, provider)
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
    for provider in sorted(by_provider):
        records = sorted(by_provider[provider], key=lambda r: r.job_id)
        earned = sum(r.amount - fee_of(r.amount, fee_bps) for r in records)
        cumulative = provider_prev.get(provider, 0) + earned
        sub_root = merkle_root([r.hash() for r in records])
        leaves.append((ProviderLeaf(provider, epoch, earned, cumulative, sub_root), None))
        epoch_earned += earned

    root = merkle_root([leaf.hash() for leaf, _ in leaves])
    charged_total = (int(last.charged) if last is not None else 0) + epoch_charged
    paid_total = (int(last.paid) if last is not None else 0) + epoch_earned
    commit = EpochCommit(
        global_id=global_id,
        vault=Address(vault),
        epoch=epoch,
        root=root,
        charged=charged_total,
        paid=paid_total,
        fees=charged_total - paid_total,
        leaves=len(leaves),
    )
    commit_boc, commit_hash = commit.encode()
    conn.execute(
        EPOCHS.insert().values(
            epoch=epoch, vault=vault, state="built", root=root.hex(), charged=charged_total,
            paid=paid_total, fees=charged_total - paid_total, epoch_charged=epoch_charged,
            epoch_earned=epoch_earned, leaves=len(leaves),
            commit_boc=base64.b64encode(commit_boc).decode(),
            commit_signature=operator_key.sign(commit_hash).hex(), built_at=now_ms(),
        )
    )  # fmt: skip
    for idx, (leaf, signed) in enumerate(leaves):
        conn.execute(
            LEAVES.insert().values(
                epoch=epoch, idx=idx, kind=leaf.KIND, address=leaf.address, amount=leaf.amount,
                cumulative=leaf.cumulative, sub_root=leaf.sub_root.hex(),
                voucher_boc=signed[0] if signed else None,
                voucher_signature=signed[1] if signed else None,
            )
        )  # fmt: skip
        known = escrow_prev if leaf.KIND == "escrow" else provider_prev
        _save_account(conn, leaf.KIND, leaf.address, leaf.cumulative, epoch, known)
        if leaf.KIND == "provider":
            payout = PayoutVoucher(
                global_id, Address(vault), Address(leaf.address), epoch, leaf.cumulative
            )
            payout_boc, payout_hash = payout.encode()
            conn.execute(
                PAYOUTS.insert().values(
                    provider=leaf.address, epoch=epoch, cumulative=leaf.cumulative,
                    voucher_boc=base64.b64encode(payout_boc).decode(),
                    signature=operator_key.sign(payout_hash).hex(),
                )
            )  # fmt: skip
    for job_id, salt, provider in taken:
        conn.execute(
            update(JOBS)
            .where(JOBS.c.job_id == job_id)
            .values(epoch=epoch, salt=salt or None, provider=provider)
        )
    return BuiltEpoch(epoch, root, len(leaves), len(taken), epoch_charged, epoch_earned)
