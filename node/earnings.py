"""What a provider earned, epoch by epoch, checked three ways (``imago provider earnings``).

* **The matcher's ledger.** For each committed epoch (``GET /v1/ledger/epochs``), the
  provider's own per-job records (``GET /v1/ledger/epochs/{n}/records``, signed with the
  node key: docs/ledger.md, "Authentication of records"). They are checked before they
  count: the epoch's commit is signed by the Vault's operator key and names the root; the
  provider leaf proves into that root; the records rebuild the leaf's sub-root (all of
  them, none missing); they add up to the leaf's ``earned`` after the protocol fee; the
  leaf's cumulative follows the previous one. A committed epoch never changes, so what
  passed is cached (``earnings.json`` in the state dir) and only new epochs are fetched;
  a cached epoch whose root the matcher now lists differently is reported.
* **The node's receipt log** (``receipts.jsonl``). Every record must be a receipt this
  node signed, with the same job, tokens, prices and amount. Receipts in no committed
  epoch yet are *pending*.
* **The chain.** What the Provider has claimed from the Vault (``claimed`` getter) and the
  best payout voucher that passes the claim loop's checks give *claimed* and *claimable*.

Per epoch: jobs, tokens, earned (after the protocol fee), committed (the cumulative the
epoch commits), the part of it claimed and the part claimable. Amounts are nanoTON here;
the CLI shows TON.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from contracts.chain import getters
from contracts.chain.toncenter import ToncenterClient
from node.claims import Claimer, ClaimError
from node.receipt_log import FILE_NAME as RECEIPT_LOG
from node.receipt_log import read_receipt_log
from protocol.ledger import (
    JobRecord,
    LedgerFormatError,
    ProofStep,
    ProviderLeaf,
    fee_of,
    merkle_root,
    records_headers,
    verify_proof,
)
from protocol.signed import EpochCommit, SignedObjectError, signature_valid

__all__ = ["EarningsError", "EpochEarnings", "Earnings", "compute_earnings"]

CACHE_FILE = "earnings.json"
PAGE = 200


class EarningsError(RuntimeError):
    """The earnings cannot be computed (matcher or chain unreachable, key refused)."""


def _raw(a: Address | str) -> str:
    return (Address(a) if isinstance(a, str) else a).to_str(is_user_friendly=False)


@dataclass
class EpochEarnings:
    epoch: int
    jobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gross: int = 0  # what clients paid for these jobs
    earned: int = 0  # after the protocol fee: the provider leaf's amount
    committed: int = 0  # the provider leaf's cumulative
    claimed: int = 0  # the part of `earned` the Provider has claimed
    claimable: int = 0  # the part a released, checked voucher covers and not yet claimed

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if k in _AMOUNTS else v) for k, v in self.__dict__.items()}


_AMOUNTS = {"gross", "earned", "committed", "claimed", "claimable"}


@dataclass
class Earnings:
    provider: str
    vault: str | None = None
    epochs: list[EpochEarnings] = field(default_factory=list)
    claimed: int = 0
    voucher: int = 0  # the best checked voucher's cumulative
    voucher_epoch: int = 0
    pending_jobs: int = 0
    pending_tokens: tuple[int, int] = (0, 0)
    pending_gross: int = 0
    pending: int = 0  # after the protocol fee
    logged: int = 0  # receipts in the log
    issues: list[str] = field(default_factory=list)

    @property
    def earned(self) -> int:
        return sum(e.earned for e in self.epochs)

    @property
    def committed(self) -> int:
        return max((e.committed for e in self.epochs), default=0)

    @property
    def claimable(self) -> int:
        return max(0, self.voucher - self.claimed)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "vault": self.vault,
            "epochs": [e.to_json() for e in self.epochs],
            "totals": {
                "jobs": sum(e.jobs for e in self.epochs),
                "prompt_tokens": sum(e.prompt_tokens for e in self.epochs),
                "completion_tokens": sum(e.completion_tokens for e in self.epochs),
                "gross": str(sum(e.gross for e in self.epochs)),
                "earned": str(self.earned),
                "committed": str(self.committed),
                "claimed": str(self.claimed),
                "claimable": str(self.claimable),
                "pending": str(self.pending),
            },
            "voucher": {"epoch": self.voucher_epoch, "cumulative": str(self.voucher)},
            "pending": {
                "jobs": self.pending_jobs,
                "prompt_tokens": self.pending_tokens[0],
                "completion_tokens": self.pending_tokens[1],
                "gross": str(self.pending_gross),
                "earned": str(self.pending),
            },
            "receipts_logged": self.logged,
            "issues": self.issues,
        }


# ----------------------------------------------------------------- the cache


def _load_cache(path: Path, provider: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
        mine = doc["providers"][provider]
        if isinstance(mine, dict) and isinstance(mine.get("epochs"), dict):
            return mine
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    return {"epochs": {}}


def _save_cache(path: Path, provider: str, mine: dict[str, Any]) -> None:
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc.get("providers"), dict):
            raise ValueError
    except (FileNotFoundError, ValueError, AttributeError):
        doc = {"version": 1, "providers": {}}
    doc["providers"][provider] = mine
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(doc).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ----------------------------------------------------------------- fetching and checking


class _Ledger:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        matcher: str,
        provider: str,
        node_key: Ed25519PrivateKey,
    ) -> None:
        self.session = session
        self.matcher = matcher.rstrip("/")
        self.provider = provider
        self.node_key = node_key

    async def _get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        url = self.matcher + path
        async with self.session.get(url, headers=headers) as r:
            if r.status == 404:
                return None
            if r.status == 403:
                raise EarningsError(
                    f"the matcher refused the node key for {path} (403): the records of a "
                    "provider go only to its node key; is this the node's state dir?"
                )
            if r.status != 200:
                raise EarningsError(f"GET {url}: HTTP {r.status}: {(await r.text())[:200]}")
            try:
                return await r.json(content_type=None)
            except ValueError as e:
                raise EarningsError(f"GET {url}: not JSON") from e

    async def epochs(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        start: int | None = 1
        while start is not None:
            page = await self._get(f"/v1/ledger/epochs?from={start}&limit={PAGE}")
            if not page:
                break
            out.extend(page.get("epochs") or [])
            nxt = page.get("next_from")
            start = int(nxt) if nxt is not None and int(nxt) > start else None
        return out

    async def records(self, epoch: int) -> dict[str, Any] | None:
        headers = records_headers(self.node_key, "provider", self.provider, epoch)
        path = f"/v1/ledger/epochs/{epoch}/records?kind=provider&address={self.provider}"
        return await self._get(path, headers)


def _check_commit(e: dict[str, Any], vault: getters.VaultData, vault_address: str) -> str | None:
    """Why a listed epoch cannot be trusted, or None."""
    n = int(e["epoch"])
    try:
        commit, cell_hash = EpochCommit.parse_boc(base64.b64decode(e["commit"]["boc"]))
        signature = bytes.fromhex(e["commit"]["signature"])
    except (KeyError, TypeError, ValueError, SignedObjectError) as err:
        return f"epoch {n}: malformed commit ({err})"
    if not signature_valid(signature, cell_hash, vault.operator_key.to_bytes(32, "big")):
        return f"epoch {n}: the commit is not signed by the Vault's operator key"
    if commit.epoch != n or _raw(commit.vault) != vault_address:
        return f"epoch {n}: the commit names epoch {commit.epoch} of {_raw(commit.vault)}"
    if commit.root.hex() != str(e.get("root", "")).lower():
        return f"epoch {n}: the listed root is not the committed one"
    if n > vault.last_epoch:
        return f"epoch {n}: listed as committed, but the Vault's last epoch is {vault.last_epoch}"
    if n == vault.last_epoch and commit.root != vault.last_root:
        return f"epoch {n}: its root is not the one on-chain"
    return None


def _check_records(
    doc: dict[str, Any], n: int, root: bytes, provider: str, fee_bps: int, previous: int | None
) -> tuple[dict[str, Any] | None, list[str]]:
    """The cache entry of one epoch's records, or None and why not. ``previous`` is the
    cumulative of this provider's last leaf (None: unknown, an epoch before failed)."""
    try:
        leaf = ProviderLeaf.from_json({"kind": "provider", **doc["leaf"]})
        proof = [ProofStep.from_json(s) for s in doc.get("proof") or []]
        records = [JobRecord.from_json(r["record"]) for r in doc.get("records") or []]
    except (KeyError, TypeError, LedgerFormatError) as e:
        return None, [f"epoch {n}: malformed records ({e})"]
    problems = []
    if not isinstance(leaf, ProviderLeaf) or leaf.address != provider or leaf.epoch != n:
        problems.append(f"epoch {n}: the leaf is not this provider's for this epoch")
    if not verify_proof(leaf.hash(), proof, root):
        problems.append(f"epoch {n}: the provider leaf does not prove into the epoch's root")
    records.sort(key=lambda r: r.job_id)
    if merkle_root([r.hash() for r in records]) != leaf.sub_root:
        problems.append(f"epoch {n}: the records do not rebuild the leaf (some missing?)")
    if any(r.provider != provider for r in records):
        problems.append(f"epoch {n}: a record names another provider")
    net = sum(r.amount - fee_of(r.amount, fee_bps) for r in records)
    if net != leaf.amount:
        problems.append(
            f"epoch {n}: the records earn {net} after fees, the leaf says {leaf.amount}"
        )
    if previous is not None and leaf.cumulative != previous + leaf.amount:
        problems.append(
            f"epoch {n}: cumulative {leaf.cumulative} is not {previous} + {leaf.amount}"
        )
    if problems:
        return None, problems
    return {
        "root": root.hex(),
        "earned": str(leaf.amount),
        "cumulative": str(leaf.cumulative),
        "records": [
            [
                r.receipt_hash.hex(),
                r.job_id.hex(),
                r.prompt_tokens,
                r.completion_tokens,
                str(r.price_prompt),
                str(r.price_completion),
                str(r.amount),
            ]
            for r in records
        ],
    }, []


async def compute_earnings(
    *,
    client: ToncenterClient,
    session: aiohttp.ClientSession,
    matcher: str,
    provider: Address | str,
    node_key: Ed25519PrivateKey,
    state_dir: Path,
) -> Earnings:
    """Fetch, check and add up (see the module doc). Raises EarningsError."""
    p = _raw(provider)
    out = Earnings(p)
    ledger = _Ledger(session, matcher, p, node_key)
    try:
        listed = [e for e in await ledger.epochs() if e.get("state", "committed") == "committed"]
    except aiohttp.ClientError as e:
        raise EarningsError(f"the matcher at {matcher} is unreachable: {e}") from e
    claimer = Claimer(
        client=client,
        wallet=None,
        provider=p,
        matcher=matcher,
        state_dir=state_dir,
        session=session,
    )
    try:
        kept, refused = await claimer.review()
    except ClaimError as e:
        raise EarningsError(f"cannot read the payout voucher: {e}") from e
    if refused:
        out.issues.append(f"the matcher's payout voucher is refused: {refused}")
    vaults = sorted({_raw(str(e["vault"])) for e in listed if e.get("vault")})
    if len(vaults) > 1:
        out.issues.append(f"epochs of several vaults listed: {', '.join(vaults)}")
    out.vault = vaults[0] if vaults else next(iter(kept), None)
    if out.vault is None:  # nothing committed, no voucher: all that was served is pending
        _cross_check(out, [], state_dir, 0)
        return out
    vault = await getters.get_vault_data(client, out.vault)
    out.claimed = await getters.get_provider_claimed(client, p, Address(out.vault))
    if out.vault in kept:
        out.voucher, out.voucher_epoch = kept[out.vault].cumulative, kept[out.vault].epoch

    cache_path = state_dir / CACHE_FILE
    cache = _load_cache(cache_path, p)
    cached: dict[str, Any] = cache["epochs"]
    entries: list[tuple[int, dict[str, Any]]] = []
    previous: int | None = 0
    changed = False
    for e in sorted(listed, key=lambda e: int(e["epoch"])):
        n, root_hex = int(e["epoch"]), str(e.get("root", "")).lower()
        if _raw(str(e.get("vault"))) != out.vault:
            continue
        hit = cached.get(str(n))
        if hit is not None:  # checked before: a committed epoch never changes
            if hit["root"] != root_hex:
                out.issues.append(
                    f"epoch {n}: the matcher now lists another root than the one checked "
                    "before (the ledger was rewritten?)"
                )
            if "records" in hit:
                entries.append((n, hit))
                previous = int(hit["cumulative"])
            continue
        why = _check_commit(e, vault, out.vault)
        if why:
            out.issues.append(why)
            previous = None  # this provider's cumulative may have moved in it
            continue
        try:
            doc = await ledger.records(n)
        except aiohttp.ClientError as err:
            raise EarningsError(f"the matcher at {matcher} is unreachable: {err}") from err
        if doc is None:  # no leaf of this provider in this epoch
            cached[str(n)], changed = {"root": root_hex}, True
            continue
        entry, problems = _check_records(
            doc, n, bytes.fromhex(root_hex), p, vault.protocol_fee_bps, previous
        )
        if entry is None:
            out.issues.extend(problems)
            previous = None
            continue
        cached[str(n)], changed = entry, True
        entries.append((n, entry))
        previous = int(entry["cumulative"])
    if changed:
        state_dir.mkdir(parents=True, exist_ok=True)
        _save_cache(cache_path, p, cache)

    for n, entry in entries:
        cumulative, earned = int(entry["cumulative"]), int(entry["earned"])
        start = cumulative - earned
        row = EpochEarnings(n, earned=earned, committed=cumulative)
        for _, _, prompt, completion, _, _, amount in entry["records"]:
            row.jobs += 1
            row.prompt_tokens += prompt
            row.completion_tokens += completion
            row.gross += int(amount)
        row.claimed = max(0, min(cumulative, out.claimed) - start)
        row.claimable = max(0, min(cumulative, out.voucher) - max(start, out.claimed))
        out.epochs.append(row)
    records = [record for _, entry in entries for record in entry["records"]]
    _cross_check(out, records, state_dir, vault.protocol_fee_bps)
    return out


def _cross_check(out: Earnings, records: list[list[Any]], state_dir: Path, fee_bps: int) -> None:
    """Records against the receipt log; what the log holds beyond them is pending."""
    logged = {e.receipt_hash.hex(): e for e in read_receipt_log(state_dir / RECEIPT_LOG)}
    out.logged = len(logged)
    unknown = 0
    for receipt_hash, job_id, prompt, completion, pp, pc, amount in records:
        entry = logged.pop(receipt_hash, None)
        if entry is None:
            unknown += 1
            if unknown <= 20:
                out.issues.append(f"job {job_id[:16]}…: in the ledger, not in the receipt log")
            continue
        r = entry.receipt
        mine = (entry.job_id.hex(), r.prompt_tokens, r.completion_tokens)
        mine += (r.price_prompt, r.price_completion, r.amount)
        if mine != (job_id, prompt, completion, int(pp), int(pc), int(amount)):
            out.issues.append(f"job {job_id[:16]}…: the ledger's record differs from the receipt")
    if unknown > 20:
        out.issues.append(f"… {unknown} jobs in all are in the ledger, not in the receipt log")
    pending = [e.receipt for e in logged.values()]  # in no committed epoch yet
    out.pending_jobs = len(pending)
    out.pending_tokens = (
        sum(r.prompt_tokens for r in pending),
        sum(r.completion_tokens for r in pending),
    )
    out.pending_gross = sum(r.amount for r in pending)
    out.pending = sum(r.amount - fee_of(r.amount, fee_bps) for r in pending)
