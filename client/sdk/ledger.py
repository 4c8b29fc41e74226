"""The client's local spend ledger: cumulative spend per escrow, durable across restarts.

Spend vouchers are cumulative: each one authorises the vault to charge the escrow up
to ``cumulative`` in total. The ledger persists the new cumulative (atomic replace,
fsync) before any voucher for it is signed or posted, so a restart never signs a
lower cumulative than one already handed out, and never forgets what it owes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LedgerError", "SpendLedger"]


class LedgerError(Exception):
    """A ledger file that is corrupt or belongs to another escrow."""


@dataclass
class SpendLedger:
    """``cumulative``: total the client has agreed to pay through this escrow.
    ``posted``: the highest cumulative the matcher acknowledged.
    ``pending_jobs``: job ids paid for but not yet acknowledged."""

    path: Path
    escrow: str
    vault: str
    cumulative: int = 0
    posted: int = 0
    pending_jobs: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, escrow: str, vault: str) -> SpendLedger:
        path = Path(path)
        if not path.exists():
            ledger = cls(path=path, escrow=escrow, vault=vault)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            ledger.save()
            return ledger
        try:
            data = json.loads(path.read_text())
            ledger = cls(
                path=path,
                escrow=str(data["escrow"]),
                vault=str(data["vault"]),
                cumulative=int(data["cumulative"]),
                posted=int(data.get("posted", 0)),
                pending_jobs=[str(j) for j in data.get("pending_jobs", [])],
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LedgerError(f"spend ledger {path} is unreadable: {e}") from e
        if ledger.escrow != escrow or ledger.vault != vault:
            raise LedgerError(
                f"spend ledger {path} is for escrow {ledger.escrow} / vault {ledger.vault}, "
                f"not {escrow} / {vault}; use another state file"
            )
        if ledger.posted > ledger.cumulative or ledger.cumulative < 0:
            raise LedgerError(f"spend ledger {path} is inconsistent")
        return ledger

    def add(self, amount: int, job_id: str) -> int:
        """Raise the cumulative by ``amount`` for ``job_id`` and persist it. Returns it."""
        if amount < 0:
            raise LedgerError("a spend is never negative")
        self.cumulative += amount
        self.pending_jobs.append(job_id)
        self.save()
        return self.cumulative

    def acknowledge(self, cumulative: int, job_ids: list[str]) -> None:
        """The matcher holds a voucher for ``cumulative`` covering ``job_ids`` (not saved:
        re-posting an acknowledged voucher is harmless; the next ``add`` persists it)."""
        self.posted = max(self.posted, cumulative)
        done = set(job_ids)
        self.pending_jobs = [j for j in self.pending_jobs if j not in done]

    def save(self) -> None:
        data = {
            "escrow": self.escrow,
            "vault": self.vault,
            "cumulative": self.cumulative,
            "posted": self.posted,
            "pending_jobs": self.pending_jobs,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(data, separators=(",", ":")).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
