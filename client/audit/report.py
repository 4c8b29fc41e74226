"""The findings of an audit and its report (a summary per epoch, text or JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
