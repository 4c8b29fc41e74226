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

The package, one concern a module: ``report`` (findings and the report), ``epochs``
(published epochs, their commits, leaves, totals and cumulatives), ``accounts`` (payout
vouchers, claims, charges), ``records`` (a party's records and its receipt log),
``source`` (:class:`AuditSource`, :class:`LiveSource`), ``run`` (:func:`run_audit`) and
``common`` (errors and the JSON-reading helpers they share).
"""

from client.audit.accounts import check_escrow_account, check_payout, check_provider_account
from client.audit.common import AuditError, SourceError
from client.audit.epochs import (
    CommitHistory,
    LeafChain,
    OnChainCommit,
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
from client.audit.records import LoggedReceipt, check_receipts, check_records, load_receipt_log
from client.audit.report import Finding, Report
from client.audit.run import Party, run_audit
from client.audit.source import AuditSource, LiveSource

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
