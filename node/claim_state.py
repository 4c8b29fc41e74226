"""The claim loop's durable state: the best payout voucher kept per Vault, the recent
refusals and claims. One JSON file in the node's state directory, replaced atomically
(see ``node.claims``)."""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytoniq_core import Address

from protocol.signed import PayoutVoucher

__all__ = ["STATE_FILE", "ClaimState", "KeptVoucher", "raw_address"]

log = logging.getLogger("imago.node.claims")

STATE_FILE = "claims.json"
_KEEP = 50  # refusals and claims kept in the state file


def raw_address(a: Address | str) -> str:
    return (Address(a) if isinstance(a, str) else a).to_str(is_user_friendly=False)


@dataclass
class KeptVoucher:
    """The best payout voucher accepted from one Vault."""

    epoch: int
    cumulative: int
    voucher: bytes  # the BOC as received
    signature: bytes
    seen_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cumulative": str(self.cumulative),
            "voucher": base64.b64encode(self.voucher).decode(),
            "signature": self.signature.hex(),
            "seen_at": self.seen_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeptVoucher:
        return cls(
            int(d["epoch"]),
            int(d["cumulative"]),
            base64.b64decode(d["voucher"]),
            bytes.fromhex(d["signature"]),
            int(d.get("seen_at", 0)),
        )

    def parsed(self) -> PayoutVoucher:
        return PayoutVoucher.from_boc(self.voucher)


@dataclass
class ClaimState:
    """``claims.json``: per Provider, the best voucher per Vault, recent refusals and
    claims. Written whole to a temporary file, fsynced, then renamed over."""

    path: Path
    provider: str
    vouchers: dict[str, KeptVoucher] = field(default_factory=dict)
    refused: list[dict[str, Any]] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: Path, provider: Address | str) -> ClaimState:
        path = state_dir / STATE_FILE
        state = cls(path, raw_address(provider))
        try:
            doc = json.loads(path.read_text())
            mine = doc.get("providers", {}).get(state.provider, {})
            state.vouchers = {
                v: KeptVoucher.from_json(kept) for v, kept in mine.get("vouchers", {}).items()
            }
            state.refused = list(mine.get("refused", []))
            state.claims = list(mine.get("claims", []))
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # The chain is the guard: a lost state costs a refused claim's fee at most.
            log.error("%s is unreadable (%s); starting from what the chain says", path, e)
        return state

    def save(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            if not isinstance(doc.get("providers"), dict):
                raise ValueError
        except (FileNotFoundError, ValueError, AttributeError):
            doc = {"version": 1, "providers": {}}
        doc["providers"][self.provider] = {
            "vouchers": {v: kept.to_json() for v, kept in self.vouchers.items()},
            "refused": self.refused[-_KEEP:],
            "claims": self.claims[-_KEEP:],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (json.dumps(doc, indent=1) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


# ----------------------------------------------------------------- one run
