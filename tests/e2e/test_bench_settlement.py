"""A bounded slice of the settlement benchmark (scripts/bench_settlement.py --quick) in
CI: a few clients and nodes on a real devnet, settled by the matcher's service and the
nodes' claim step. The full run's targets are in docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_settlement_benchmark_settles_exactly() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/bench_settlement.py", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures["accounting_gap_nanoton"] == 0
    assert figures["tx_growth"] == 1.0  # 10x the jobs, the same transactions
    assert figures["epoch_jobs"] == 1000 and figures["epoch_build_s"] < 60
    assert figures["seconds_to_claimable"]["imago_up_30s_epochs"] < 90
