"""Test data from the project's shared folder (beside the repository, in CI too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tdx_dir() -> Path | None:
    candidates = []
    if os.environ.get("IMAGO_SHARED"):
        candidates.append(Path(os.environ["IMAGO_SHARED"]) / "testdata/tdx")
    candidates += [REPO / "../shared/testdata/tdx", REPO / "shared/testdata/tdx"]
    for candidate in candidates:
        if (candidate / "tdx_quote").is_file():
            return candidate.resolve()
    return None


TDX_DIR = _tdx_dir()
ABSENT = "the real TDX quote is absent: expected shared/testdata/tdx beside the repository"
if TDX_DIR is None and os.environ.get("CI"):
    raise RuntimeError(f"{ABSENT} (CI must run with it)")

needs_tdx_sample = pytest.mark.skipif(TDX_DIR is None, reason=ABSENT)
