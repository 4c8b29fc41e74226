"""The audit itself: :func:`run_audit` reads through an :class:`AuditSource` and runs the
checks epoch by epoch, then over every party's account, then over one party's records."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.audit.accounts import check_escrow_account, check_payout, check_provider_account
from client.audit.common import AuditError, Kind, Leaf, SourceError, _raw, _where
from client.audit.epochs import (
    CommitHistory,
    LeafChain,
    PublishedEpoch,
    Totals,
    check_chain_head,
    check_commit,
    check_cumulatives,
    check_history,
    check_leaves,
    check_totals,
    parse_epoch,
)
from client.audit.records import LoggedReceipt, check_receipts, check_records
from client.audit.report import EpochSummary, Report
from client.audit.source import AuditSource
from protocol.ledger import JobRecord, LedgerFormatError

CONCURRENCY = 8  # chain and matcher look-ups in flight


# --------------------------------------------------------------------- the audit


@dataclass
class Party:
    """A client's escrow or a provider, auditing its own records."""

    kind: Kind
    address: str
    key: Ed25519PrivateKey  # spend key (escrow) or node key (provider)
    receipts: dict[bytes, LoggedReceipt] | None  # None: no receipt log
    receipts_path: str | None = None
    receipt_warnings: list[str] = field(default_factory=list)


async def _each(items: Iterable[str], fn: Callable[[str], Awaitable[Any]]) -> list[Any]:
    """``fn`` over ``items``, a few at a time; an exception is returned in its place."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(item: str) -> Any:
        async with sem:
            try:
                return await fn(item)
            except Exception as e:
                return e

    return await asyncio.gather(*(one(i) for i in items))


async def run_audit(
    source: AuditSource,
    vault: str,
    *,
    matcher: str = "",
    from_epoch: int = 1,
    party: Party | None = None,
    history: bool = True,
) -> Report:
    """Audit the Vault's published ledger from ``from_epoch`` to its last committed epoch,
    and ``party``'s records if given. Raises AuditError only if it cannot run at all."""
    vault = _raw(vault)
    from_epoch = max(1, from_epoch)
    report = Report(vault=vault, matcher=matcher, from_epoch=from_epoch)
    find = report.findings.extend
    add = report.findings.add
    try:
        vd = await source.vault()
    except Exception as e:
        raise AuditError(f"cannot read the Vault {vault}: {e}") from e
    try:
        listed = await source.epochs(max(1, from_epoch - 1))
    except SourceError as e:
        raise AuditError(str(e)) from e
    operator_key = vd.operator_key.to_bytes(32, "big")
    fee_bps = vd.protocol_fee_bps
    report.last_epoch, report.last_root = vd.last_epoch, vd.last_root.hex()

    pubs: list[PublishedEpoch] = []
    for item in listed:
        try:
            if isinstance(item, dict) and "commit" not in item and "epoch" in item:
                item = await source.epoch(int(item["epoch"]))  # a summary in the list
            pubs.append(parse_epoch(item))
        except (LedgerFormatError, SourceError, ValueError, TypeError) as e:
            n = item.get("epoch") if isinstance(item, dict) else None
            add("epoch-format", f"unreadable epoch: {e}", epoch=n if isinstance(n, int) else None)
    previous = Totals()
    if from_epoch > 1:  # the epoch before the window gives the totals to chain from
        base = next((p for p in pubs if p.epoch == from_epoch - 1), None)
        if base is None:
            add(
                "epochs",
                "the epoch before the audited window is not published",
                epoch=from_epoch - 1,
            )
        else:
            find(check_commit(base, vault, operator_key))
            previous = Totals(base.charged, base.paid, base.fees)
    pubs = sorted((p for p in pubs if p.epoch >= from_epoch), key=lambda p: p.epoch)
    find(check_chain_head(pubs, from_epoch, vd))

    commits: CommitHistory | None = None
    if history and vd.last_epoch >= from_epoch:
        try:
            commits = await source.commit_history(from_epoch)
            if commits.note:
                report.warnings.append(commits.note)
        except Exception as e:
            report.warnings.append(
                f"the Vault's history could not be read ({e}): older roots "
                "are checked against operator-signed commits only"
            )

    chain = LeafChain(full=from_epoch == 1)
    leaves_by_epoch: dict[int, list[Leaf]] = {}
    for pub in pubs:
        before = len(report.findings)
        find(check_commit(pub, vault, operator_key))
        anchored, found = check_history(pub, commits)
        find(found)
        if pub.epoch == vd.last_epoch and pub.root == vd.last_root:
            anchored = "the Vault's lastRoot"
        try:
            pages = await source.leaves(pub.epoch)
        except SourceError as e:
            add("leaves", str(e), epoch=pub.epoch)
            pages = []
        leaves, found = check_leaves(pub, pages)
        find(found)
        find(check_cumulatives(pub.epoch, leaves, chain))
        find(check_totals(pub, previous, leaves, fee_bps))
        previous = Totals(pub.charged, pub.paid, pub.fees)
        leaves_by_epoch[pub.epoch] = leaves
        report.count("epochs")
        report.count("leaves", len(leaves))
        report.epochs.append(
            EpochSummary(
                epoch=pub.epoch,
                root=pub.root.hex(),
                leaves=len(leaves),
                charged=pub.charged,
                paid=pub.paid,
                fees=pub.fees,
                epoch_charged=sum(lf.amount for lf in leaves if lf.KIND == "escrow"),
                epoch_earned=sum(lf.amount for lf in leaves if lf.KIND == "provider"),
                anchored=anchored,
                findings=len(report.findings) - before,
            )
        )
    if chain.seeds:
        report.warnings.append(
            f"audited from epoch {from_epoch}: a party's first leaf in the window is taken as "
            "given (its cumulative is not chained to earlier epochs)"
        )

    await _audit_accounts(source, report, chain, vd, vault, operator_key)
    if party is not None:
        await _audit_party(source, report, party, pubs, leaves_by_epoch, fee_bps)
    return report


async def _audit_accounts(
    source: AuditSource,
    report: Report,
    chain: LeafChain,
    vd: Any,
    vault: str,
    operator_key: bytes,
) -> None:
    """Payout vouchers, claims and charges of every party of the ledger."""
    find, add = report.findings.extend, report.findings.add
    providers = sorted(a for (k, a) in chain.latest if k == "provider")
    escrows = sorted(a for (k, a) in chain.latest if k == "escrow")
    payouts = await _each(providers, source.payout)
    accounts = await _each(providers, source.provider)
    claims = await _each(providers, source.claimed)
    claimed_total = 0
    unread = False
    for p, payout, data, claimed in zip(providers, payouts, accounts, claims, strict=True):
        latest = chain.latest[("provider", p)]
        at = _where(latest[1], latest[2], kind="provider", address=p)
        if isinstance(payout, Exception):
            add("payout", f"cannot fetch the payout voucher: {payout}", **at)
        else:
            earned = chain.earned[p] if chain.full else None
            find(check_payout(p, latest, payout, vault, operator_key, vd.last_epoch, earned))
            report.count("payout_vouchers")
        if isinstance(data, Exception) or (data is not None and isinstance(claimed, Exception)):
            error = data if isinstance(data, Exception) else claimed
            add("provider-account", f"cannot read the Provider: {error}", **at)
            unread = True
            continue
        claimed = None if data is None else claimed
        find(check_provider_account(p, latest, data, claimed, _raw(vd.registry)))
        claimed_total += claimed or 0
        report.count("provider_claims")

    accounts = await _each(escrows, source.escrow)
    charged_total = 0
    for a, data in zip(escrows, accounts, strict=True):
        key = ("escrow", a)
        latest = chain.latest[key]
        if isinstance(data, Exception):
            at = _where(latest[1], latest[2], kind="escrow", address=a)
            add("escrow-account", f"cannot read the Escrow: {data}", **at)
            unread = True
            continue
        cumulatives = chain.cumulatives[key]
        find(check_escrow_account(a, latest, cumulatives, chain.seeds.get(key), data, vault))
        charged_total += data.charged if data is not None else 0
        report.count("escrow_charges")

    if chain.full and not unread:
        # Every payout and charge the Vault counted belongs to a party of the ledger. (A
        # claim or charge in flight moves the child's counter first, so these hold then too.)
        if vd.paid_out > claimed_total:
            add(
                "paid-out",
                "the Vault paid out more than the ledger's providers claimed "
                "(payouts outside the ledger)",
                f"<= {claimed_total}",
                vd.paid_out,
            )
        if vd.charged_in > charged_total:
            add(
                "charged-in",
                "the Vault was charged more than the ledger's escrows were "
                "(charges outside the ledger)",
                f"<= {charged_total}",
                vd.charged_in,
            )


async def _audit_party(
    source: AuditSource,
    report: Report,
    party: Party,
    pubs: list[PublishedEpoch],
    leaves_by_epoch: dict[int, list[Leaf]],
    fee_bps: int,
) -> None:
    """The party's records, epoch by epoch, then against its receipts."""
    find, add = report.findings.extend, report.findings.add
    address = _raw(party.address)
    info: dict[str, Any] = {
        "kind": party.kind,
        "address": address,
        "epochs": 0,
        "records": 0,
        "receipts_matched": 0,
        "receipts_log": party.receipts_path,
    }
    report.party = info
    report.warnings.extend(party.receipt_warnings)
    records: list[tuple[int, int, JobRecord]] = []
    for pub in pubs:
        leaves = leaves_by_epoch.get(pub.epoch, [])
        index = next(
            (i for i, lf in enumerate(leaves) if (lf.KIND, lf.address) == (party.kind, address)),
            None,
        )
        if index is None:
            continue
        try:
            response = await source.records(pub.epoch, party.kind, address, party.key)
        except SourceError as e:
            add("records", str(e), epoch=pub.epoch, leaf=index, kind=party.kind, address=address)
            continue
        found_records, found = check_records(
            party.kind, address, pub, leaves[index], index, response, fee_bps
        )
        find(found)
        # each job is on both sides: the other party of every record has a leaf too
        other = "provider" if party.kind == "escrow" else "escrow"
        present = {lf.address for lf in leaves if other == lf.KIND}
        for r in found_records:
            counterpart = r.provider if other == "provider" else r.escrow
            if counterpart not in present:
                add("record-counterpart", f"the job's {other} has no leaf in this epoch",
                    f"a leaf of {counterpart}", "none", epoch=pub.epoch, leaf=index,
                    kind=party.kind, address=address, job=r.job_id.hex())  # fmt: skip
        info["epochs"] += 1
        info["records"] += len(found_records)
        records.extend((pub.epoch, index, r) for r in found_records)
    report.count("records", len(records))
    if party.receipts is None:
        report.warnings.append(
            "no receipt log: the records were checked against the committed roots, not "
            "against receipts"
        )
        return
    keys: dict[str, set[bytes]] = {}
    providers = sorted({_raw(r.provider) for _, _, r in records})
    for provider, data in zip(providers, await _each(providers, source.provider), strict=True):
        keys[provider] = set()
        if data is not None and not isinstance(data, Exception):
            keys[provider] |= {k.to_bytes(32, "big") for k in (data.node_key, data.prev_key) if k}
        if party.kind == "provider" and provider == address:
            keys[provider].add(party.key.public_key().public_bytes_raw())
    matched, found, warnings = check_receipts(
        party.kind, address, records, party.receipts, lambda p: keys.get(p, set())
    )
    find(found)
    report.warnings.extend(warnings)
    info["receipts_matched"] = matched
    report.count("receipts", matched)
