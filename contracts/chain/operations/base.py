"""What every operation shares: the value each message carries, the contracts' error
names, and sending one message and checking its whole trace."""

from __future__ import annotations

import secrets
from typing import Any

from pytoniq_core import Address, Cell

from ..addresses import Sender
from ..transactions import Trace

TON = 1_000_000_000

# Value attached for gas to each kind of operation (the excess comes back).
OP_VALUE = {
    "admin": TON // 20,
    "simple": TON // 20,
    "charge": TON // 20,
    "claim": TON // 10,
    "slash": TON // 10,
    "commit": TON // 20,
}

# What an external epoch commit costs the Vault, taken from the operator's unwithdrawn fees
# (added to its feesWithdrawn): the gas of GAS_VAULT_COMMIT_EXTERNAL and the import fee of the
# message (its commit cell, at most 887 bits), at the mainnet prices the devnet runs with.
# The Vault's `external_commit_fee` get-method gives it at its own chain's prices
# (externalCommitFee() in contracts/vault/fees.tolk); a test checks the two agree.
EXTERNAL_COMMIT_FEE = 2_565_200

WRONG_EPOCH = 310  # vault: an epoch commit that is not lastEpoch + 1 (a replay)

# Contract error codes (contracts/*/errors.tolk) for messages.
ERROR_NAMES = {
    100: "registry: not owner",
    101: "registry: not enough value",
    102: "registry: stake too low",
    103: "registry: bad params (fee above 100% or slashing bounty above 50%)",
    104: "registry: not from one of its providers",
    200: "provider: not owner",
    201: "provider: not enough value",
    202: "provider: not from registry",
    203: "provider: not active",
    204: "provider: not unbonding",
    205: "provider: still locked (unbonding)",
    207: "provider: voucher for another provider",
    208: "provider: voucher not above what was claimed",
    210: "provider: not slashable",
    211: "provider: proof does not verify",
    213: "provider: key rotated too recently",
    214: "provider: malformed capabilities",
    215: "provider: neither withdrawn nor slashed",
    216: "provider: a receipt of the proof is for another network",
    300: "vault: not operator",
    301: "vault: not enough value",
    302: "vault: sender is not an escrow of this vault",
    303: "vault: sender is not a provider of this registry",
    304: "vault: bad signature",
    305: "vault: voucher for another vault",
    306: "vault: voucher for another provider",
    307: "vault: epoch not committed",
    308: "vault: voucher not above what was claimed",
    309: "vault: would pay more than charged - fees + stake",
    310: "vault: wrong epoch",
    311: "vault: more than the accrued fees",
    312: "vault: VaultInit not from the registry",
    313: "vault: not unstaking (or more than the stake)",
    314: "vault: still locked (unbonding)",
    315: "vault: no stake free (it covers what is owed)",
    316: "vault: balance less the storage reserve does not cover it",
    317: "vault: epoch commit totals go backwards",
    318: "vault: epoch commit totals beyond what the vault was charged",
    319: "vault: payout above the last epoch commit's paid total",
    320: "vault: voucher or commit for another network",
    400: "escrow: not owner",
    401: "escrow: not enough value",
    402: "escrow: bad signature",
    403: "escrow: voucher for another escrow",
    404: "escrow: voucher for another vault",
    405: "escrow: voucher not above what was charged",
    406: "escrow: charge beyond the deposit",
    407: "escrow: closed",
    408: "escrow: not closing",
    409: "escrow: still locked (close delay)",
    410: "escrow: not open",
    411: "escrow: voucher for another network",
    0xFFFF: "unknown opcode",
    9: "malformed body (cell underflow)",
}


class OperationFailed(RuntimeError):
    """A transaction of the operation's trace failed, or (``exit_codes`` given, empty
    trace) the contract refused an external message before accepting it."""

    def __init__(self, what: str, trace: Trace, *, exit_codes: list[int | None] | None = None):
        self.trace = trace
        self.exit_codes = failed_exit_codes(trace) if exit_codes is None else exit_codes
        names = ", ".join(
            f"{c} ({ERROR_NAMES.get(c, 'tvm error')})" if c is not None else "action failed"
            for c in self.exit_codes
        )
        super().__init__(f"{what} failed: {names}")


def failed_exit_codes(trace: Trace) -> list[int | None]:
    """Exit codes of the failed transactions of a trace (None: the action phase failed)."""
    out: list[int | None] = []
    for t in trace.transactions:
        if t.success or t.compute_skipped and not t.aborted:
            continue
        out.append(t.exit_code if not t.compute_success else None)
    return out


def new_query_id() -> int:
    return secrets.randbits(64)


def _key_int(key: bytes | int) -> int:
    return key if isinstance(key, int) else int.from_bytes(key, "big")


async def _send(
    what: str,
    sender: Sender,
    dest: Address,
    value: int,
    body: Cell | None,
    *,
    check: bool,
    state_init: Any = None,
    **kw: Any,
) -> Trace:
    trace = await sender.transfer(dest, value, body, state_init=state_init, bounce=True, **kw)
    if check and failed_exit_codes(trace):
        raise OperationFailed(what, trace)
    return trace
