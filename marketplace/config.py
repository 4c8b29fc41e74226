"""The matcher's configuration: one frozen value passed to ``create_app``."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from contracts.chain.allowlists import ALLOWLIST_TTL_S
from protocol.attestation import AttestationPolicy
from protocol.home import TICKET_KEY, matcher_dir

__all__ = ["MatcherConfig", "SettlementConfig"]

TON = 1_000_000_000


@dataclass(frozen=True)
class SettlementConfig:
    """How the matcher settles: the trade-off between fees and latency (the README's
    "How money moves" gives the figures).

    ``charge_threshold``: an Escrow is charged once this much of what it owes is
    committed and uncharged (a charge costs about 0.009 TON, its wallet's share in:
    40 TON keeps charges at 0.02% of what they move); a closing Escrow is charged at
    once, whatever it owes.
    ``epoch_s``: one commit per epoch with jobs in it; payout vouchers follow each
    commit, so a provider waits at least this long to be paid.
    The operator's key signs commits and payout vouchers; its wallet pays the fees.
    """

    operator_wallet: Path
    operator_key: Path
    passphrase: str | None = field(default=None, repr=False)
    epoch_s: float = 3600.0
    charge_threshold: int = 40 * TON
    tick_s: float = 10.0
    escrow_poll_s: float = 300.0
    lease_s: float = 60.0
    retry_min_s: float = 5.0
    retry_max_s: float = 600.0


@dataclass(frozen=True)
class MatcherConfig:
    """Everything the matcher needs; every field has a loopback-friendly default.

    ``database_url`` None means SQLite at ``state_dir/matcher.db``. ``instance`` names
    this matcher process in the jobs table, so that a restarted replica fails only its
    own in-flight jobs when several replicas share one PostgreSQL database.
    """

    state_dir: Path = field(default_factory=matcher_dir)
    database_url: str | None = None
    devnet: bool = False
    allowed_mr_td: frozenset[bytes] = frozenset()
    accepted_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    instance: str = field(default_factory=lambda: f"matcher@{socket.gethostname()}")
    vault: str | None = None  # the operator's Vault address; vouchers must name it
    # the network vouchers and receipts must name (config param 19); None: the devnet's
    # with devnet, else the chain's (read at start from chain_url); with neither the
    # matcher refuses to start
    global_id: int | None = None
    chain_url: str | None = None  # toncenter v2 API: check each escrow's spend key on-chain
    # with chain_url: admit only nodes a staked Provider backs, running an image and
    # offering models the Registry's allowlists hold (each answer kept allowlist_ttl_s)
    registry: str | None = None
    allowlist_ttl_s: float = ALLOWLIST_TTL_S
    sqlite_synchronous: str = "NORMAL"  # FULL: a commit also survives a power cut
    attestation_now: int | None = None  # pin the attestation clock (tests only)
    # node admission and monitoring
    reattest_interval_s: float = 600.0
    status_interval_s: float = 3.0
    node_timeout_s: float = 5.0  # identity, status, attest calls
    # relay
    connect_timeout_s: float = 3.0
    first_byte_timeout_s: float = 120.0  # a node must accept (answer headers) within this
    # and then never pause longer than this: a non-streaming answer comes whole, so this
    # bounds its generation (OpenAI's own clients wait 600 s)
    read_timeout_s: float = 600.0
    route_ttl_s: float = 10.0
    max_relay_body_bytes: int = 32 * 1024 * 1024
    ticket_key: Path | None = None  # keystore of the ticket key; None: in state_dir
    settlement: SettlementConfig | None = None  # None: this matcher does not settle

    @property
    def ticket_key_path(self) -> Path:
        return Path(self.ticket_key or Path(self.state_dir) / TICKET_KEY).expanduser()

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.state_dir).expanduser() / 'matcher.db'}"

    @property
    def reads_allowlists(self) -> bool:
        return self.chain_url is not None and self.registry is not None

    @property
    def attestation_policy(self) -> AttestationPolicy:
        # With a Registry its image allowlist is the authority for TDX measurements
        # (the registry checks it after verification); --allow-mr-td, if given, narrows
        # it further. Without one, an empty --allow-mr-td accepts no TD at all.
        checked_on_chain = self.reads_allowlists and not self.allowed_mr_td
        return AttestationPolicy(
            allow_dev=self.devnet,
            allowed_measurements=None if checked_on_chain else self.allowed_mr_td,
            accepted_tcb_statuses=self.accepted_tcb_statuses,
            now=self.attestation_now,
        )
