"""The matcher's durable records (SQLModel): nodes, jobs and spend vouchers.

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
    "JobRecord",
    "JobStatus",
    "NodeRecord",
    "SpendVoucherRecord",
    "make_engine",
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
    admitted_at: int = Field(default=0, sa_type=BigInteger)
    attested_at: int = Field(default=0, sa_type=BigInteger)
    updated_at: int = Field(default=0, sa_type=BigInteger)


class JobRecord(SQLModel, table=True):
    """One relayed job. ``job_id`` is unique: a second relay of one id is refused."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_instance", "status", "instance"),
        Index("ix_jobs_escrow", "escrow"),
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


TABLES = [NodeRecord.__table__, JobRecord.__table__, SpendVoucherRecord.__table__]


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
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    else:
        engine = create_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=True)
    SQLModel.metadata.create_all(engine, tables=TABLES)
    return engine
