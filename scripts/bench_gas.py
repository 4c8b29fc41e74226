#!/usr/bin/env python3
"""Gas of every protocol operation, measured on the real TVM (a private devnet).

Prints one JSON object::

    {"operations": {NAME: {"gas": ..., "fee_nanoton": ..., "transactions": ...}},
     "contracts": {NAME: {"code_bits": ..., "code_cells": ...}},
     "breakdown": {NAME: [[account, gas], ...]}}

Each operation is one internal message sent by a wallet; its figures add up every
transaction the message causes (contracts, bounces, the wallets receiving excesses or
payouts) but not the initiating wallet's own transaction, as tolk-bench counts its
jetton transfer from a treasury. One is an external message with no wallet at all
(``vault_epoch_commit_external``): its figures are the Vault's transaction, import fee
included.

    python scripts/bench_gas.py                          # print the JSON
    python scripts/bench_gas.py --update-snapshot "desc" # and append to contracts/gas-snapshot.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402
from pytoniq_core import Address  # noqa: E402

from contracts.chain import addresses, artifacts, getters, operations  # noqa: E402
from contracts.chain.devnet import DevnetClient, DevnetProcess  # noqa: E402
from contracts.chain.messages.capabilities import Capabilities, ModelPrice  # noqa: E402
from contracts.chain.messages.registry import RegistryParams  # noqa: E402
from contracts.chain.transactions import Trace  # noqa: E402
from contracts.chain.wallet import Wallet, WalletKeys  # noqa: E402
from protocol.signed import (  # noqa: E402
    EpochCommit,
    PayoutVoucher,
    Receipt,
    SpendVoucher,
    model_hash,
)

TON = 1_000_000_000
SNAPSHOT = ROOT / "contracts" / "gas-snapshot.json"
TARGETS = {"escrow_charge": 13_600, "provider_claim": 13_600, "escrow_deposit": 5_000}
DELAY = 30  # unbonding and close delays of the bench registry (seconds)

BENCH_PARAMS = RegistryParams(
    min_provider_stake=2 * TON,
    unbonding_delay=DELAY,
    escrow_close_delay=DELAY,
    protocol_fee_bps=200,
    slash_bounty_bps=1000,
    min_vault_stake=2 * TON,
)

# Which transaction of which operation each constant of contracts/common/gas.tolk is.
# (operation, account label) pairs; a constant is the largest of its pairs.
GAS_CONSTANTS: dict[str, list[tuple[str, str]]] = {
    "GAS_REGISTRY_REGISTER": [("provider_register", "registry")],
    "GAS_REGISTRY_DEPLOY_VAULT": [("vault_deploy", "registry")],
    "GAS_REGISTRY_ADMIN": [
        ("registry_allow_image", "registry"),
        ("registry_allow_model", "registry"),
        ("registry_update_params", "registry"),
    ],
    "GAS_REGISTRY_FORWARD": [("provider_slash", "registry")],
    "GAS_PROVIDER_INIT": [("provider_register", "provider")],
    "GAS_PROVIDER_TOP_UP": [("provider_top_up", "provider")],
    "GAS_PROVIDER_ADMIN": [
        ("provider_rotate_key", "provider"),
        ("provider_update_capabilities", "provider"),
        ("provider_unstake", "provider"),
        ("provider_withdraw", "provider"),
    ],
    "GAS_PROVIDER_CLAIM": [("provider_claim", "provider")],
    "GAS_PROVIDER_SLASH": [("provider_slash", "provider")],
    "GAS_VAULT_TOP_UP": [("vault_deploy", "vault"), ("vault_top_up_stake", "vault")],
    "GAS_VAULT_CHARGED": [("escrow_charge", "vault")],
    "GAS_VAULT_PAYOUT": [("provider_claim", "vault")],
    "GAS_VAULT_COMMIT": [("vault_epoch_commit", "vault")],
    "GAS_VAULT_COMMIT_EXTERNAL": [("vault_epoch_commit_external", "vault")],
    "GAS_VAULT_WITHDRAW_FEES": [("vault_withdraw_fees", "vault")],
    "GAS_VAULT_ADMIN": [("vault_unstake", "vault"), ("vault_withdraw_stake", "vault")],
    "GAS_ESCROW_DEPOSIT": [("escrow_open", "escrow"), ("escrow_deposit", "escrow")],
    "GAS_ESCROW_CHARGE": [("escrow_charge", "escrow")],
    "GAS_ESCROW_ADMIN": [("escrow_close", "escrow"), ("escrow_withdraw", "escrow")],
}


class _BenchWallet(Wallet):
    """Transfers valid for a day: the bench moves the devnet clock ahead of wall time."""

    def build_external(self, messages, *, seqno, deploy=False, valid_until=None):  # type: ignore[override]
        return super().build_external(
            messages, seqno=seqno, deploy=deploy, valid_until=int(time.time()) + 86400
        )


class _Key:
    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.int = int.from_bytes(self.public, "big")

    def sign(self, obj: Any) -> bytes:
        return obj.sign(self.private)


class _Recorder:
    def __init__(self) -> None:
        self.labels: dict[str, str] = {}
        self.operations: dict[str, dict[str, int]] = {}
        self.breakdown: dict[str, list[list[Any]]] = {}

    def label(self, address: Address, name: str) -> None:
        self.labels[address.to_str(is_user_friendly=False)] = name

    def add(self, name: str, trace: Trace, *, external: bool = False) -> None:
        # not the initiating wallet's transaction; an external message has none
        txs = trace.transactions if external else trace.transactions[1:]
        if not all(t.success for t in txs):
            codes = operations.failed_exit_codes(trace)
            raise RuntimeError(f"{name}: a transaction failed: {codes}")
        self.operations[name] = {
            "gas": sum(t.gas_used for t in txs),
            "fee_nanoton": sum(t.fee for t in txs),
            "transactions": len(txs),
        }
        self.breakdown[name] = [
            [self.labels.get(t.address.to_str(is_user_friendly=False), "wallet"), t.gas_used]
            for t in txs
        ]


async def run_bench(chain: DevnetClient) -> dict[str, Any]:
    """Run every operation once on ``chain`` and return the bench JSON object."""
    rec = _Recorder()
    # chain time is monotonic: start from the later of wall time and chain time
    start = await chain.set_clock(max(int(time.time()), (await chain.clock())[0]))

    async def wallet() -> Wallet:
        w = _BenchWallet(chain, WalletKeys.generate(mnemonic=False))
        await chain.faucet(w.address, 1000 * TON)
        await w.deploy()
        return w

    gid = await chain.get_global_id()  # every signed object names the network
    gov, operator, node, client, reporter = [await wallet() for _ in range(5)]
    operator_key, node_key, spend_key = _Key(), _Key(), _Key()
    caps = Capabilities("H100", 80, 8, "eu-west", (ModelPrice(model_hash("m"), 100, 200),))

    registry, tr = await operations.deploy_registry(gov, BENCH_PARAMS)
    rec.label(registry, "registry")
    rec.add("registry_deploy", tr)
    rec.add("registry_allow_image", await operations.allow_image(gov, registry, 1234))
    rec.add("registry_allow_model", await operations.allow_model(gov, registry, "m"))
    rec.add("registry_update_params", await operations.update_params(gov, registry, BENCH_PARAMS))

    vault = addresses.vault_address(registry, operator.address, operator_key.int)
    rec.label(vault, "vault")
    reg = await getters.get_registry_data(chain, registry)
    from contracts.chain.messages.registry import DeployVault

    tr = await operator.transfer(
        registry,
        10 * TON + reg.deploy_vault_fee,
        DeployVault(operations.new_query_id(), operator_key.int).to_cell(),
    )
    rec.add("vault_deploy", tr)
    rec.add("vault_top_up_stake", await operations.vault_top_up_stake(operator, vault, TON))

    provider = addresses.provider_address(registry, node.address, 0)
    rec.label(provider, "provider")
    _, tr = await operations.register_provider(
        node, chain, registry, node_key.public, 5 * TON, caps
    )
    rec.add("provider_register", tr)
    rec.add("provider_top_up", await operations.provider_top_up(node, provider, TON))
    rec.add(
        "provider_update_capabilities",
        await operations.provider_update_capabilities(node, provider, caps),
    )

    escrow = addresses.escrow_address(vault, client.address, spend_key.int, DELAY)
    rec.label(escrow, "escrow")
    _, tr = await operations.escrow_open(client, vault, spend_key.public, 5 * TON, DELAY)
    rec.add("escrow_open", tr)
    rec.add("escrow_deposit", await operations.escrow_deposit(client, escrow, TON))
    sv = SpendVoucher(gid, escrow, vault, 2 * TON)
    rec.add(
        "escrow_charge", await operations.escrow_charge(operator, escrow, sv, spend_key.sign(sv))
    )
    commit = EpochCommit(gid, vault, 1, b"\x01" * 32, 2 * TON, TON, 4 * TON // 100, 10)
    tr = await operations.vault_commit_epoch(operator, vault, commit, operator_key.sign(commit))
    rec.add("vault_epoch_commit", tr)
    # the next epoch as an external message, paid out of the operator's fees
    commit2 = EpochCommit(gid, vault, 2, b"\x02" * 32, 2 * TON, TON, 4 * TON // 100, 10)
    tr = await operations.vault_commit_epoch_external(
        chain, vault, commit2, operator_key.sign(commit2)
    )
    rec.add("vault_epoch_commit_external", tr, external=True)
    pv = PayoutVoucher(gid, vault, provider, 1, TON)
    rec.add(
        "provider_claim", await operations.provider_claim(node, provider, pv, operator_key.sign(pv))
    )
    rec.add(
        "vault_withdraw_fees", await operations.vault_withdraw_fees(operator, vault, TON // 100)
    )

    rec.add("escrow_close", await operations.escrow_close(client, escrow))
    rec.add(
        "provider_rotate_key", await operations.provider_rotate_key(node, provider, _Key().public)
    )
    rec.add("provider_unstake", await operations.provider_unstake(node, provider))
    rec.add("vault_unstake", await operations.vault_unstake(operator, vault, TON))
    await chain.set_clock(start + DELAY + 1)
    rec.add("escrow_withdraw", await operations.escrow_withdraw(client, escrow))
    rec.add("provider_withdraw", await operations.provider_withdraw(node, provider))
    rec.add("vault_withdraw_stake", await operations.vault_withdraw_stake(operator, vault))

    # a second node equivocates and is slashed
    node2, key2 = await wallet(), _Key()
    provider2, _ = await operations.register_provider(
        node2, chain, registry, key2.public, 5 * TON, caps
    )
    rec.label(provider2, "provider")
    r1 = Receipt(
        gid, escrow, 42, start, model_hash("m"), 10, 20, 100, 200, 5, b"\0" * 32, b"\1" * 32
    )
    r2 = Receipt(
        gid, escrow, 42, start, model_hash("m"), 10, 20, 100, 200, 6, b"\0" * 32, b"\1" * 32
    )
    tr = await operations.provider_slash(
        reporter, provider2, (r1, key2.sign(r1)), (r2, key2.sign(r2))
    )
    rec.add("provider_slash", tr)
    await chain.set_clock(None)

    contracts = {
        name: {"code_bits": a.code_bits, "code_cells": a.code_cells}
        for name, a in artifacts.load_all().items()
    }
    return {"operations": rec.operations, "contracts": contracts, "breakdown": rec.breakdown}


def measured_constants(result: dict[str, Any]) -> dict[str, int]:
    """The value each constant of contracts/common/gas.tolk should have, from a bench run."""
    out: dict[str, int] = {}
    for const, pairs in GAS_CONSTANTS.items():
        values = [
            gas
            for op, label in pairs
            for account, gas in result["breakdown"][op]
            if account == label
        ]
        out[const] = max(values)
    return out


GAS_TOLK = ROOT / "contracts" / "common" / "gas.tolk"


def write_constants(values: dict[str, int], path: Path = GAS_TOLK) -> bool:
    """Rewrite the constants of contracts/common/gas.tolk; True if anything changed."""
    import re

    text = path.read_text()
    new = text
    for name, value in values.items():
        new = re.sub(rf"^(const {name} = )\d+", rf"\g<1>{value}", new, flags=re.M)
    if new != text:
        path.write_text(new)
    return new != text


def read_constants(path: Path = GAS_TOLK) -> dict[str, int]:
    import re

    return {
        m[1]: int(m[2]) for m in re.finditer(r"^const (GAS_\w+) = (\d+)", path.read_text(), re.M)
    }


def append_snapshot(result: dict[str, Any], desc: str, path: Path = SNAPSHOT) -> None:
    history = json.loads(path.read_text()) if path.exists() else []
    total_bits = sum(c["code_bits"] for c in result["contracts"].values())
    total_cells = sum(c["code_cells"] for c in result["contracts"].values())
    history.append(
        {
            "commitDesc": desc,
            "gas": {op: v["gas"] for op, v in result["operations"].items()},
            "codeSize": {"bits": total_bits, "cells": total_cells},
        }
    )
    path.write_text(json.dumps(history, indent=2) + "\n")


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="imago-bench-") as tmp,
        DevnetProcess(tmp, port=0) as dn,
    ):
        async with dn.client() as chain:
            return await run_bench(chain)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--update-snapshot", metavar="DESC", help="append the result to the snapshot")
    p.add_argument("--constants", action="store_true", help="also print measured gas constants")
    p.add_argument(
        "--write-constants",
        action="store_true",
        help="rewrite contracts/common/gas.tolk with the measurement (then recompile)",
    )
    args = p.parse_args()
    result = asyncio.run(_main(args))
    if args.constants:
        result["constants"] = measured_constants(result)
    if args.write_constants and write_constants(measured_constants(result)):
        print(
            "contracts/common/gas.tolk updated: run `node contracts/compile.mjs`", file=sys.stderr
        )
    print(json.dumps(result, indent=2))
    if args.update_snapshot:
        append_snapshot(result, args.update_snapshot)
    over = {
        k: result["operations"][k]["gas"]
        for k, t in TARGETS.items()
        if result["operations"][k]["gas"] > t
    }
    if over:
        print(f"over target: {over}", file=sys.stderr)
        sys.exit(os.EX_SOFTWARE)


if __name__ == "__main__":
    main()
