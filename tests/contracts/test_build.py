"""The committed build artifacts are exactly what the sources compile to."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from contracts.chain import artifacts

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_recompile_matches_committed_build():
    r = subprocess.run(
        ["node", str(ROOT / "contracts" / "compile.mjs"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_artifacts_load_and_hashes_match():
    for name, a in artifacts.load_all().items():
        assert a.code.hash == a.code_hash, name
        assert a.code_bits > 0 and a.code_cells > 0
