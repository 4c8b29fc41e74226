"""The compiled contracts committed under ``contracts/build/`` (written by compile.mjs)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pytoniq_core import Cell

__all__ = ["BUILD_DIR", "CONTRACT_NAMES", "Artifact", "ArtifactError", "load", "load_all"]

BUILD_DIR = Path(__file__).resolve().parent.parent / "build"
CONTRACT_NAMES = ("registry", "provider", "vault", "escrow")


class ArtifactError(RuntimeError):
    """A build artifact is missing or inconsistent."""


@dataclass(frozen=True)
class Artifact:
    name: str
    code: Cell
    code_hash: bytes
    code_bits: int
    code_cells: int
    tolk_version: str

    @property
    def code_hash_hex(self) -> str:
        return self.code_hash.hex().upper()


@cache
def load(name: str) -> Artifact:
    """The code cell and hash of one contract; checks the hash against the BOC."""
    if name not in CONTRACT_NAMES:
        raise ArtifactError(f"unknown contract {name!r}")
    path = BUILD_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} is missing: run `node contracts/compile.mjs`") from e
    code = Cell.one_from_boc(base64.b64decode(data["codeBoc64"]))
    if code.hash.hex().upper() != data["codeHashHex"].upper():
        raise ArtifactError(f"{path}: code hash does not match the code BOC")
    return Artifact(
        name=name,
        code=code,
        code_hash=code.hash,
        code_bits=int(data["codeBits"]),
        code_cells=int(data["codeCells"]),
        tolk_version=str(data["tolkVersion"]),
    )


def load_all() -> dict[str, Artifact]:
    return {name: load(name) for name in CONTRACT_NAMES}
