"""Attestation: one interface, two providers.

- ``tdx`` asks the TDX module for a quote through the kernel's configfs-tsm interface
  (``/sys/kernel/config/tsm/report``): make an entry, write the 64 bytes of report data
  to ``inblob``, read the quote from ``outblob``.
- ``dev`` signs a software statement with the node key (``make_dev_evidence``). It
  proves nothing about the machine, so a node uses it only on the devnet.

Both bind the node's two public keys and the verifier's nonce into report_data
(``contracts.protocol.attestation.report_data``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Literal, Protocol

from contracts.protocol.api import AttestationDoc
from contracts.protocol.attestation import make_dev_evidence, report_data
from node.keys import NodeKeys

__all__ = [
    "AttestationUnavailable",
    "Attester",
    "DevEvidenceProvider",
    "EvidenceProvider",
    "TdxEvidenceProvider",
    "make_provider",
]

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")


class AttestationUnavailable(RuntimeError):
    """The requested attestation kind cannot work on this host or in this mode."""


class EvidenceProvider(Protocol):
    kind: Literal["tdx", "dev"]

    def check(self) -> None:
        """Raise AttestationUnavailable if this provider cannot produce evidence here."""

    def evidence(self, data: bytes) -> bytes:
        """Evidence whose report data is ``data`` (64 bytes). May block briefly."""


class DevEvidenceProvider:
    kind: Literal["dev"] = "dev"

    def __init__(self, keys: NodeKeys) -> None:
        self._keys = keys

    def check(self) -> None:
        return None

    def evidence(self, data: bytes) -> bytes:
        return make_dev_evidence(self._keys.ed25519, data)


class TdxEvidenceProvider:
    """A TDX quote via configfs-tsm (Linux 6.7+, the ``tdx_guest`` TSM provider)."""

    kind: Literal["tdx"] = "tdx"

    def __init__(self, root: Path = TSM_REPORT_ROOT, attempts: int = 3) -> None:
        self._root = root
        self._attempts = attempts

    def check(self) -> None:
        if not self._root.is_dir():
            raise AttestationUnavailable(
                f"TDX attestation needs configfs-tsm at {self._root}, which does not exist: "
                "run the node in a TDX guest (Linux 6.7+ with the tdx_guest module) with "
                "configfs mounted (mount -t configfs none /sys/kernel/config), or use "
                "--attestation dev with --devnet"
            )
        if not os.access(self._root, os.W_OK):
            raise AttestationUnavailable(
                f"{self._root} is not writable by this user: the node needs permission to "
                "create report entries"
            )

    def evidence(self, data: bytes) -> bytes:
        if len(data) != 64:
            raise ValueError("TDX report data is 64 bytes")
        self.check()
        entry = self._root / f"imago-{uuid.uuid4().hex}"
        try:
            entry.mkdir()
        except OSError as e:
            raise AttestationUnavailable(f"cannot create {entry}: {e}") from e
        try:
            for _ in range(self._attempts):
                provider = _read_text(entry / "provider")
                if provider and provider != "tdx_guest":
                    raise AttestationUnavailable(
                        f"configfs-tsm provider is {provider!r}, not tdx_guest"
                    )
                (entry / "inblob").write_bytes(data)
                before = _read_text(entry / "generation")
                quote = (entry / "outblob").read_bytes()
                after = _read_text(entry / "generation")
                # Another writer to this entry between our write and read changes the
                # generation; retry rather than return a quote over someone else's data.
                if before == after and quote:
                    return quote
            raise AttestationUnavailable("configfs-tsm report kept changing under us")
        except OSError as e:
            raise AttestationUnavailable(f"configfs-tsm did not give a quote: {e}") from e
        finally:
            with contextlib.suppress(OSError):
                entry.rmdir()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def make_provider(kind: str, keys: NodeKeys, *, devnet: bool) -> EvidenceProvider:
    """The provider for ``kind``; ``dev`` only with ``devnet`` (a node must not pretend)."""
    if kind == "dev":
        if not devnet:
            raise AttestationUnavailable(
                "dev attestation is a software statement for the devnet only: "
                "pass --devnet, or use --attestation tdx on TDX hardware"
            )
        provider: EvidenceProvider = DevEvidenceProvider(keys)
    elif kind == "tdx":
        provider = TdxEvidenceProvider()
    else:
        raise AttestationUnavailable(f"unknown attestation kind {kind!r} (dev or tdx)")
    provider.check()
    return provider


class Attester:
    """Produces AttestationDocs for verifiers' nonces."""

    def __init__(self, keys: NodeKeys, provider: EvidenceProvider) -> None:
        self._keys = keys
        self._provider = provider

    @property
    def kind(self) -> Literal["tdx", "dev"]:
        return self._provider.kind

    def attest_sync(self, nonce: bytes) -> AttestationDoc:
        ed, x = self._keys.ed25519_public, self._keys.x25519_public
        evidence = self._provider.evidence(report_data(ed, x, nonce))
        return AttestationDoc(
            kind=self._provider.kind,
            ed25519_public=ed.hex(),
            x25519_public=x.hex(),
            nonce=nonce.hex(),
            evidence=base64.b64encode(evidence).decode(),
            collateral=None,
            issued_at=int(time.time()),
        )

    async def attest(self, nonce: bytes) -> AttestationDoc:
        if self._provider.kind == "dev":
            return self.attest_sync(nonce)  # one signature: cheaper than a thread hop
        return await asyncio.to_thread(self.attest_sync, nonce)
