"""``imago audit``: check a matcher's published ledger against the chain.

Anyone can run it with nothing but a Vault's address: it fetches every committed epoch's
public leaves from the matcher (``docs/ledger.md``), recomputes each leaf hash, each root
and the totals, and compares them with the commits, charges and claims on-chain. A client
(its escrow) or a GPU owner (its provider) also fetches its own salted per-job records,
checks their inclusion up to the committed root and compares each with the receipt it
kept.

The checks are pure functions over parsed data. Everything is read through one narrow
interface, :class:`AuditSource`: :class:`LiveSource` implements it over the matcher's HTTP
API and toncenter; tests may give their own. Each failed check adds a :class:`Finding`
naming the epoch, the leaf (index, kind, address) or the job, what was expected and what
was found; the audit passes only with none. *Expected* is what the chain, a signature or a
recomputation says; *found* is what the matcher published (or, for an on-chain counter,
what the chain holds).

What anchors each epoch to the chain:

- the newest one: the Vault's ``lastEpoch`` and ``lastRoot``;
- every one: the CommitEpoch the Vault executed, read from its transaction history;
- where that history is no longer served: the EpochCommit cell the matcher publishes,
  signed by the Vault's operator key, whose totals must chain up to the newest epoch's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from contracts.chain import getters
from contracts.chain.messages.opcodes import OP_COMMIT_EPOCH
from contracts.chain.messages.vault import CommitEpoch
from contracts.chain.toncenter import ToncenterClient
from protocol.ledger import (
    EscrowLeaf,
    JobRecord,
    LedgerFormatError,
    ProofStep,
    ProviderLeaf,
    fee_of,
    merkle_root,
    records_headers,
    verify_proof,
)
from protocol.signed import (
    EpochCommit,
    PayoutVoucher,
    Receipt,
    SignedObjectError,
    cost_nanoton,
    signature_valid,
)

__all__ = [
    "AuditError",
    "AuditSource",
    "CommitHistory",
    "Finding",
    "LeafChain",
    "LiveSource",
    "LoggedReceipt",
    "OnChainCommit",
    "Party",
    "PublishedEpoch",
    "Report",
    "SourceError",
    "Totals",
    "check_chain_head",
    "check_commit",
    "check_cumulatives",
    "check_escrow_account",
    "check_history",
    "check_leaves",
    "check_payout",
    "check_provider_account",
    "check_receipts",
    "check_records",
    "check_totals",
    "load_receipt_log",
    "parse_epoch",
    "run_audit",
]

Kind = Literal["escrow", "provider"]
Leaf = EscrowLeaf | ProviderLeaf
Latest = tuple[int, int, int]  # a party's latest leaf: (cumulative, epoch, index)

PAGE_LIMIT = 500  # epochs and leaves per request
MAX_PAGES = 100_000  # a pagination that never ends is refused
HISTORY_PAGE = 100  # transactions per getTransactions
CONCURRENCY = 8  # chain and matcher look-ups in flight


class AuditError(Exception):
    """The audit could not run (the Vault could not be read, a bad key)."""


class SourceError(AuditError):
    """The matcher or the chain did not answer as documented."""


# --------------------------------------------------------------------- findings, report


@dataclass(frozen=True)
class Finding:
    """One mismatch, and where it is."""

    check: str
    message: str
    epoch: int | None = None
    leaf: int | None = None  # the leaf's index in its epoch
    kind: str | None = None  # escrow | provider
    address: str | None = None
    job: str | None = None  # job id, hex (per-job records)
    expected: str | None = None
    found: str | None = None

    def where(self) -> str:
        parts = []
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}")
        if self.leaf is not None:
            parts.append(f"leaf #{self.leaf}")
        if self.kind or self.address:
            parts.append(" ".join(p for p in (self.kind, self.address) if p))
        if self.job:
            parts.append(f"job {self.job}")
        return ", ".join(parts) or "vault"

    def line(self) -> str:
        text = f"{self.where()}: {self.check}: {self.message}"
        if self.expected is not None or self.found is not None:
            text += f": expected {self.expected}, found {self.found}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "message": self.message,
            "epoch": self.epoch,
            "leaf": self.leaf,
            "kind": self.kind,
            "address": self.address,
            "job": self.job,
            "expected": self.expected,
            "found": self.found,
        }


class Findings(list[Finding]):
    """Findings of one check, all at one place (``where``) unless told otherwise."""

    def __init__(self, **where: Any):
        super().__init__()
        self.where = where

    def add(
        self, check: str, message: str, expected: Any = None, found: Any = None, **where: Any
    ) -> None:
        self.append(
            Finding(
                check,
                message,
                **{**self.where, **where},
                expected=None if expected is None else str(expected),
                found=None if found is None else str(found),
            )
        )


@dataclass
class EpochSummary:
    epoch: int
    root: str
    leaves: int
    charged: int
    paid: int
    fees: int
    epoch_charged: int
    epoch_earned: int
    anchored: str  # what ties the root to the chain
    findings: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "root": self.root,
            "leaves": self.leaves,
            "charged": str(self.charged),
            "paid": str(self.paid),
            "fees": str(self.fees),
            "epoch_charged": str(self.epoch_charged),
            "epoch_earned": str(self.epoch_earned),
            "anchored": self.anchored,
            "ok": self.findings == 0,
        }


@dataclass
class Report:
    vault: str
    matcher: str
    from_epoch: int
    last_epoch: int = 0  # on-chain
    last_root: str = ""
    epochs: list[EpochSummary] = field(default_factory=list)
    findings: Findings = field(default_factory=Findings)
    warnings: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    party: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def count(self, name: str, n: int = 1) -> None:
        self.checked[name] = self.checked.get(name, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "vault": self.vault,
            "matcher": self.matcher,
            "from_epoch": self.from_epoch,
            "last_epoch": self.last_epoch,
            "last_root": self.last_root,
            "epochs": [e.to_json() for e in self.epochs],
            "checked": dict(self.checked),
            "party": self.party,
            "first_mismatch": self.findings[0].to_json() if self.findings else None,
            "findings": [f.to_json() for f in self.findings],
            "warnings": list(self.warnings),
        }

    def render(self) -> str:
        out = [
            f"audit of vault {self.vault} (matcher {self.matcher})",
            f"  on-chain: last epoch {self.last_epoch}, root {self.last_root or '-'}",
        ]
        for e in self.epochs:
            status = "ok" if e.findings == 0 else f"{e.findings} mismatch(es)"
            out.append(
                f"  epoch {e.epoch}: root {e.root[:16]}…, {e.leaves} leaves, charged "
                f"{e.epoch_charged}, earned {e.epoch_earned}; totals {e.charged}/{e.paid}/"
                f"{e.fees}; anchored by {e.anchored}: {status}"
            )
        if self.checked:
            counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.checked.items())
            out.append(f"  checked: {counts}")
        if self.party:
            p = self.party
            out.append(
                f"  {p['kind']} {p['address']}: {p['records']} records in {p['epochs']} "
                f"epoch(s), {p['receipts_matched']} matched to receipts "
                f"({p['receipts_log'] or 'no receipt log'})"
            )
        out.extend(f"  warning: {w}" for w in self.warnings)
        if self.ok:
            out.append("OK: the published ledger matches the chain")
        else:
            out.append(f"MISMATCH: {self.findings[0].line()}")
            out.extend(f"  also: {f.line()}" for f in self.findings[1:20])
            if len(self.findings) > 20:
                out.append(f"  ... {len(self.findings) - 20} more (--json lists them all)")
        return "\n".join(out)


# --------------------------------------------------------------------- parsing helpers


def _raw(address: Address | str) -> str:
    try:
        a = Address(address) if isinstance(address, str) else address
    except Exception as e:  # pytoniq's AddressError is no ValueError
        raise LedgerFormatError(f"not an address: {address!r}") from e
    return a.to_str(is_user_friendly=False)


def _amount(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LedgerFormatError(f"{what}: not an amount: {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise LedgerFormatError(f"{what}: not an amount: {value!r}") from None
    if n < 0:
        raise LedgerFormatError(f"{what}: negative")
    return n


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise LedgerFormatError(f"{what}: missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            raise LedgerFormatError(f"{what}: not base64") from None


def _signature(value: Any, what: str) -> bytes:
    """A 64-byte ed25519 signature, in hex (as receipts carry it) or base64."""
    if not isinstance(value, str) or not value:
        raise LedgerFormatError(f"{what}: missing")
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raw = _b64(value, what)
    if len(raw) != 64:
        raise LedgerFormatError(f"{what}: {len(raw)} bytes, expected 64")
    return raw


def _hex32(value: Any, what: str) -> bytes:
    try:
        raw = bytes.fromhex(str(value).removeprefix("0x"))
    except ValueError:
        raise LedgerFormatError(f"{what}: not hex") from None
    if len(raw) != 32:
        raise LedgerFormatError(f"{what}: {len(raw)} bytes, expected 32")
    return raw


def _where(epoch: int, index: int, leaf: Leaf | None = None, **more: Any) -> dict[str, Any]:
    w: dict[str, Any] = {"epoch": epoch, "leaf": index}
    if leaf is not None:
        w.update(kind=leaf.KIND, address=leaf.address)
    w.update(more)
    return w


# --------------------------------------------------------------------- published epochs


@dataclass(frozen=True)
class PublishedEpoch:
    """One epoch as the matcher publishes it (``GET /v1/ledger/epochs/{n}``)."""

    epoch: int
    vault: str
    root: bytes
    charged: int
    paid: int
    fees: int
    leaves: int
    epoch_charged: int | None
    epoch_earned: int | None
    epoch_fees: int | None
    state: str
    commit: EpochCommit | None
    commit_hash: bytes | None  # the hash of the commit cell as published
    signature: bytes | None
    commit_problem: str | None = None  # why there is no readable commit


@dataclass(frozen=True)
class Totals:
    charged: int = 0
    paid: int = 0
    fees: int = 0


def parse_epoch(data: Any) -> PublishedEpoch:
    """Raises LedgerFormatError unless ``data`` has the documented shape. A commit that
    does not parse is kept as ``commit_problem``: a finding of ``check_commit``."""
    if not isinstance(data, dict):
        raise LedgerFormatError("an epoch is a JSON object")
    try:
        epoch = int(data["epoch"])
        root = _hex32(data["root"], "root")
        vault = _raw(str(data["vault"]))
    except (KeyError, TypeError, ValueError) as e:
        raise LedgerFormatError(f"epoch: {e}") from e

    def opt(name: str) -> int | None:
        return None if data.get(name) is None else _amount(data[name], name)

    commit = commit_hash = signature = None
    problem = None
    c = data.get("commit")
    if not isinstance(c, dict):
        problem = "no commit published"
    else:
        try:
            commit, commit_hash = EpochCommit.parse_boc(_b64(c.get("boc"), "commit.boc"))
            signature = _signature(c.get("signature"), "commit.signature")
        except (LedgerFormatError, SignedObjectError) as e:
            problem = f"unreadable commit: {e}"
    return PublishedEpoch(
        epoch=epoch,
        vault=vault,
        root=root,
        charged=_amount(data.get("charged"), "charged"),
        paid=_amount(data.get("paid"), "paid"),
        fees=_amount(data.get("fees"), "fees"),
        leaves=_amount(data.get("leaves"), "leaves"),
        epoch_charged=opt("epoch_charged"),
        epoch_earned=opt("epoch_earned"),
        epoch_fees=opt("epoch_fees"),
        state=str(data.get("state", "")),
        commit=commit,
        commit_hash=commit_hash,
        signature=signature,
        commit_problem=problem,
    )


def check_commit(pub: PublishedEpoch, vault: str, operator_key: bytes) -> Findings:
    """The published EpochCommit is signed by the Vault's operator key, is for this Vault,
    and says what the epoch's JSON says."""
    out = Findings(epoch=pub.epoch)
    if pub.vault != _raw(vault):
        out.add("vault", "epoch published for another vault", _raw(vault), pub.vault)
    if pub.state != "committed":
        out.add("state", "listed although not committed", "committed", pub.state or "(none)")
    c = pub.commit
    if c is None or pub.commit_hash is None or pub.signature is None:
        out.add("commit", pub.commit_problem or "no commit published")
        return out
    if not signature_valid(pub.signature, pub.commit_hash, operator_key):
        out.add(
            "commit-signature",
            "the EpochCommit is not signed by the Vault's operator key",
            operator_key.hex(),
            "another signature",
        )
    if _raw(c.vault) != _raw(vault):
        out.add("commit-vault", "the EpochCommit names another vault", _raw(vault), _raw(c.vault))
    for name, signed, shown in (
        ("epoch", c.epoch, pub.epoch),
        ("root", c.root.hex(), pub.root.hex()),
        ("charged", c.charged, pub.charged),
        ("paid", c.paid, pub.paid),
        ("fees", c.fees, pub.fees),
        ("leaves", c.leaves, pub.leaves),
    ):
        if signed != shown:
            out.add(f"commit-{name}", f"{name} differs from the signed EpochCommit", signed, shown)
    return out


# --------------------------------------------------------------------- on-chain commits


@dataclass(frozen=True)
class OnChainCommit:
    """A CommitEpoch the Vault executed (from its transaction history)."""

    commit: EpochCommit
    commit_hash: bytes
    tx_lt: int
    tx_hash: bytes


@dataclass(frozen=True)
class CommitHistory:
    """Commits found in the Vault's history. ``complete``: read back to the oldest epoch
    audited (or the Vault's first transaction), so a commit missing from it is one the
    chain never executed."""

    commits: dict[int, OnChainCommit]
    complete: bool
    note: str = ""


def check_history(pub: PublishedEpoch, history: CommitHistory | None) -> tuple[str, Findings]:
    """What anchors ``pub`` on-chain, and findings if it differs from the commit the Vault
    executed for its epoch."""
    out = Findings(epoch=pub.epoch)
    onchain = history.commits.get(pub.epoch) if history else None
    if onchain is None:
        if history is not None and history.complete:
            out.add("commit-onchain", "the Vault's history holds no commit of this epoch")
            return "nothing", out
        return "operator-signed commit", out
    c = onchain.commit
    for name, on_chain, shown in (
        ("root", c.root.hex(), pub.root.hex()),
        ("charged", c.charged, pub.charged),
        ("paid", c.paid, pub.paid),
        ("fees", c.fees, pub.fees),
        ("leaves", c.leaves, pub.leaves),
    ):
        if on_chain != shown:
            out.add(
                f"onchain-{name}",
                f"{name} differs from the commit the Vault executed "
                f"(transaction lt {onchain.tx_lt})",
                on_chain,
                shown,
            )
    if not out and pub.commit_hash is not None and pub.commit_hash != onchain.commit_hash:
        out.add(
            "onchain-commit",
            "the published EpochCommit is not the cell the Vault executed",
            onchain.commit_hash.hex(),
            pub.commit_hash.hex(),
        )
    return "the Vault's commit transaction", out


def check_chain_head(pubs: list[PublishedEpoch], from_epoch: int, vault_data: Any) -> Findings:
    """Published epochs run from ``from_epoch`` to the Vault's ``lastEpoch`` without a gap;
    the newest root is the Vault's ``lastRoot`` (and its totals the Vault's committed ones,
    when the Vault exposes them); the Vault has not paid out more than committed."""
    out = Findings()
    last = vault_data.last_epoch
    numbers = [p.epoch for p in pubs]
    wanted = list(range(from_epoch, last + 1))
    missing = sorted(set(wanted) - set(numbers))
    extra = sorted(set(numbers) - set(wanted))
    span = f"epochs {from_epoch}..{last}"
    if missing:
        out.add(
            "epochs",
            "committed on-chain but not published",
            span,
            "no " + ", ".join(map(str, missing[:10])),
            epoch=missing[0],
        )
    if extra:
        out.add(
            "epochs",
            "published but not committed on-chain",
            span,
            ", ".join(map(str, extra[:10])),
            epoch=extra[0],
        )
    if not missing and not extra and numbers != wanted:
        out.add("epochs", "published out of order or twice", wanted[:10], numbers[:10])
    newest = next((p for p in pubs if p.epoch == last), None)
    if newest is None:
        return out
    if newest.root != vault_data.last_root:
        out.add(
            "root-onchain",
            "the newest root is not the Vault's lastRoot",
            vault_data.last_root.hex(),
            newest.root.hex(),
            epoch=last,
        )
    for name in ("charged", "paid", "fees"):
        on_chain = getattr(vault_data, f"committed_{name}", None)  # once the Vault keeps them
        if on_chain is not None and on_chain != getattr(newest, name):
            out.add(
                f"totals-onchain-{name}",
                f"{name} is not the Vault's committed total",
                on_chain,
                getattr(newest, name),
                epoch=last,
            )
    if vault_data.paid_out > newest.paid:
        out.add(
            "paid-out",
            "the Vault paid providers more than the committed paid total",
            f"<= {newest.paid}",
            vault_data.paid_out,
            epoch=last,
        )
    return out


# --------------------------------------------------------------------- leaves, totals


def _sort_key(leaf: Leaf) -> tuple[int, int, bytes]:
    a = Address(leaf.address)
    return (0 if leaf.KIND == "escrow" else 1, a.wc, a.hash_part)


def check_leaves(pub: PublishedEpoch, pages: list[Any]) -> tuple[list[Leaf], Findings]:
    """Parse the pages of ``/epochs/{n}/leaves``; recompute every leaf's hash and the root.
    Returns the leaves (those that parse, in order) and the findings."""
    out = Findings(epoch=pub.epoch)
    leaves: list[Leaf] = []
    hashes: list[bytes | None] = []
    for page in pages:
        if not isinstance(page, dict) or not isinstance(page.get("leaves"), list):
            out.add("leaves", "a page of leaves is not {leaves: [...]}")
            continue
        if str(page.get("epoch")) != str(pub.epoch):
            out.add("leaves", "a page of leaves of another epoch", pub.epoch, page.get("epoch"))
        if str(page.get("root", "")).removeprefix("0x").lower() != pub.root.hex():
            out.add(
                "leaves-root",
                "a page of leaves names another root",
                pub.root.hex(),
                page.get("root"),
            )
        if page.get("total") is not None and str(page["total"]) != str(pub.leaves):
            out.add(
                "leaves-total", "a page of leaves counts another total", pub.leaves, page["total"]
            )
        for item in page["leaves"]:
            index = len(hashes)
            try:
                leaf = EscrowLeaf.from_json(item)  # dispatches on "kind"
                h = leaf.hash()  # checks the field widths
            except LedgerFormatError as err:
                out.add("leaf-format", str(err), leaf=index)
                hashes.append(None)
                continue
            at = _where(pub.epoch, index, leaf)
            if str(item.get("index", index)) != str(index):
                out.add(
                    "leaf-index",
                    "the leaf is listed at another index",
                    index,
                    item.get("index"),
                    **at,
                )
            if leaf.epoch != pub.epoch:
                out.add("leaf-epoch", "a leaf of another epoch", pub.epoch, leaf.epoch, **at)
            shown = str(item.get("hash", "")).removeprefix("0x").lower()
            if shown != h.hex():
                out.add(
                    "leaf-hash",
                    "the published hash is not the hash of the leaf's fields",
                    h.hex(),
                    shown or "(none)",
                    **at,
                )
            leaves.append(leaf)
            hashes.append(h)
    for i in range(1, len(leaves)):
        if _sort_key(leaves[i]) <= _sort_key(leaves[i - 1]):
            out.add(
                "leaf-order",
                "leaves are not escrows then providers, each sorted by address, once each",
                **_where(pub.epoch, i, leaves[i]),
            )
            break
    if len(hashes) != pub.leaves:
        out.add("leaf-count", "another number of leaves than committed", pub.leaves, len(hashes))
    if all(h is not None for h in hashes):
        recomputed = merkle_root([h for h in hashes if h is not None])
        if recomputed != pub.root:
            out.add(
                "root",
                "the leaves do not hash to the committed root",
                pub.root.hex(),
                recomputed.hex(),
            )
    return leaves, out


def check_totals(
    pub: PublishedEpoch, previous: Totals, leaves: list[Leaf], fee_bps: int
) -> Findings:
    """The epoch's totals follow from the previous epoch's and its leaves: the escrow leaves
    sum to the provider leaves plus the epoch's fees, and those fees are at least the
    protocol's share (``fee_of`` rounds each job's fee up, so the sum of the fees is never
    below ``fee_of`` of the sum)."""
    out = Findings(epoch=pub.epoch)
    charged = sum(lf.amount for lf in leaves if lf.KIND == "escrow")
    earned = sum(lf.amount for lf in leaves if lf.KIND == "provider")
    for check, message, expected, shown in (
        (
            "total-charged",
            "charged is not the previous total plus the escrow leaves",
            previous.charged + charged,
            pub.charged,
        ),
        (
            "total-paid",
            "paid is not the previous total plus the provider leaves",
            previous.paid + earned,
            pub.paid,
        ),
        ("total-fees", "fees is not charged - paid", pub.charged - pub.paid, pub.fees),
        (
            "epoch-charged",
            "epoch_charged is not the sum of the escrow leaves",
            charged,
            pub.epoch_charged,
        ),
        (
            "epoch-earned",
            "epoch_earned is not the sum of the provider leaves",
            earned,
            pub.epoch_earned,
        ),
        (
            "epoch-fees",
            "epoch_fees is not the escrow leaves less the provider leaves",
            charged - earned,
            pub.epoch_fees,
        ),
    ):
        if shown is not None and shown != expected:
            out.add(check, message, expected, shown)
    floor = fee_of(charged, fee_bps)
    if charged - earned < floor:
        out.add(
            "epoch-fees",
            f"the escrow leaves ({charged}) are not the provider leaves "
            f"({earned}) plus at least the {fee_bps} bps protocol fee",
            f">= {floor}",
            charged - earned,
        )
    return out


@dataclass
class LeafChain:
    """Per (kind, address), across the epochs audited so far."""

    full: bool  # audited from epoch 1: a party's first leaf starts from 0
    latest: dict[tuple[str, str], Latest] = field(default_factory=dict)
    cumulatives: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    seeds: dict[tuple[str, str], int] = field(default_factory=dict)  # before the window
    earned: dict[str, int] = field(default_factory=dict)  # provider -> sum of its leaves


def check_cumulatives(epoch: int, leaves: list[Leaf], chain: LeafChain) -> Findings:
    """Each leaf's cumulative is its party's previous leaf's plus this epoch's amount (from
    0 when auditing from epoch 1; otherwise a party's first leaf seen seeds its chain).
    Updates ``chain``."""
    out = Findings()
    for index, lf in enumerate(leaves):
        key = (lf.KIND, lf.address)
        prev = chain.latest.get(key)
        if prev is not None:
            before = prev[0]
        elif chain.full:
            before = 0
        else:
            before = lf.cumulative - lf.amount
            chain.seeds[key] = max(before, 0)
        if lf.cumulative != before + lf.amount:
            what = "charged" if lf.KIND == "escrow" else "earned"
            out.add(
                "cumulative",
                f"cumulative is not the previous one ({before}) plus this "
                f"epoch's {what} ({lf.amount})",
                before + lf.amount,
                lf.cumulative,
                **_where(epoch, index, lf),
            )
        chain.latest[key] = (lf.cumulative, epoch, index)
        chain.cumulatives.setdefault(key, []).append(lf.cumulative)
        if lf.KIND == "provider":
            chain.earned[lf.address] = chain.earned.get(lf.address, 0) + lf.amount
    return out


# --------------------------------------------------------------------- vouchers, accounts


def _same(name: str, shown: Any, signed: str) -> bool:
    try:
        if name in ("provider", "vault"):
            return _raw(str(shown)) == signed
        return str(int(shown)) == signed
    except Exception:
        return False


def check_payout(
    provider: str,
    latest: Latest,
    payout: Any,
    vault: str,
    operator_key: bytes,
    last_epoch: int,
    earned_sum: int | None = None,
) -> Findings:
    """The provider's latest payout voucher is operator-signed, for this Vault and this
    provider, and pays exactly its latest committed cumulative (``earned_sum``, the sum of
    all its leaves, when auditing from epoch 1)."""
    cumulative, epoch, index = latest
    out = Findings(epoch=epoch, leaf=index, kind="provider", address=provider)
    if payout is None:
        out.add(
            "payout",
            "no payout voucher published for a provider with committed leaves",
            cumulative,
            "none",
        )
        return out
    try:
        if not isinstance(payout, dict):
            raise LedgerFormatError("not a JSON object")
        voucher, cell_hash = PayoutVoucher.parse_boc(_b64(payout.get("voucher"), "voucher"))
        signature = _signature(payout.get("signature"), "signature")
    except (LedgerFormatError, SignedObjectError) as e:
        out.add("payout", f"unreadable payout voucher: {e}")
        return out
    if not signature_valid(signature, cell_hash, operator_key):
        out.add(
            "payout-signature",
            "the payout voucher is not signed by the Vault's operator key",
            operator_key.hex(),
            "another signature",
        )
    if _raw(voucher.vault) != _raw(vault):
        out.add(
            "payout-vault", "the voucher is for another vault", _raw(vault), _raw(voucher.vault)
        )
    if _raw(voucher.provider) != _raw(provider):
        out.add(
            "payout-provider",
            "the voucher is for another provider",
            _raw(provider),
            _raw(voucher.provider),
        )
    for name, signed in (
        ("provider", _raw(voucher.provider)),
        ("vault", _raw(voucher.vault)),
        ("epoch", str(voucher.epoch)),
        ("cumulative", str(voucher.cumulative)),
    ):
        shown = payout.get(name)
        if not _same(name, shown, signed):
            out.add(f"payout-{name}", f"{name} differs from the signed voucher", signed, shown)
    if voucher.cumulative != cumulative:
        out.add(
            "payout-cumulative",
            "the latest payout voucher does not pay the provider's latest committed cumulative",
            cumulative,
            voucher.cumulative,
        )
    elif earned_sum is not None and voucher.cumulative != earned_sum:
        out.add(
            "payout-sum",
            "the payout voucher is not the sum of the provider's leaves",
            earned_sum,
            voucher.cumulative,
        )
    if not epoch <= voucher.epoch <= last_epoch:
        out.add(
            "payout-epoch",
            "the voucher's epoch is not between the provider's latest "
            "leaf and the last committed epoch",
            f"{epoch}..{last_epoch}",
            voucher.epoch,
        )
    return out


def check_provider_account(
    provider: str, latest: Latest, data: Any, claimed: int | None, registry: str
) -> Findings:
    """The provider is a Provider of the Vault's Registry and has claimed from this Vault
    no more than its committed cumulative."""
    cumulative, epoch, index = latest
    out = Findings(epoch=epoch, leaf=index, kind="provider", address=provider)
    if data is None:
        out.add("provider-account", "no Provider contract at this address")
        return out
    if _raw(data.registry) != _raw(registry):
        out.add(
            "provider-registry",
            "the Provider belongs to another Registry",
            _raw(registry),
            _raw(data.registry),
        )
    if claimed is not None and claimed > cumulative:
        out.add(
            "claimed",
            "the Provider claimed more than its committed cumulative",
            f"<= {cumulative}",
            claimed,
        )
    return out


def check_escrow_account(
    escrow: str,
    latest: Latest,
    cumulatives: list[int],
    seed: int | None,
    data: Any,
    vault: str,
) -> Findings:
    """The escrow is one of this Vault's, and its on-chain ``charged`` is 0 or one of its
    committed cumulatives, never above the latest (``seed``: its cumulative before the
    audited window, when auditing from a later epoch: anything up to it is accepted)."""
    cumulative, epoch, index = latest
    out = Findings(epoch=epoch, leaf=index, kind="escrow", address=escrow)
    if data is None:
        out.add("escrow-account", "no Escrow contract at this address")
        return out
    if _raw(data.vault) != _raw(vault):
        out.add("escrow-vault", "the Escrow pays another vault", _raw(vault), _raw(data.vault))
    charged = data.charged
    if charged > cumulative:
        out.add(
            "charged",
            "the Escrow was charged more than its committed cumulative",
            f"<= {cumulative}",
            charged,
        )
    elif charged and charged not in cumulatives and not (seed is not None and charged <= seed):
        out.add(
            "charged",
            "the Escrow's charged is none of its committed cumulatives",
            "0 or one of " + ", ".join(map(str, cumulatives[-5:])),
            charged,
        )
    return out


# --------------------------------------------------------------------- per-job records


def _proof(data: Any, what: str) -> list[ProofStep]:
    if not isinstance(data, list):
        raise LedgerFormatError(f"{what}: a proof is a list")
    return [ProofStep.from_json(s) for s in data]


def check_records(
    kind: Kind,
    address: str,
    pub: PublishedEpoch,
    public_leaf: Leaf,
    index: int,
    response: Any,
    fee_bps: int,
) -> tuple[list[JobRecord], Findings]:
    """A party's records of one epoch: the leaf served with them is the public one and
    proves up to the committed root; each record proves up to the leaf's sub-root, names
    the party and is priced right; together they are the leaf's whole sub-tree (sorted by
    job id) and sum to its amount (less the protocol fee, for a provider)."""
    address = _raw(address)
    out = Findings(epoch=pub.epoch, leaf=index, kind=kind, address=address)
    if not isinstance(response, dict):
        out.add("records", "the records answer is not a JSON object")
        return [], out
    if str(response.get("epoch")) != str(pub.epoch):
        out.add("records", "records of another epoch", pub.epoch, response.get("epoch"))
    try:
        shown_root = _hex32(response.get("root"), "root")
        leaf_json = response.get("leaf")
        if isinstance(leaf_json, dict) and "kind" not in leaf_json:
            leaf_json = {**leaf_json, "kind": kind}
        leaf_hash = EscrowLeaf.from_json(leaf_json).hash()
        leaf_proof = _proof(response.get("proof"), "proof")
        items = response.get("records")
        if not isinstance(items, list):
            raise LedgerFormatError("no list of records")
    except LedgerFormatError as err:
        out.add("records", f"malformed records answer: {err}")
        return [], out
    if shown_root != pub.root:
        out.add("records-root", "the records name another root", pub.root.hex(), shown_root.hex())
    if leaf_hash != public_leaf.hash():
        out.add(
            "records-leaf",
            "the leaf served with the records is not the public leaf",
            public_leaf.hash().hex(),
            leaf_hash.hex(),
        )
    elif "hash" in leaf_json and str(leaf_json["hash"]).lower() != leaf_hash.hex():
        out.add("records-leaf", "the leaf's hash is not the hash of its fields", leaf_hash.hex(),
                leaf_json["hash"])  # fmt: skip
    if str(response.get("index", index)) != str(index):
        out.add(
            "records-leaf",
            "the leaf served with the records is at another index",
            index,
            response.get("index"),
        )
    if not verify_proof(public_leaf.hash(), leaf_proof, pub.root):
        out.add(
            "leaf-proof",
            "the leaf's proof does not lead to the committed root",
            pub.root.hex(),
            "another root",
        )
    records: list[JobRecord] = []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise LedgerFormatError("a record entry is a JSON object")
            record = JobRecord.from_json(item.get("record"))
            record.payload()  # field widths
            proof = _proof(item.get("proof"), "record proof")
        except LedgerFormatError as err:
            out.add("record-format", f"record {i}: {err}")
            continue
        job = record.job_id.hex()
        party = record.escrow if kind == "escrow" else record.provider
        if _raw(party) != address:
            out.add("record-party", f"a record of another {kind}", address, _raw(party), job=job)
        if not verify_proof(record.hash(), proof, public_leaf.sub_root):
            out.add(
                "record-proof",
                "the record's proof does not lead to its leaf's sub-root",
                public_leaf.sub_root.hex(),
                "another root",
                job=job,
            )
        priced = cost_nanoton(
            record.prompt_tokens,
            record.completion_tokens,
            record.price_prompt,
            record.price_completion,
        )
        if record.amount != priced:
            out.add(
                "record-amount",
                "the amount is not the tokens at the prices",
                priced,
                record.amount,
                job=job,
            )
        records.append(record)
    ids = [r.job_id for r in records]
    if ids != sorted(set(ids)):
        out.add("records-order", "the records are not sorted by job id, once each")
    if len(records) == len(items):
        sub_root = merkle_root([r.hash() for r in sorted(records, key=lambda r: r.job_id)])
        if sub_root != public_leaf.sub_root:
            out.add(
                "sub-root",
                "the records are not the leaf's whole sub-tree (a record is "
                "missing, extra or altered)",
                public_leaf.sub_root.hex(),
                sub_root.hex(),
            )
    if kind == "escrow":
        total = sum(r.amount for r in records)
        what = "the sum of its records' amounts"
    else:
        total = sum(r.amount - fee_of(r.amount, fee_bps) for r in records)
        what = f"the sum of its records' amounts less the {fee_bps} bps fee"
    if total != public_leaf.amount:
        out.add("records-sum", f"the leaf's amount is not {what}", total, public_leaf.amount)
    return records, out


# --------------------------------------------------------------------- receipts


@dataclass(frozen=True)
class LoggedReceipt:
    """One line of a receipt log: a node-signed receipt as its party kept it."""

    line: int
    receipt: Receipt
    cell_hash: bytes  # what the node signed
    signature: bytes
    node_key: bytes | None  # the key the line names, if any

    @property
    def job_id(self) -> bytes:
        return self.receipt.job_id.to_bytes(32, "big")


def load_receipt_log(path: Path) -> tuple[dict[bytes, LoggedReceipt], list[str]]:
    """Read a JSON-lines receipt log, one receipt a line: ``{"receipt": base64 BOC,
    "signature": hex, "job_id": hex, "node": hex (optional), ...}``. Returns the receipts
    by job id, and warnings about lines that cannot be read (a torn last line after a
    crash) or a second, different receipt for one job. Raises OSError."""
    receipts: dict[bytes, LoggedReceipt] = {}
    warnings: list[str] = []
    with Path(path).open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                receipt, cell_hash = Receipt.parse_boc(_b64(line["receipt"], "receipt"))
                signature = _signature(line["signature"], "signature")
                named = line.get("node") or line.get("node_key") or line.get("node_id")
                node_key = _hex32(named, "node") if named else None
                job_id = receipt.job_id.to_bytes(32, "big")
                if line.get("job_id") is not None and _hex32(line["job_id"], "job_id") != job_id:
                    raise LedgerFormatError("job_id is not the receipt's")
            except (ValueError, KeyError, TypeError, LedgerFormatError, SignedObjectError) as e:
                warnings.append(f"{path}:{n}: unreadable receipt ({e})")
                continue
            seen = receipts.get(job_id)
            if seen is not None and seen.cell_hash != cell_hash:
                warnings.append(
                    f"{path}:{n}: a second, different receipt for job {job_id.hex()} (line "
                    f"{seen.line}): if one node key signed both, that is slashable"
                )
                continue
            receipts.setdefault(job_id, LoggedReceipt(n, receipt, cell_hash, signature, node_key))
    return receipts, warnings


def check_receipts(
    kind: Kind,
    address: str,
    records: list[tuple[int, int, JobRecord]],
    receipts: dict[bytes, LoggedReceipt],
    node_keys: Callable[[str], set[bytes]],
) -> tuple[int, Findings, list[str]]:
    """Each record (``(epoch, leaf index, record)``) is billed once and equals the receipt
    the party kept for its job: same escrow, model, tokens, prices and amount, and its
    receipt hash is that receipt's, whose signature is by the node key the log names (or
    else by one of ``node_keys(provider)``: the provider's node keys).

    Returns the number of records matched, the findings, and warnings: receipts of the
    party in no committed record (jobs not settled yet, or never billed / paid), a
    receipt signed by a key that is not the record's provider's."""
    address = _raw(address)
    out = Findings(kind=kind, address=address)
    warnings: list[str] = []
    matched = 0
    billed: dict[bytes, int] = {}
    for epoch, index, r in records:
        at = {"epoch": epoch, "leaf": index, "job": r.job_id.hex()}
        if r.job_id in billed:
            out.add("record-twice", f"the job was already billed in epoch {billed[r.job_id]}", **at)
            continue
        billed[r.job_id] = epoch
        lr = receipts.get(r.job_id)
        if lr is None:
            out.add(
                "receipt-missing", "no receipt kept for a billed job", "a receipt", "none", **at
            )
            continue
        rc = lr.receipt
        provider_keys = node_keys(_raw(r.provider))
        keys = {lr.node_key} if lr.node_key else provider_keys
        if not any(signature_valid(lr.signature, lr.cell_hash, k) for k in keys):
            out.add(
                "receipt-signature",
                f"the receipt (line {lr.line}) is not signed by the "
                "node key it names, or the provider's",
                **at,
            )
        elif lr.node_key and provider_keys and lr.node_key not in provider_keys:
            warnings.append(
                f"job {r.job_id.hex()}: the receipt's node key {lr.node_key.hex()[:16]}… is "
                "neither the current nor the previous node key of the record's provider"
            )
        for name, from_receipt, from_record in (
            ("escrow", _raw(rc.escrow), _raw(r.escrow)),
            ("model", rc.model.to_bytes(32, "big").hex(), r.model.hex()),
            ("prompt_tokens", rc.prompt_tokens, r.prompt_tokens),
            ("completion_tokens", rc.completion_tokens, r.completion_tokens),
            ("price_prompt", rc.price_prompt, r.price_prompt),
            ("price_completion", rc.price_completion, r.price_completion),
            ("amount", rc.amount, r.amount),
            ("receipt_hash", lr.cell_hash.hex(), r.receipt_hash.hex()),
        ):
            if from_receipt != from_record:
                out.add(
                    f"record-{name}",
                    f"{name} is not the receipt's (line {lr.line})",
                    from_receipt,
                    from_record,
                    **at,
                )
        matched += 1
    unbilled = [
        lr
        for lr in receipts.values()
        if lr.job_id not in billed and (kind == "provider" or _raw(lr.receipt.escrow) == address)
    ]
    if unbilled:
        sample = ", ".join(lr.job_id.hex()[:16] for lr in unbilled[:5])
        warnings.append(
            f"{len(unbilled)} receipt(s) kept are in no committed record ({sample}"
            f"{', …' if len(unbilled) > 5 else ''}): not settled yet, or never "
            + ("billed" if kind == "escrow" else "paid")
        )
    return matched, out, warnings


# --------------------------------------------------------------------- the source


class AuditSource(Protocol):
    """Everything the audit reads, from the matcher's ledger API and from the chain."""

    async def vault(self) -> Any:
        """The Vault's ``vault_data`` (``contracts.chain.getters.VaultData``)."""

    async def commit_history(self, from_epoch: int) -> CommitHistory:
        """The CommitEpoch messages the Vault executed, newest back to ``from_epoch``."""

    async def epochs(self, from_epoch: int) -> list[Any]:
        """Every published epoch from ``from_epoch`` (all pages), as JSON."""

    async def epoch(self, n: int) -> Any:
        """One published epoch, as JSON."""

    async def leaves(self, epoch: int) -> list[Any]:
        """Every page of an epoch's leaves, as JSON."""

    async def payout(self, provider: str) -> Any | None:
        """The provider's latest payout voucher, as JSON (None: there is none)."""

    async def records(self, epoch: int, kind: Kind, address: str, key: Ed25519PrivateKey) -> Any:
        """A party's records of an epoch, as JSON, authenticated with ``key``."""

    async def escrow(self, address: str) -> Any | None:
        """``escrow_data`` (None: no contract at that address)."""

    async def provider(self, address: str) -> Any | None:
        """``provider_data`` (None: no contract at that address)."""

    async def claimed(self, provider: str) -> int:
        """The Provider's ``claimed(vault)``."""


class LiveSource:
    """The matcher's ledger API over HTTP, and the chain through toncenter."""

    def __init__(
        self, matcher_url: str, chain: ToncenterClient, vault: str, *, timeout: float = 30.0
    ):
        self.base = matcher_url.rstrip("/")
        self.chain = chain
        self.vault_address = _raw(vault)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(
        self, path: str, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Any | None:
        """The JSON answer, or None for a 404."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(self.base + path, params=params, headers=headers) as r:
                if r.status == 404:
                    return None
                text = await r.text()
                if r.status != 200:
                    raise SourceError(f"the matcher answered {r.status} to {path}: {text[:200]}")
        except aiohttp.ClientError as e:
            raise SourceError(f"cannot reach the matcher at {self.base}: {e}") from e
        except TimeoutError as e:
            raise SourceError(f"the matcher at {self.base} timed out on {path}") from e
        try:
            return json.loads(text)
        except ValueError:
            raise SourceError(f"the matcher's answer to {path} is not JSON") from None

    async def _required(self, path: str, params: dict[str, Any] | None = None) -> Any:
        data = await self._get(path, params)
        if data is None:
            raise SourceError(f"the matcher answered 404 to {path}")
        return data

    async def epochs(self, from_epoch: int) -> list[Any]:
        out: list[Any] = []
        cursor: int | None = from_epoch
        for _ in range(MAX_PAGES):
            if cursor is None:
                return out
            page = await self._required("/v1/ledger/epochs", {"from": cursor, "limit": PAGE_LIMIT})
            if not isinstance(page, dict) or not isinstance(page.get("epochs"), list):
                raise SourceError("the matcher's list of epochs is not {epochs: [...]}")
            out.extend(page["epochs"])
            nxt = page.get("next_from")
            if nxt is not None and (not isinstance(nxt, int) or nxt <= cursor):
                raise SourceError(f"the list of epochs does not advance (next_from {nxt!r})")
            cursor = nxt
        raise SourceError("the list of epochs never ends")

    async def epoch(self, n: int) -> Any:
        return await self._required(f"/v1/ledger/epochs/{n}")

    async def leaves(self, epoch: int) -> list[Any]:
        pages: list[Any] = []
        offset: int | None = 0
        path = f"/v1/ledger/epochs/{epoch}/leaves"
        for _ in range(MAX_PAGES):
            if offset is None:
                return pages
            page = await self._required(path, {"offset": offset, "limit": PAGE_LIMIT})
            pages.append(page)
            nxt = page.get("next_offset") if isinstance(page, dict) else None
            if nxt is not None and (not isinstance(nxt, int) or nxt <= offset):
                raise SourceError(f"epoch {epoch}: the leaves do not advance (next_offset {nxt!r})")
            offset = nxt
        raise SourceError(f"epoch {epoch}: the leaves never end")

    async def payout(self, provider: str) -> Any | None:
        return await self._get(f"/v1/ledger/payouts/{_raw(provider)}")

    async def records(self, epoch: int, kind: Kind, address: str, key: Ed25519PrivateKey) -> Any:
        headers = records_headers(key, kind, address, epoch)
        path = f"/v1/ledger/epochs/{epoch}/records"
        data = await self._get(path, {"kind": kind, "address": _raw(address)}, headers)
        if data is None:
            raise SourceError(f"the matcher has no records of {kind} {_raw(address)}")
        return data

    async def vault(self) -> Any:
        return await getters.get_vault_data(self.chain, self.vault_address)

    async def _active(self, address: str) -> bool:
        return (await self.chain.get_address_information(address)).is_active

    async def escrow(self, address: str) -> Any | None:
        if not await self._active(address):
            return None
        return await getters.get_escrow_data(self.chain, address)

    async def provider(self, address: str) -> Any | None:
        if not await self._active(address):
            return None
        return await getters.get_provider_data(self.chain, address)

    async def claimed(self, provider: str) -> int:
        return await getters.get_provider_claimed(self.chain, provider, Address(self.vault_address))

    async def commit_history(self, from_epoch: int) -> CommitHistory:
        commits: dict[int, OnChainCommit] = {}
        lt: int | None = None
        tx_hash: bytes | None = None
        for _ in range(MAX_PAGES):
            rows = await self.chain.get_transactions(
                self.vault_address, limit=HISTORY_PAGE, lt=lt, hash=tx_hash, archival=True
            )
            full_page = len(rows) == HISTORY_PAGE
            if lt is not None and rows and rows[0].lt == lt:
                rows = rows[1:]  # a page starts with the transaction it was asked from
            for tx in rows:
                commit = _executed_commit(tx)
                if commit is None:
                    continue
                commits.setdefault(commit.commit.epoch, commit)
                if commit.commit.epoch <= from_epoch:
                    return CommitHistory(commits, True)
            if not full_page or not rows:
                return CommitHistory(commits, True)
            lt, tx_hash = rows[-1].lt, rows[-1].hash
        return CommitHistory(commits, False, "the Vault's history is too long to read whole")


def _executed_commit(tx: Any) -> OnChainCommit | None:
    """The epoch commit a Vault transaction executed, if it is one."""
    msg = tx.in_msg
    try:
        if msg is None or msg.is_external_in or msg.bounced or msg.op != OP_COMMIT_EPOCH:
            return None
        if not tx.success:
            return None
        body = CommitEpoch.from_cell(msg.body)
        return OnChainCommit(body.commit, msg.body.refs[0].hash, tx.lt, tx.hash)
    except Exception:  # a malformed body: the Vault refused it
        return None


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
