"""The matcher's durable records (SQLModel): nodes, jobs, spend vouchers and settlement.

SQLite by default (WAL), any PostgreSQL URL unchanged. Only ``Ledger`` (ledger.py)
writes; it runs every statement on one writer thread in group commits.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path

from sqlalchemy import BigInteger, Column, Engine, Index, Numeric, event
from sqlmodel import Field, SQLModel, create_engine

__all__ = [
    "AccountRecord",
    "ChargeRecord",
    "EpochRecord",
    "JobRecord",
    "LeafRecord",
    "LeaseRecord",
    "PayoutRecord",
    "JobStatus",
    "NodeRecord",
    "SpendVoucherRecord",
    "make_engine",
    "read_connection",
    "now_ms",
]


class JobStatus(enum.StrEnum):
    IN_FLIGHT = "in_flight"
    COMPLETED = "completed"
    FAILED_BEFORE_FIRST_BYTE = "failed_before_first_byte"
    FAILED_MIDSTREAM = "failed_midstream"
    ABORTED_BY_RESTART = "aborted_by_restart"
    ERRORED = "errored"


def now_ms() -> int:
    return int(time.time() * 1000)


def _coins() -> Column:
    # Coins go up to 2**120 nanoTON: NUMERIC(40) holds any of them on both backends.
    return Column(Numeric(40, 0, asdecimal=False), nullable=False, default=0)


class NodeRecord(SQLModel, table=True):
    """A node the matcher attested (or refused), as last seen."""

    __tablename__ = "nodes"

    node_id: str = Field(primary_key=True, max_length=64)  # hex ed25519 key
    url: str
    x25519_public: str = Field(max_length=64)
    attestation_kind: str = Field(max_length=8)
    measurement: str = ""  # hex mr_td (or the dev measurement)
    tcb_status: str = ""
    state: str = Field(default="admitted", max_length=16)  # admitted / rejected / unhealthy
    reason: str = ""
    models: str = "[]"  # JSON list of ModelOffer
    provider: str | None = None  # the Provider contract backing it (raw address)
    admitted_at: int = Field(default=0, sa_type=BigInteger)
    attested_at: int = Field(default=0, sa_type=BigInteger)
    updated_at: int = Field(default=0, sa_type=BigInteger)


class JobRecord(SQLModel, table=True):
    """One relayed job. ``job_id`` is unique: a second relay of one id is refused."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_instance", "status", "instance"),
        Index("ix_jobs_escrow", "escrow"),
        Index("ix_jobs_epoch", "epoch"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(unique=True, max_length=64)
    instance: str = Field(max_length=64)  # the matcher run that relayed it
    model: str
    escrow: str
    node_id: str | None = Field(default=None, max_length=64)  # the node that served it
    failed_nodes: str = ""  # comma-separated node ids that failed before the first byte
    status: str = Field(default=JobStatus.IN_FLIGHT, max_length=32)
    error: str = ""
    request_bytes: int = Field(default=0, sa_type=BigInteger)
    response_bytes: int = Field(default=0, sa_type=BigInteger)
    prompt_tokens: int = Field(default=0, sa_type=BigInteger)
    completion_tokens: int = Field(default=0, sa_type=BigInteger)
    amount: int = Field(default=0, sa_column=_coins())
    receipt_boc: str | None = None  # base64
    receipt_signature: str | None = Field(default=None, max_length=128)
    ttft_ms: float | None = None
    duration_ms: float | None = None
    voucher_cumulative: int | None = Field(
        default=None, sa_column=Column(Numeric(40, 0, asdecimal=False), nullable=True)
    )
    created_at: int = Field(default=0, sa_type=BigInteger)
    finished_at: int | None = Field(default=None, sa_type=BigInteger)
    # settlement: the epoch whose ledger holds the job, its record's salt (hex) and the
    # Provider credited (as it was when the epoch was built)
    epoch: int | None = Field(default=None, sa_type=BigInteger)
    salt: str | None = Field(default=None, max_length=64)
    provider: str | None = None


class SpendVoucherRecord(SQLModel, table=True):
    """The latest spend voucher per escrow (cumulative only rises)."""

    __tablename__ = "spend_vouchers"

    escrow: str = Field(primary_key=True)  # raw form "0:<hex>"
    vault: str
    spend_public: str = Field(max_length=64)
    cumulative: int = Field(default=0, sa_column=_coins())
    voucher_boc: str
    signature: str = Field(max_length=128)
    updated_at: int = Field(default=0, sa_type=BigInteger)


class EpochRecord(SQLModel, table=True):
    """One epoch of the ledger: built (leaves written, commit signed), then committed
    once the Vault holds its root. Totals are cumulative over all epochs, as committed."""

    __tablename__ = "epochs"

    epoch: int = Field(primary_key=True, sa_type=BigInteger)
    vault: str
    state: str = Field(default="built", max_length=16)  # built / committed
    root: str = Field(max_length=64)
    charged: int = Field(default=0, sa_column=_coins())
    paid: int = Field(default=0, sa_column=_coins())
    fees: int = Field(default=0, sa_column=_coins())
    epoch_charged: int = Field(default=0, sa_column=_coins())
    epoch_earned: int = Field(default=0, sa_column=_coins())
    leaves: int = 0
    commit_boc: str = ""  # base64 of the signed EpochCommit cell
    commit_signature: str = Field(default="", max_length=128)
    tx_hash: str | None = Field(default=None, max_length=64)
    built_at: int = Field(default=0, sa_type=BigInteger)
    committed_at: int | None = Field(default=None, sa_type=BigInteger)


class LeafRecord(SQLModel, table=True):
    """A public aggregate leaf of an epoch (``protocol.ledger``). An escrow leaf keeps
    the client's voucher for its cumulative: the one the matcher charges with."""

    __tablename__ = "epoch_leaves"
    __table_args__ = (Index("ix_leaves_address", "kind", "address", "epoch"),)

    epoch: int = Field(primary_key=True, sa_type=BigInteger)
    idx: int = Field(primary_key=True)
    kind: str = Field(max_length=8)  # escrow / provider
    address: str
    amount: int = Field(default=0, sa_column=_coins())
    cumulative: int = Field(default=0, sa_column=_coins())
    sub_root: str = Field(max_length=64)
    voucher_boc: str | None = None
    voucher_signature: str | None = Field(default=None, max_length=128)


class AccountRecord(SQLModel, table=True):
    """The running cumulative of an escrow (charged) or a provider (earned) up to the
    last built epoch: the next leaf starts from it."""

    __tablename__ = "ledger_accounts"

    kind: str = Field(primary_key=True, max_length=8)
    address: str = Field(primary_key=True)
    cumulative: int = Field(default=0, sa_column=_coins())
    last_epoch: int = Field(default=0, sa_type=BigInteger)


class PayoutRecord(SQLModel, table=True):
    """An operator-signed payout voucher of one provider for one epoch; published only
    once that epoch is committed (invariant 6)."""

    __tablename__ = "payout_vouchers"

    provider: str = Field(primary_key=True)
    epoch: int = Field(primary_key=True, sa_type=BigInteger)
    cumulative: int = Field(default=0, sa_column=_coins())
    voucher_boc: str
    signature: str = Field(max_length=128)


class ChargeRecord(SQLModel, table=True):
    """What the matcher knows of an escrow on-chain and its last charge attempt."""

    __tablename__ = "charges"

    escrow: str = Field(primary_key=True)
    charged: int = Field(default=0, sa_column=_coins())  # on-chain, as last read
    state: str = Field(default="open", max_length=16)  # the Escrow's state as last read
    unlock_time: int = Field(default=0, sa_type=BigInteger)
    submitted: int = Field(default=0, sa_column=_coins())  # cumulative of the last charge sent
    tx_hash: str | None = Field(default=None, max_length=64)
    failures: int = 0
    retry_at: int = Field(default=0, sa_type=BigInteger)
    checked_at: int = Field(default=0, sa_type=BigInteger)


class LeaseRecord(SQLModel, table=True):
    """A named lease (the settlement leader among matcher replicas)."""

    __tablename__ = "leases"

    name: str = Field(primary_key=True, max_length=32)
    holder: str = Field(max_length=64)
    expires_at: int = Field(default=0, sa_type=BigInteger)


TABLES = [
    NodeRecord.__table__,
    JobRecord.__table__,
    SpendVoucherRecord.__table__,
    EpochRecord.__table__,
    LeafRecord.__table__,
    AccountRecord.__table__,
    PayoutRecord.__table__,
    ChargeRecord.__table__,
    LeaseRecord.__table__,
]


def _add_missing_columns(engine: Engine) -> None:
    """Databases of earlier versions lack the settlement columns: add them (nullable, or
    with their default), so that a matcher upgrade keeps its jobs and vouchers."""
    from sqlalchemy import inspect, text

    inspector = inspect(engine)
    missing = [
        (table.name, column)
        for table in (NodeRecord.__table__, JobRecord.__table__)
        for column in table.columns
        if column.name not in {c["name"] for c in inspector.get_columns(table.name)}
    ]
    if missing:
        with engine.begin() as conn:
            for table_name, column in missing:
                kind = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f"ALTER TABLE {table_name} ADD COLUMN {column.name} {kind}"))
            conn.execute(text("CREATE INDEX IF NOT EXISTS ix_jobs_epoch ON jobs (epoch)"))


def read_connection(engine: Engine):
    """A connection for reads only, beside the ledger's writer (a snapshot, no lock)."""
    return engine.connect().execution_options(read_only=True)


def make_engine(url: str, *, sqlite_synchronous: str = "NORMAL") -> Engine:
    """One engine per app. SQLite: WAL, busy timeout, explicit BEGIN IMMEDIATE."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:  # pragma: no cover - trivial
            # A reader (``read_only``) takes a snapshot and no lock: it never makes the
            # ledger's writer wait; a writer takes the write lock at once.
            read_only = conn.get_execution_options().get("read_only")
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    else:
        engine = create_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=True)
    SQLModel.metadata.create_all(engine, tables=TABLES)
    _add_missing_columns(engine)
    return engine
