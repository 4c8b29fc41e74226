"""Gas: the constants of contracts/common/gas.tolk equal the measured gas, and the targets hold."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gas", ROOT / "scripts" / "bench_gas.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def test_gas_constants_match_measurement(chain):
    bench = _bench()
    result = await bench.run_bench(chain)
    measured = bench.measured_constants(result)
    declared = bench.read_constants()
    for name, gas in sorted(measured.items()):
        print(f"{name}: declared {declared[name]}, measured {gas}")
    drift = {n: (declared[n], g) for n, g in measured.items() if declared[n] != g}
    assert not drift, f"gas drift (declared, measured): {drift}; run bench_gas.py --write-constants"
    for op, target in bench.TARGETS.items():
        assert result["operations"][op]["gas"] <= target, (op, result["operations"][op])
    # every operation of the issue is measured
    for op in [
        "registry_deploy",
        "provider_register",
        "provider_unstake",
        "provider_withdraw",
        "provider_slash",
        "vault_deploy",
        "escrow_open",
        "escrow_deposit",
        "escrow_charge",
        "escrow_close",
        "provider_claim",
        "vault_epoch_commit",
        "vault_epoch_commit_external",
    ]:
        assert result["operations"][op]["transactions"] >= 1
