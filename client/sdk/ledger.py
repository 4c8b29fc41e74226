"""The client's local spend ledger: cumulative spend per escrow, durable across restarts.

Spend vouchers are cumulative: each one authorises the vault to charge the escrow up
to ``cumulative`` in total. Two files keep it:

- a journal (``<state>.journal``), one JSON line per spend appended with a single
  ``write`` before the answer is handed to the caller (a few µs; it survives a crash of
  the process, as the page cache does);
- a snapshot (``<state>``), written atomically (temp file, fsync, rename) off the event
  loop by the voucher worker *before* it signs or posts a voucher for that cumulative.

At open the snapshot is loaded, the journal entries after it are replayed, and both are
compacted into a fresh snapshot. So a restart never signs a lower cumulative than one
already handed out, and never forgets a spend it recorded.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LedgerError", "SpendLedger"]

COMPACT_JOURNAL_BYTES = 8 * 1024 * 1024


class LedgerError(Exception):
    """A ledger file that is corrupt or belongs to another escrow."""


@dataclass
class SpendLedger:
    """``cumulative``: total the client has agreed to pay through this escrow.
    ``posted``: the highest cumulative the matcher acknowledged.
    ``pending_jobs``: ``[job id, amount]`` of spends not yet acknowledged: the voucher
    that covers them says what each job cost, so each nanoton lands on its own job.
    ``seq``: number of spends recorded (journal entries carry it)."""

    path: Path
    escrow: str
    vault: str
    cumulative: int = 0
    posted: int = 0
    pending_jobs: list[list] = field(default_factory=list)
    seq: int = 0
    _journal_fd: int = field(default=-1, repr=False)
    _journal_bytes: int = field(default=0, repr=False)
    _saved_seq: int = field(default=-1, repr=False)
    _save_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def journal_path(self) -> Path:
        return self.path.with_name(self.path.name + ".journal")

    @classmethod
    def open(cls, path: Path, escrow: str, vault: str) -> SpendLedger:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        ledger = cls(path=path, escrow=escrow, vault=vault)
        if path.exists():
            try:
                data = json.loads(path.read_text())
                ledger.escrow = str(data["escrow"])
                ledger.vault = str(data["vault"])
                ledger.cumulative = int(data["cumulative"])
                ledger.posted = int(data.get("posted", 0))
                ledger.pending_jobs = [
                    [str(job), int(amount)] for job, amount in data.get("pending_jobs", [])
                ]
                ledger.seq = int(data.get("seq", 0))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise LedgerError(f"spend ledger {path} is unreadable: {e}") from e
            if ledger.escrow != escrow or ledger.vault != vault:
                raise LedgerError(
                    f"spend ledger {path} is for escrow {ledger.escrow} / vault "
                    f"{ledger.vault}, not {escrow} / {vault}; use another state file"
                )
            if ledger.posted > ledger.cumulative or ledger.cumulative < 0:
                raise LedgerError(f"spend ledger {path} is inconsistent")
        ledger._replay_journal()
        ledger.save()  # compact: the snapshot now holds everything
        ledger._reset_journal()
        return ledger

    def _replay_journal(self) -> None:
        try:
            raw = self.journal_path.read_bytes()
        except FileNotFoundError:
            return
        for line in raw.split(b"\n"):
            if not line:
                continue
            try:
                entry = json.loads(line)
                seq, amount, job = int(entry["s"]), int(entry["a"]), str(entry["j"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a crash mid-write
            if seq > self.seq and amount >= 0:
                self.seq = seq
                self.cumulative += amount
                self.pending_jobs.append([job, amount])

    def _reset_journal(self) -> None:
        self.close()
        self._journal_fd = os.open(
            self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600
        )
        self._journal_bytes = 0

    def add(self, amount: int, job_id: str) -> int:
        """Record a spend of ``amount`` for ``job_id`` (journaled). Returns the cumulative."""
        if amount < 0:
            raise LedgerError("a spend is never negative")
        self.seq += 1
        line = json.dumps({"s": self.seq, "a": amount, "j": job_id}, separators=(",", ":"))
        data = (line + "\n").encode()
        os.write(self._journal_fd, data)  # one append: never interleaved, never torn mid-file
        self._journal_bytes += len(data)
        self.cumulative += amount
        self.pending_jobs.append([job_id, amount])
        if self._journal_bytes > COMPACT_JOURNAL_BYTES:
            self.save()
            self._reset_journal()
        return self.cumulative

    def acknowledge(self, cumulative: int, jobs: list[list]) -> None:
        """The matcher holds a voucher for ``cumulative`` covering ``jobs`` (persisted
        with the next snapshot; re-posting an acknowledged voucher is harmless)."""
        self.posted = max(self.posted, cumulative)
        done = {job for job, _ in jobs}
        self.pending_jobs = [j for j in self.pending_jobs if j[0] not in done]

    def snapshot(self) -> dict[str, Any]:
        return {
            "escrow": self.escrow,
            "vault": self.vault,
            "cumulative": self.cumulative,
            "posted": self.posted,
            "pending_jobs": [list(j) for j in self.pending_jobs],
            "seq": self.seq,
        }

    def save(self, data: dict[str, Any] | None = None) -> None:
        """Write a snapshot atomically (``data`` from ``snapshot()``, or the current
        state). Safe to run in a worker thread given a snapshot taken on the loop."""
        data = data if data is not None else self.snapshot()
        with self._save_lock:
            if data["seq"] < self._saved_seq:
                return  # a newer snapshot is already on disk
            tmp = self.path.with_name(f"{self.path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps(data, separators=(",", ":")).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            self._saved_seq = data["seq"]

    @property
    def is_open(self) -> bool:
        return self._journal_fd >= 0

    def close(self) -> None:
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
