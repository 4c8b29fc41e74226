"""Published epochs against the chain: each epoch's commit, the commit the Vault executed,
the chain head; then its leaves, its totals and each party's cumulatives. Pure functions
over parsed data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytoniq_core import Address

from client.audit.common import Latest, Leaf, _amount, _b64, _hex32, _raw, _signature, _where
from client.audit.report import Findings
from protocol.ledger import EscrowLeaf, LedgerFormatError, fee_of, merkle_root
from protocol.signed import EpochCommit, SignedObjectError, signature_valid

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
