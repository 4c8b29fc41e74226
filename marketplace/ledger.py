"""Durable metering: every database write goes through one writer in group commits.

Requests never open a session. They put an operation on a queue; one writer task
takes everything queued, applies it on a dedicated thread in ONE transaction and
resolves each operation's future when the transaction has committed. Under load the
queue fills while a commit runs, so commits batch themselves; at low load an
operation commits at once. No timer delays a lone write.

What is durable when (see docs/matcher.md):
- ``open_job`` returns only after the in-flight row committed; the relay contacts a
  node only then. The unique ``job_id`` makes a duplicate (from this or another
  replica) fail here, before any node sees it.
- ``close_job`` is queued when the END frame is forwarded and committed by the next
  group commit (milliseconds). A crash in that window leaves the row ``in_flight``;
  the next start marks it ``aborted_by_restart``.
- ``submit_voucher`` answers only after its commit; checks and write are one
  transaction holding a row lock on the escrow's voucher (PostgreSQL ``FOR UPDATE``;
  SQLite transactions are serialized by ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from marketplace.db import JobRecord, JobStatus, NodeRecord, SpendVoucherRecord, now_ms

__all__ = ["DuplicateJob", "Ledger", "LedgerError", "VoucherRejected", "VoucherUpdate"]

log = logging.getLogger(__name__)

JOBS = JobRecord.__table__
NODES = NodeRecord.__table__
VOUCHERS = SpendVoucherRecord.__table__
MAX_BATCH = 512
FAST_KINDS = frozenset({"open", "close", "node"})
CHECKPOINT_EVERY_COMMITS = 1000
CHECKPOINT_IDLE_S = 1.0
INLINE_BUSY_TIMEOUT_MS = 2
THREAD_BUSY_TIMEOUT_MS = 30_000


# A job in this state reached no node's output: it costs nothing.
UNSERVED = frozenset({JobStatus.FAILED_BEFORE_FIRST_BYTE})


class _Busy(Exception):
    """SQLite is locked by another connection; retry the batch on the writer thread."""


class LedgerError(RuntimeError):
    """The database could not record an operation."""


class DuplicateJob(LedgerError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job id {job_id} was already relayed")
        self.job_id = job_id


class VoucherRejected(LedgerError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class VoucherUpdate:
    """A spend voucher whose signature already verified."""

    escrow: str
    vault: str
    spend_public: str
    cumulative: int
    voucher_boc: str
    signature: str
    jobs: dict[str, int]  # job id -> what the client pays for it


def _unawaited(future: asyncio.Future) -> asyncio.Future:
    """Callers may ignore this future: its failure is logged by the writer already."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


@dataclass
class _Op:
    kind: str  # "open", "close", "node", "voucher", "call"
    payload: Any
    future: asyncio.Future | None


class Ledger:
    def __init__(self, engine: Engine, instance: str) -> None:
        self.engine = engine
        self.instance = instance
        self.counts: Counter[str] = Counter()  # jobs by status, as the DB will hold them
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="imago-ledger")
        self._task: asyncio.Task | None = None
        self._insert = (postgresql if engine.dialect.name == "postgresql" else sqlite).insert
        self.commits = 0
        self._sql_cache: dict[tuple, tuple[str, tuple | None]] = {}
        self._raw = None  # the writer's DBAPI connection
        self._inline = engine.dialect.name == "sqlite"
        self._busy_ms = 0
        self._checkpointed = 0
        self._checkpoint_at = time.monotonic()
        self._checkpoint_executor = ThreadPoolExecutor(1, thread_name_prefix="imago-wal")
        self._checkpoint_future: asyncio.Future | None = None
        self._checkpoint_raw = None

    # --- lifetime ---------------------------------------------------------------------

    async def start(self) -> int:
        """Fail jobs a previous run of this instance left in flight; load the counters.
        Returns how many jobs were aborted."""
        loop = asyncio.get_running_loop()
        aborted, counts = await loop.run_in_executor(self._executor, self._recover)
        self.counts = counts
        self._task = asyncio.create_task(self._writer(), name="imago-ledger-writer")
        return aborted

    async def stop(self) -> None:
        """Commit everything queued, then stop the writer."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        loop = asyncio.get_running_loop()
        if self._checkpoint_future is not None:
            await self._checkpoint_future
        await loop.run_in_executor(self._checkpoint_executor, self._close_checkpointer)
        self._checkpoint_executor.shutdown(wait=True)
        await loop.run_in_executor(self._executor, self._close_raw)
        self._executor.shutdown(wait=True)

    def _recover(self) -> tuple[int, Counter[str]]:
        with self.engine.begin() as conn:
            aborted = conn.execute(
                update(JOBS)
                .where(JOBS.c.status == JobStatus.IN_FLIGHT, JOBS.c.instance == self.instance)
                .values(
                    status=JobStatus.ABORTED_BY_RESTART,
                    error="the matcher stopped while the job was in flight",
                    finished_at=now_ms(),
                )
            ).rowcount
            rows = conn.execute(select(JOBS.c.status, func.count()).group_by(JOBS.c.status))
            counts = Counter({status: n for status, n in rows})
        if aborted:
            log.warning("marked %d jobs of a previous run aborted_by_restart", aborted)
        return aborted, counts

    # --- operations -------------------------------------------------------------------

    async def open_job(self, row: dict) -> None:
        """Durably record a job in flight. Raises DuplicateJob if its id exists."""
        row = {
            "instance": self.instance,
            "status": JobStatus.IN_FLIGHT,
            "created_at": now_ms(),
            **row,
        }
        if self._task is None:
            raise LedgerError("the ledger is not running")
        future = self._enqueue("open", row)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            # The caller left (a client disconnect) but the row still commits: fail it
            # right behind, so that nothing stays in flight.
            future.add_done_callback(lambda f: self._abandoned(row["job_id"], f))
            raise
        self.counts[JobStatus.IN_FLIGHT] += 1

    def _abandoned(self, job_id: str, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self.counts[JobStatus.IN_FLIGHT] += 1
        self.close_job(
            job_id,
            JobStatus.FAILED_BEFORE_FIRST_BYTE,
            error="client disconnected before the first byte",
        )

    def close_job(self, job_id: str, status: JobStatus, **fields: Any) -> asyncio.Future:
        """Queue the final state of a job; the future resolves once committed."""
        self.counts[JobStatus.IN_FLIGHT] -= 1
        self.counts[status] += 1
        fields.update(job_id=job_id, status=status, finished_at=now_ms())
        return _unawaited(self._enqueue("close", fields))

    def assign_node(self, job_id: str, node_id: str) -> asyncio.Future:
        """Name the node a job in flight goes to next (failover): if the matcher dies
        while that node streams, the client's voucher still credits the right node."""
        return _unawaited(self._enqueue("close", {"job_id": job_id, "node_id": node_id}))

    def save_node(self, fields: dict) -> asyncio.Future:
        return _unawaited(self._enqueue("node", {**fields, "updated_at": now_ms()}))

    async def submit_voucher(self, voucher: VoucherUpdate) -> dict:
        return await self._submit("voucher", voucher)

    async def call(self, fn: Callable[[Connection], Any]) -> Any:
        """Run ``fn(connection)`` in the writer's order and transaction (reads, tests)."""
        return await self._submit("call", fn)

    def _enqueue(self, kind: str, payload: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(kind, payload, future))
        return future

    async def _submit(self, kind: str, payload: Any) -> Any:
        if self._task is None:
            raise LedgerError("the ledger is not running")
        return await self._enqueue(kind, payload)

    # --- the writer -------------------------------------------------------------------

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                if self._inline and all(op.kind in FAST_KINDS for op in batch):
                    # A local SQLite commit (WAL, no checkpoint) takes tens of µs:
                    # cheaper on the loop than two thread hand-offs.
                    try:
                        results = self._apply(batch, inline=True)
                    except _Busy:  # another connection holds the lock: wait off the loop
                        results = await loop.run_in_executor(self._executor, self._apply, batch)
                else:
                    results = await loop.run_in_executor(self._executor, self._apply, batch)
            except Exception as e:  # the whole transaction failed
                log.exception("ledger commit of %d operations failed", len(batch))
                results = [LedgerError(f"database error: {e}")] * len(batch)
            self.commits += 1
            for op, result in zip(batch, results, strict=True):
                if op.future is not None and not op.future.done():
                    if isinstance(result, BaseException):
                        op.future.set_exception(result)
                    else:
                        op.future.set_result(result)
                self._queue.task_done()
            if self._inline and (
                self.commits - self._checkpointed >= CHECKPOINT_EVERY_COMMITS
                or (self._queue.empty() and self.commits > self._checkpointed)
                and time.monotonic() - self._checkpoint_at > CHECKPOINT_IDLE_S
            ):
                self._start_checkpoint(loop)

    def _apply(self, batch: list[_Op], inline: bool = False) -> list[Any]:
        """One group commit. Job and node rows go through a raw DBAPI connection with
        statements compiled once (the hot path); vouchers and calls, rare, through
        SQLAlchemy Core in a second transaction right after, in queue order."""
        results: list[Any] = [None] * len(batch)
        fast = [(i, op) for i, op in enumerate(batch) if op.kind in FAST_KINDS]
        slow = [(i, op) for i, op in enumerate(batch) if op.kind in ("voucher", "call")]
        if fast:
            self._apply_fast(fast, results, inline)
        if slow:
            with self.engine.begin() as conn:
                for i, op in slow:
                    try:
                        if op.kind == "voucher":
                            results[i] = self._apply_voucher(conn, op.payload)
                        else:
                            with conn.begin_nested():
                                results[i] = op.payload(conn)
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        results[i] = e
        return results

    # --- the hot path: raw DBAPI, compiled statements ----------------------------------

    def _sql(self, key: tuple, build: Callable[[], Any]) -> tuple[str, tuple | None]:
        cached = self._sql_cache.get(key)
        if cached is None:
            compiled = build().compile(dialect=self.engine.dialect)
            order = tuple(compiled.positiontup) if compiled.positional else None
            cached = self._sql_cache[key] = (compiled.string, order)
        return cached

    @staticmethod
    def _with_defaults(table, row: dict) -> dict:
        """Column defaults for what ``row`` leaves out (SQLAlchemy would add them)."""
        out = dict(row)
        for column in table.columns:
            if column.name not in out and column.default is not None and column.default.is_scalar:
                out[column.name] = column.default.arg
        return out

    @staticmethod
    def _bind(order: tuple | None, params: dict) -> Any:
        clean = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in params.items()}
        return [clean[k] for k in order] if order is not None else clean

    def _raw_connection(self):
        if self._raw is None:
            self._raw = self.engine.raw_connection()
            if self._inline:
                cursor = self._raw.cursor()
                cursor.execute("PRAGMA wal_autocheckpoint=0")  # see _checkpoint
                cursor.close()
        return self._raw

    def _start_checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fold the WAL into the database on its own thread and connection, while the
        writer goes on (a PASSIVE checkpoint takes no write lock); one at a time."""
        if self._checkpoint_future is not None and not self._checkpoint_future.done():
            return
        self._checkpointed = self.commits
        self._checkpoint_at = time.monotonic()
        self._checkpoint_future = loop.run_in_executor(self._checkpoint_executor, self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            if self._checkpoint_raw is None:
                self._checkpoint_raw = self.engine.raw_connection()
            cursor = self._checkpoint_raw.cursor()
            cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
            cursor.close()
        except Exception:  # the next one retries; the WAL only grows meanwhile
            log.exception("WAL checkpoint failed")

    def _close_checkpointer(self) -> None:
        if self._checkpoint_raw is not None:
            with contextlib.suppress(Exception):
                self._checkpoint_raw.close()
            self._checkpoint_raw = None

    def _close_raw(self) -> None:
        self._busy_ms = 0
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.invalidate() if hasattr(self._raw, "invalidate") else None
            with contextlib.suppress(Exception):
                self._raw.close()
            self._raw = None

    def _apply_fast(self, ops: list[tuple[int, _Op]], results: list[Any], inline: bool) -> None:
        raw = self._raw_connection()
        sqlite_db = self.engine.dialect.name == "sqlite"
        if sqlite_db:
            # On the loop, never wait for a lock: hand the batch to the thread instead.
            busy_ms = INLINE_BUSY_TIMEOUT_MS if inline else THREAD_BUSY_TIMEOUT_MS
            cur = raw.cursor()
            if self._busy_ms != busy_ms:
                cur.execute(f"PRAGMA busy_timeout={busy_ms}")
                self._busy_ms = busy_ms
            try:
                cur.execute("BEGIN IMMEDIATE")
            except Exception as e:
                cur.close()
                if inline and ("locked" in str(e) or "busy" in str(e)):
                    raise _Busy from e
                self._close_raw()
                raise
        try:
            if not sqlite_db:
                cur = raw.cursor()
            seen: set[str] = set()
            for i, op in ops:
                if op.kind == "open":
                    job_id = op.payload["job_id"]
                    if job_id in seen or not self._insert_job(cur, op.payload):
                        results[i] = DuplicateJob(job_id)
                    seen.add(job_id)
                elif op.kind == "close":
                    self._update_job(cur, op.payload)
                else:
                    self._upsert_node(cur, op.payload)
            if sqlite_db:
                cur.execute("COMMIT")
            else:
                raw.commit()
            cur.close()
        except Exception:
            with contextlib.suppress(Exception):
                if sqlite_db:
                    raw.cursor().execute("ROLLBACK")
                else:
                    raw.rollback()
            self._close_raw()
            raise

    def _insert_job(self, cur, row: dict) -> bool:
        row = self._with_defaults(JOBS, row)
        cols = tuple(sorted(row))
        sql, order = self._sql(
            ("open", cols),
            lambda: (
                self._insert(JOBS)
                .values({c: bindparam(c) for c in cols})
                .on_conflict_do_nothing(index_elements=["job_id"])
                .returning(JOBS.c.job_id)
            ),
        )
        cur.execute(sql, self._bind(order, row))
        return cur.fetchone() is not None

    def _update_job(self, cur, fields: dict) -> None:
        cols = tuple(sorted(k for k in fields if k != "job_id"))
        sql, order = self._sql(
            ("close", cols),
            lambda: (
                update(JOBS)
                .where(JOBS.c.job_id == bindparam("b_job_id"), JOBS.c.status == bindparam("b_from"))
                .values({c: bindparam(c) for c in cols})
            ),
        )
        params = {k: fields[k] for k in cols}
        params.update(b_job_id=fields["job_id"], b_from=JobStatus.IN_FLIGHT.value)
        cur.execute(sql, self._bind(order, params))

    def _upsert_node(self, cur, fields: dict) -> None:
        given = tuple(sorted(fields))
        fields = self._with_defaults(NODES, fields)
        cols = tuple(sorted(fields))

        def build():
            stmt = self._insert(NODES).values({c: bindparam(c) for c in cols})
            return stmt.on_conflict_do_update(
                index_elements=["node_id"],
                set_={c: stmt.excluded[c] for c in given if c != "node_id"},
            )

        sql, order = self._sql(("node", given, cols), build)
        cur.execute(sql, self._bind(order, fields))

    # --- vouchers ----------------------------------------------------------------------

    def _apply_voucher(self, conn: Connection, v: VoucherUpdate) -> dict:
        try:
            with conn.begin_nested():
                return self._voucher_txn(conn, v)
        except IntegrityError as e:  # another replica inserted this escrow's first voucher
            raise VoucherRejected(409, "voucher_conflict", "a concurrent voucher won") from e

    def _voucher_txn(self, conn: Connection, v: VoucherUpdate) -> dict:
        current = conn.execute(
            select(VOUCHERS).where(VOUCHERS.c.escrow == v.escrow).with_for_update()
        ).first()
        previous = 0
        if current is not None:
            if current.spend_public != v.spend_public:
                raise VoucherRejected(
                    403, "wrong_spend_key", "the escrow's vouchers are signed by another key"
                )
            if current.vault != v.vault:
                raise VoucherRejected(400, "wrong_vault", "the voucher names another vault")
            previous = int(current.cumulative)
            if v.cumulative <= previous:
                raise VoucherRejected(
                    409,
                    "voucher_not_increasing",
                    f"cumulative {v.cumulative} is not above the stored {previous}",
                )
        jobs = []
        if v.jobs:
            jobs = conn.execute(
                select(
                    JOBS.c.job_id,
                    JOBS.c.escrow,
                    JOBS.c.status,
                    JOBS.c.amount,
                    JOBS.c.node_id,
                    JOBS.c.voucher_cumulative,
                )
                .where(JOBS.c.job_id.in_(list(v.jobs)))
                .with_for_update()
            ).all()
        found = {job.job_id: job for job in jobs}
        for job_id in v.jobs:
            job = found.get(job_id)
            if job is None:
                raise VoucherRejected(404, "unknown_job", f"job {job_id} is not known")
            if job.escrow != v.escrow:
                raise VoucherRejected(400, "wrong_escrow", f"job {job_id} is for another escrow")
        # A job an earlier voucher already covers stays linked to it: a client whose
        # acknowledgement got lost lists it again with its next, higher voucher. One
        # covered by a voucher at or above this one means a concurrent post won.
        if any(int(j.voucher_cumulative or 0) >= v.cumulative for j in jobs):
            raise VoucherRejected(409, "voucher_conflict", "a concurrent voucher won")
        jobs = [job for job in jobs if job.voucher_cumulative is None]
        # Every nanoton the voucher adds lands on exactly one job: a completed job costs
        # what its receipt says; a job cut short (mid-stream, or a matcher that stopped)
        # costs what the client says it received, which the matcher cannot read.
        amounts: dict[str, int] = {}
        for job in jobs:
            stated = v.jobs[job.job_id]
            if job.status == JobStatus.COMPLETED and stated != int(job.amount):
                raise VoucherRejected(
                    400, "amount_mismatch",
                    f"job {job.job_id} has a receipt for {int(job.amount)} nanoTON, "
                    f"not {stated}",
                )  # fmt: skip
            if stated and (job.node_id is None or job.status in UNSERVED):
                raise VoucherRejected(
                    400, "amount_mismatch", f"job {job.job_id} was not served: it costs 0"
                )
            amounts[job.job_id] = stated
        delta = v.cumulative - previous
        if delta != sum(amounts.values()):
            raise VoucherRejected(
                402 if delta < sum(amounts.values()) else 400,
                "voucher_below_receipts"
                if delta < sum(amounts.values())
                else "voucher_unexplained",
                f"the voucher adds {delta} nanoTON but its jobs total {sum(amounts.values())}",
            )
        now = now_ms()
        for job in jobs:
            conn.execute(
                update(JOBS)
                .where(JOBS.c.job_id == job.job_id)
                .values(voucher_cumulative=v.cumulative, amount=amounts[job.job_id])
            )
        row = {
            "vault": v.vault,
            "spend_public": v.spend_public,
            "cumulative": v.cumulative,
            "voucher_boc": v.voucher_boc,
            "signature": v.signature,
            "updated_at": now,
        }
        if current is None:
            conn.execute(VOUCHERS.insert().values(escrow=v.escrow, **row))
        else:
            conn.execute(update(VOUCHERS).where(VOUCHERS.c.escrow == v.escrow).values(row))
        return {"escrow": v.escrow, "cumulative": v.cumulative, "previous": previous}
