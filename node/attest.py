"""Attestation: one interface, two providers.

- ``tdx`` asks the TDX module for a quote through the kernel's configfs-tsm interface
  (``/sys/kernel/config/tsm/report``): make an entry, write the 64 bytes of report data
  to ``inblob``, read the quote from ``outblob``.
- ``dev`` signs a software statement with the node key (``make_dev_evidence``). It
  proves nothing about the machine, so a node uses it only on the devnet.

Both bind the node's two public keys and the verifier's nonce into report_data
(``protocol.attestation.report_data``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, Protocol

from node.keys import NodeKeys
from protocol.api import AttestationDoc
from protocol.attestation import make_dev_evidence, report_data

__all__ = [
    "AttestationUnavailable",
    "Attester",
    "DevEvidenceProvider",
    "EvidenceProvider",
    "TdxEvidenceProvider",
    "make_provider",
    "pccs_collateral_fetcher",
]

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
DEFAULT_PCCS_URL = "https://api.trustedservices.intel.com"  # Intel PCS


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


CollateralFetcher = Callable[[bytes], Awaitable[dict]]


def pccs_collateral_fetcher(pccs_url: str) -> CollateralFetcher:
    """Fetch DCAP collateral for a quote from a PCCS or Intel's PCS (dcap-qvl)."""

    async def fetch(quote: bytes) -> dict:
        import dcap_qvl  # compiled extension: loaded only on TDX nodes

        collateral = await dcap_qvl.get_collateral(pccs_url, quote)
        return json.loads(collateral.to_json())

    return fetch


class Attester:
    """Produces AttestationDocs for verifiers' nonces.

    A TDX doc carries its DCAP collateral (public, from a PCCS or Intel's PCS) so that
    verifiers check it offline. The collateral belongs to the platform, not the quote,
    so it is cached for ``collateral_ttl`` seconds.
    """

    def __init__(
        self,
        keys: NodeKeys,
        provider: EvidenceProvider,
        *,
        collateral_fetcher: CollateralFetcher | None = None,
        collateral_ttl: float = 3600.0,
    ) -> None:
        self._keys = keys
        self._provider = provider
        self._fetch_collateral = collateral_fetcher
        self._collateral_ttl = collateral_ttl
        self._collateral: dict | None = None
        self._collateral_at = 0.0
        if provider.kind == "tdx" and collateral_fetcher is None:
            self._fetch_collateral = pccs_collateral_fetcher(DEFAULT_PCCS_URL)

    @property
    def kind(self) -> Literal["tdx", "dev"]:
        return self._provider.kind

    def _doc(self, nonce: bytes, evidence: bytes, collateral: dict | None) -> AttestationDoc:
        return AttestationDoc(
            kind=self._provider.kind,
            ed25519_public=self._keys.ed25519_public.hex(),
            x25519_public=self._keys.x25519_public.hex(),
            nonce=nonce.hex(),
            evidence=base64.b64encode(evidence).decode(),
            collateral=collateral,
            issued_at=int(time.time()),
        )

    def _report_data(self, nonce: bytes) -> bytes:
        return report_data(self._keys.ed25519_public, self._keys.x25519_public, nonce)

    async def attest(self, nonce: bytes) -> AttestationDoc:
        data = self._report_data(nonce)
        if self._provider.kind == "dev":  # one signature: cheaper than a thread hop
            return self._doc(nonce, self._provider.evidence(data), None)
        quote = await asyncio.to_thread(self._provider.evidence, data)
        return self._doc(nonce, quote, await self._collateral_for(quote))

    async def _collateral_for(self, quote: bytes) -> dict | None:
        if self._fetch_collateral is None:
            return None
        now = time.monotonic()
        if self._collateral is None or now - self._collateral_at > self._collateral_ttl:
            try:
                self._collateral = await self._fetch_collateral(quote)
            except Exception as e:
                if self._collateral is None:
                    raise AttestationUnavailable(f"cannot fetch DCAP collateral: {e}") from e
                return self._collateral  # keep serving the cached one; it may still be valid
            self._collateral_at = now
        return self._collateral
