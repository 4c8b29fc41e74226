"""The claim loop inside the node service: its settings (``imago node serve``'s claim
flags) and the APScheduler job that runs ``node.claims.Claimer`` every ``--claim-every``
seconds, backing off after failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from pytoniq_core import Address

from contracts.chain.toncenter import ToncenterClient, chain_url
from contracts.chain.wallet import Wallet, WalletError, WalletKeys, load_keystore
from node.claims import (
    CLAIM_FEE,
    DEFAULT_CLAIM_EVERY,
    DEFAULT_MULTIPLE,
    DEVNET_MULTIPLE,
    MAX_BACKOFF_S,
    Claimer,
    ClaimError,
    ClaimRun,
)
from protocol.home import wallet_file
from protocol.keystore import KeystoreError

__all__ = ["ClaimService", "ClaimSettings", "claim_settings", "claims_ctx", "open_chain_client"]

log = logging.getLogger("imago.node.claims")


@dataclass(frozen=True)
class ClaimSettings:
    provider: Address
    matcher: str
    chain: str
    wallet_path: Path
    wallet_keys: WalletKeys = field(repr=False)
    wallet_network: str
    state_dir: Path
    every: float = DEFAULT_CLAIM_EVERY
    multiple: float = DEFAULT_MULTIPLE


def wallet_path(name_or_path: str) -> Path:
    """``--claim-wallet``: a keystore path, or the name of a wallet in $IMAGO_HOME/wallets."""
    p = Path(name_or_path).expanduser()
    if "/" in name_or_path or name_or_path.endswith(".json"):
        return p
    return wallet_file(name_or_path)


def claim_settings(config: Any) -> ClaimSettings | None:
    """The claim loop's settings from a ``NodeConfig``; None when it is not configured
    (no --chain and no --claim-wallet). Raises ValueError on half a configuration, an
    unknown chain, a missing or undecryptable wallet."""
    chain, wallet = getattr(config, "chain", None), getattr(config, "claim_wallet", None)
    if not chain and not wallet:
        return None
    missing = [
        flag
        for flag, value in (
            ("--chain", chain),
            ("--claim-wallet", wallet),
            ("--provider", config.provider),
            ("--matcher", config.matcher),
        )
        if not value
    ]
    if missing:
        raise ValueError(f"the claim loop needs {', '.join(missing)} as well")
    chain_url(chain)  # ValueError on an unknown chain
    if config.claim_every <= 0:
        raise ValueError("--claim-every must be positive")
    multiple = config.claim_multiple
    if multiple is None:
        multiple = DEVNET_MULTIPLE if config.devnet else DEFAULT_MULTIPLE
    if multiple < 0:
        raise ValueError("--claim-multiple must not be negative")
    path = wallet_path(wallet)
    try:
        keys, header = load_keystore(path, getattr(config, "claim_passphrase", None))
    except (WalletError, KeystoreError, OSError) as e:
        raise ValueError(f"--claim-wallet {wallet}: {e}") from e
    try:
        provider = Address(config.provider)
    except Exception as e:
        raise ValueError(f"--provider {config.provider!r} is not an address") from e
    return ClaimSettings(
        provider=provider,
        matcher=config.matcher,
        chain=chain,
        wallet_path=path,
        wallet_keys=keys,
        wallet_network=header.get("network", "devnet"),
        state_dir=config.state_dir,
        every=float(config.claim_every),
        multiple=float(multiple),
    )


def open_chain_client(chain: str) -> ToncenterClient:
    """The adapter for a ``--chain`` value (devnet | testnet | mainnet | URL)."""
    import argparse

    from contracts.chain.cli import open_chain

    return open_chain(argparse.Namespace(chain=chain))


class ClaimService:
    """Runs ``Claimer.run_once`` every ``settings.every`` seconds on an APScheduler
    ``AsyncIOScheduler``, backing off after failures (the next runs are skipped until
    ``every × 2^(failures-1)`` has passed, at most an hour)."""

    def __init__(self, settings: ClaimSettings, *, first_run_delay: float | None = None) -> None:
        self.settings = settings
        # the first run soon after start (not before the node is up), then every `every`
        self.first_run_delay = (
            min(5.0, settings.every) if first_run_delay is None else first_run_delay
        )
        self.failures = 0
        self.last: ClaimRun | None = None
        self.runs = 0
        self._not_before = 0.0
        self._current: asyncio.Future[None] | None = None
        self._scheduler: Any = None
        self._client: ToncenterClient | None = None
        self.claimer: Claimer | None = None

    def start(self) -> None:

        s = self.settings
        self._client = open_chain_client(s.chain)
        wallet = Wallet(self._client, s.wallet_keys, network=s.wallet_network)
        self.claimer = Claimer(
            client=self._client,
            wallet=wallet,
            provider=s.provider,
            matcher=s.matcher,
            state_dir=s.state_dir,
            multiple=s.multiple,
        )
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.add_job(
            self._tick,
            "interval",
            seconds=s.every,
            next_run_time=datetime.now(UTC) + timedelta(seconds=self.first_run_delay),
            id="claims",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self._scheduler.start()
        log.info(
            "claim loop: every %.0f s, claiming above %g × %d nanoTON, from %s",
            s.every,
            s.multiple,
            CLAIM_FEE,
            wallet.address.to_str(is_user_friendly=False),
        )

    async def _tick(self) -> None:
        if time.monotonic() < self._not_before:
            return
        # Shielded: stopping the scheduler cancels this wrapper, never a claim half-sent
        # (stop() lets it finish).
        self._current = asyncio.ensure_future(self._run())
        await asyncio.shield(self._current)

    async def _run(self) -> None:
        assert self.claimer is not None
        self.runs += 1
        try:
            run = await self.claimer.run_once()
            failed, why = run.failed, run.message
        except ClaimError as e:
            run, failed, why = None, True, str(e)
        except Exception as e:  # never let the loop die
            log.exception("claim run crashed")
            run, failed, why = None, True, f"{type(e).__name__}: {e}"
        self.last = run
        if failed:
            self.failures += 1
            wait = min(self.settings.every * 2 ** (self.failures - 1), MAX_BACKOFF_S)
            wait = max(wait, self.settings.every)
            self._not_before = time.monotonic() + wait - 1.0  # the run `wait` s from now
            log.warning("claim run failed (%s); next attempt in %.0f s", why, wait)
        else:
            self.failures = 0
            self._not_before = 0.0

    async def stop(self, *, grace: float = 30.0) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._current is not None and not self._current.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._current), grace)
            except (TimeoutError, asyncio.CancelledError):
                self._current.cancel()
                with contextlib.suppress(BaseException):
                    await self._current
        if self.claimer is not None:
            await self.claimer.close()
        if self._client is not None:
            await self._client.close()


def claims_ctx(
    settings: ClaimSettings, **kw: Any
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry that runs the claim loop for the application's lifetime."""

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        service = ClaimService(settings, **kw)
        service.start()
        try:
            yield
        finally:
            await service.stop()

    return ctx
