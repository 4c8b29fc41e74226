"""The claim loop: the node collects what it earned, on its own schedule.

Every ``--claim-every`` seconds (an APScheduler job inside the node service) the node:

1. fetches its latest payout voucher from the matcher
   (``GET {matcher}/v1/ledger/payouts/{provider}``, ``docs/ledger.md``);
2. checks it, trusting the chain and nothing the matcher says: the voucher cell parses
   and names this Provider; the Vault it names runs the Registry's vault code for this
   Provider's Registry; the operator's signature verifies under the Vault's on-chain
   ``operatorKey``; its epoch is committed on-chain (``epoch <= lastEpoch``, invariant
   6); its cumulative never goes below the best voucher this node kept nor below what
   the Provider already claimed, and one epoch never has two amounts. A voucher that
   fails is refused and logged (``refused`` in the state file), and the node keeps
   the best voucher it accepted before: a matcher cannot take back a voucher it
   released;
3. reads what the Provider already claimed from that Vault (its ``claimed`` getter) and,
   when ``cumulative - claimed > multiple × CLAIM_FEE`` and the Vault can pay it
   (``chargedIn - feesAccrued + stake - paidOut >= amount``, invariant 3), sends the
   Claim from the Provider's owner wallet (the only sender the Provider accepts) and
   waits for the whole trace. A failure is retried at a later run, backing off.

The state (the best voucher per Vault, refusals, recent claims) is one JSON file in the
node's state directory (``claims.json``), replaced atomically. Nothing in it can make the
node pay itself twice: the Provider keeps the cumulative amount claimed per Vault and
refuses a Claim not above it (208); the Vault pays only ``cumulative - claimedBefore``.
A kill -9 at any point, or a lost state file, costs at most one refused claim's fee.
A lock file (``claims.lock``) keeps the loop and ``imago provider claim`` from claiming
at the same moment.

**The multiple.** A claim costs the owner ``CLAIM_FEE`` (0.0112 TON: 0.0057 TON for the
Provider, Vault and payout transactions, the rest the wallet's own transaction and
forward fees). Claiming only above ``multiple × CLAIM_FEE`` bounds the fees to
1/multiple of the payouts: the default 10000 (claim from 112 TON) spends at most 0.01 %
on fees, which the settlement fee goal needs (all fees at most 0.1 % of what moves,
docs/benchmarks.md), at the price of leaving up to that much with the Vault between
claims (backed by the Vault's stake, invariant 3) and of waiting for it: a node earning
10 TON a day claims every 11 days. Lower it to be paid sooner, raise it to pay less. On
the devnet, where TON is free and one wants to see the payout arrive, the default is 0:
claim whatever is unclaimed.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pytoniq_core import Address

from contracts.chain import getters, operations
from contracts.chain.results import ToncenterError
from contracts.chain.toncenter import ToncenterClient
from contracts.chain.transactions import Trace
from contracts.chain.wallet import WalletError
from node.claim_state import ClaimState, KeptVoucher, raw_address
from protocol.signed import PayoutVoucher, SignedObjectError, signature_valid

__all__ = [
    "CLAIM_FEE",
    "DEFAULT_CLAIM_EVERY",
    "DEFAULT_MULTIPLE",
    "DEVNET_MULTIPLE",
    "ClaimRun",
    "Claimer",
    "VaultClaim",
    "VoucherRefused",
]

log = logging.getLogger("imago.node.claims")

# What one claim costs the owner's wallet, in nanoTON: the Provider, Vault and payout
# transactions (0.005681 TON, docs/contracts.md) plus the wallet's own transaction and
# the forward fees: 0.0109432 TON measured on the devnet (mainnet gas config), checked
# by tests/contracts/test_node_claims.py.
CLAIM_FEE = 11_200_000
DEFAULT_CLAIM_EVERY = 300.0
DEFAULT_MULTIPLE = 10000.0
DEVNET_MULTIPLE = 0.0
MAX_BACKOFF_S = 3600.0
LOCK_FILE = "claims.lock"


class VoucherRefused(Exception):
    """A payout voucher that fails a check; the message says which."""


class ClaimError(Exception):
    """A run that could not complete (matcher or chain unreachable, claim failed)."""


# ----------------------------------------------------------------- durable state


@dataclass
class VaultClaim:
    """What a run did about one Vault."""

    vault: str
    status: str  # claimed | nothing | below_multiple | insolvent | failed
    epoch: int = 0
    cumulative: int = 0
    claimed_before: int = 0
    amount: int = 0  # claimed now, or claimable when not claimed
    threshold: int = 0
    fees: int = 0
    message: str = ""
    trace: Trace | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "trace"}
        if self.trace is not None:
            d["tx"] = self.trace.root.hash.hex()
        for k in ("cumulative", "claimed_before", "amount", "threshold", "fees"):
            d[k] = str(d[k])
        return d


@dataclass
class ClaimRun:
    """The outcome of one run: the voucher fetched (if any), its refusal (if refused),
    and one entry per Vault with a kept voucher."""

    status: str = "ok"  # ok | busy | no_provider | no_owner | error (the matcher failed)
    fetched: dict[str, Any] | None = None
    refused: str | None = None
    vaults: list[VaultClaim] = field(default_factory=list)
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "error" or any(v.status == "failed" for v in self.vaults)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "fetched": self.fetched,
            "refused": self.refused,
            "vaults": [v.to_json() for v in self.vaults],
        }


@dataclass(frozen=True)
class _ProviderInfo:
    owner: Address
    registry: Address


class Claimer:
    """Fetches, checks and claims payout vouchers for one Provider (see the module doc).

    ``wallet`` is the Provider's owner wallet (``address`` and ``transfer``); ``client``
    the chain adapter; ``multiple`` the fee multiple below which a run does not claim.
    """

    def __init__(
        self,
        *,
        client: ToncenterClient,
        wallet: Any,
        provider: Address | str,
        matcher: str,
        state_dir: Path,
        multiple: float = DEFAULT_MULTIPLE,
        claim_fee: int = CLAIM_FEE,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.client = client
        self.wallet = wallet
        self.provider = Address(provider) if isinstance(provider, str) else provider
        self.matcher = matcher.rstrip("/")
        self.state_dir = state_dir
        self.multiple = multiple
        self.claim_fee = claim_fee
        self.timeout = timeout
        self._session = session
        self._own_session = session is None
        self._info: _ProviderInfo | None = None
        self._vaults_ok: set[str] = set()  # vaults whose code and registry were checked

    @property
    def threshold(self) -> int:
        return int(self.multiple * self.claim_fee)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
            self._own_session = True
        return self._session

    # -- the run -------------------------------------------------------------------

    async def run_once(self, *, force: bool = False) -> ClaimRun:
        """One run: fetch, check, claim if worth it (``force``: whatever the multiple).
        Raises nothing for a refused voucher or a failed claim (see ``ClaimRun``);
        raises ClaimError when the matcher or the chain cannot be reached."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return ClaimRun("busy", message="another claim is running (the node's loop?)")
            try:
                return await self._run(force)
            except (ToncenterError, getters.GetterError, aiohttp.ClientError, TimeoutError) as e:
                raise ClaimError(f"{type(e).__name__}: {e}") from e
        finally:
            os.close(lock)  # releases the lock

    async def review(self) -> tuple[dict[str, KeptVoucher], str | None]:
        """The best voucher per Vault (the one fetched if it passes every check, else the
        one kept) and why the fetched one was refused, if it was. Claims nothing, saves
        nothing, needs no wallet (``imago provider earnings``). Raises ClaimError."""
        try:
            info = await self._provider_info()
            state = ClaimState.load(self.state_dir, self.provider)
            doc = await self._fetch()
            refused = None
            if info is None:
                refused = f"the Provider {raw_address(self.provider)} is not deployed"
            elif doc is not None:
                try:
                    vault, kept = await self._check(doc, state, info)
                    state.vouchers[vault] = kept
                except VoucherRefused as e:
                    refused = str(e)
            return state.vouchers, refused
        except (ToncenterError, getters.GetterError, aiohttp.ClientError, TimeoutError) as e:
            raise ClaimError(f"{type(e).__name__}: {e}") from e

    async def _run(self, force: bool) -> ClaimRun:
        run = ClaimRun()
        info = await self._provider_info()
        if info is None:
            run.status = "no_provider"
            run.message = f"the Provider {raw_address(self.provider)} is not deployed (yet)"
            log.info("%s: nothing to claim", run.message)
            return run
        if info.owner != self.wallet.address:
            run.status = "no_owner"
            run.message = (
                f"the wallet {raw_address(self.wallet.address)} is not the owner "
                f"{raw_address(info.owner)} of the Provider {raw_address(self.provider)}: "
                "it cannot claim"
            )
            log.error("%s", run.message)
            return run
        state = ClaimState.load(self.state_dir, self.provider)
        try:
            run.fetched = await self._fetch()
        except (ClaimError, aiohttp.ClientError, TimeoutError) as e:
            # The matcher is down: what it released before is still claimed.
            run.status, run.message = "error", f"the matcher's voucher is unavailable: {e}"
            log.warning("%s", run.message)
        if run.fetched is not None:
            try:
                vault, kept = await self._check(run.fetched, state, info)
            except VoucherRefused as e:
                run.refused = str(e)
                log.error("payout voucher refused: %s", e)
                state.refused.append(
                    {
                        "at": int(time.time()),
                        "reason": str(e),
                        "epoch": run.fetched.get("epoch"),
                        "cumulative": run.fetched.get("cumulative"),
                        "vault": run.fetched.get("vault"),
                    }
                )
                state.save()
            else:
                before = state.vouchers.get(vault)
                if before is None or (kept.epoch, kept.cumulative) != (
                    before.epoch,
                    before.cumulative,
                ):
                    state.vouchers[vault] = kept
                    state.save()  # before any claim: the best voucher survives a crash
                    log.info(
                        "payout voucher of epoch %d accepted: %d nanoTON in all",
                        kept.epoch,
                        kept.cumulative,
                    )
        for vault, kept in state.vouchers.items():
            run.vaults.append(await self._claim(state, vault, kept, force))
        return run

    async def _provider_info(self) -> _ProviderInfo | None:
        """The Provider's owner and registry (None while it is not deployed)."""
        if self._info is None:
            account = await self.client.get_address_information(self.provider)
            if account.state != "active":
                return None
            p = await getters.get_provider_data(self.client, self.provider)
            self._info = _ProviderInfo(p.owner, p.registry)
        return self._info

    async def _fetch(self) -> dict[str, Any] | None:
        url = f"{self.matcher}/v1/ledger/payouts/{raw_address(self.provider)}"
        async with self._http().get(url) as r:
            if r.status == 404:
                return None  # nothing released for this provider yet
            if r.status != 200:
                raise ClaimError(f"GET {url}: HTTP {r.status}: {(await r.text())[:200]}")
            try:
                doc = await r.json(content_type=None)
            except ValueError as e:
                raise ClaimError(f"GET {url}: not JSON ({e})") from e
        if not isinstance(doc, dict):
            raise ClaimError(f"GET {url}: not a JSON object")
        return doc

    async def _check(
        self, doc: dict[str, Any], state: ClaimState, info: _ProviderInfo
    ) -> tuple[str, KeptVoucher]:
        """The Vault and the voucher to keep, or VoucherRefused."""
        try:
            boc = base64.b64decode(doc["voucher"], validate=True)
            signature = bytes.fromhex(doc["signature"])
            voucher, cell_hash = PayoutVoucher.parse_boc(boc)
        except (KeyError, TypeError, ValueError, binascii.Error, SignedObjectError) as e:
            raise VoucherRefused(f"malformed voucher: {e}") from e
        vault = raw_address(voucher.vault)
        if voucher.provider != self.provider:
            raise VoucherRefused(f"voucher for another provider {raw_address(voucher.provider)}")
        if voucher.hash != cell_hash:
            raise VoucherRefused("voucher cell is not in canonical form")
        try:
            said = (raw_address(doc["vault"]), raw_address(doc["provider"]), int(doc["epoch"]))
            said_cumulative = int(doc["cumulative"])
        except Exception as e:  # pytoniq raises bare errors on bad addresses
            raise VoucherRefused(f"malformed voucher fields: {e}") from e
        if said != (vault, raw_address(self.provider), voucher.epoch) or said_cumulative != (
            voucher.cumulative
        ):
            raise VoucherRefused("the JSON fields differ from the signed voucher")
        await self._check_vault(vault, info)
        v = await getters.get_vault_data(self.client, vault)
        if not signature_valid(signature, cell_hash, v.operator_key.to_bytes(32, "big")):
            raise VoucherRefused(
                f"operator signature does not verify under the Vault's operatorKey "
                f"(epoch {voucher.epoch}, {voucher.cumulative} nanoTON)"
            )
        if not 1 <= voucher.epoch <= v.last_epoch:
            raise VoucherRefused(
                f"epoch {voucher.epoch} is not committed on-chain (the Vault's last epoch "
                f"is {v.last_epoch})"
            )
        best = state.vouchers.get(vault)
        if best is not None:
            if voucher.cumulative < best.cumulative:
                raise VoucherRefused(
                    f"lowered: {voucher.cumulative} nanoTON (epoch {voucher.epoch}) is below "
                    f"the {best.cumulative} of the voucher kept from epoch {best.epoch}"
                )
            if voucher.epoch < best.epoch:
                raise VoucherRefused(
                    f"replayed: epoch {voucher.epoch} is older than the kept epoch {best.epoch}"
                )
            if voucher.epoch == best.epoch and voucher.cumulative != best.cumulative:
                raise VoucherRefused(
                    f"two vouchers for epoch {voucher.epoch}: {best.cumulative} and "
                    f"{voucher.cumulative} nanoTON"
                )
        claimed = await getters.get_provider_claimed(self.client, self.provider, voucher.vault)
        if voucher.cumulative < claimed:
            raise VoucherRefused(
                f"lowered: {voucher.cumulative} nanoTON is below the {claimed} already claimed"
            )
        return vault, KeptVoucher(
            voucher.epoch, voucher.cumulative, boc, signature, int(time.time())
        )

    async def _check_vault(self, vault: str, info: _ProviderInfo) -> None:
        """The Vault runs the code this Provider's Registry deploys vaults with, and
        belongs to that Registry (a Vault does not change: checked once)."""
        if vault in self._vaults_ok:
            return
        account = await self.client.get_address_information(vault)
        if account.state != "active" or account.code is None:
            raise VoucherRefused(f"the Vault {vault} is not deployed ({account.state})")
        registry = await getters.get_registry_data(self.client, info.registry)
        if account.code.hash != registry.vault_code_hash:
            raise VoucherRefused(f"{vault} does not run the Registry's vault code")
        v = await getters.get_vault_data(self.client, vault)
        if v.registry != info.registry:
            raise VoucherRefused(f"the Vault {vault} belongs to another Registry")
        self._vaults_ok.add(vault)

    async def _claim(self, state: ClaimState, vault: str, kept: KeptVoucher, force: bool):
        result = VaultClaim(vault, "nothing", kept.epoch, kept.cumulative)
        result.threshold = 0 if force else self.threshold
        claimed = await getters.get_provider_claimed(self.client, self.provider, Address(vault))
        result.claimed_before = claimed
        result.amount = max(0, kept.cumulative - claimed)
        if result.amount == 0:
            return result
        if result.amount <= result.threshold:
            result.status = "below_multiple"
            result.message = (
                f"{result.amount} nanoTON unclaimed, not above {self.multiple:g} × the claim "
                f"fee ({result.threshold} nanoTON)"
            )
            log.debug("%s", result.message)
            return result
        v = await getters.get_vault_data(self.client, vault)
        if v.payable < result.amount or kept.cumulative > v.committed_paid:
            result.status = "insolvent"
            result.message = (
                f"the Vault can pay {v.payable} nanoTON (its last commit up to "
                f"{v.committed_paid} in all), less than the {result.amount} owed; not "
                "claiming (it would be refused)"
            )
            log.warning("%s", result.message)
            return result
        voucher = kept.parsed()
        log.info(
            "claiming %d nanoTON (epoch %d, %d in all) from %s",
            result.amount,
            kept.epoch,
            kept.cumulative,
            vault,
        )
        try:
            trace = await operations.provider_claim(
                self.wallet, self.provider, voucher, kept.signature, timeout=self.timeout
            )
        except operations.OperationFailed as e:
            result.status, result.message = "failed", str(e)
            result.fees, result.trace = e.trace.total_fees, e.trace
            log.error("claim of epoch %d failed: %s", kept.epoch, e)
            return result
        except (WalletError, ToncenterError, TimeoutError) as e:
            result.status, result.message = "failed", f"{type(e).__name__}: {e}"
            log.error("claim of epoch %d not sent or not seen: %s", kept.epoch, e)
            return result
        result.status = "claimed"
        result.fees, result.trace = trace.total_fees, trace
        state.claims.append(
            {
                "at": int(time.time()),
                "vault": vault,
                "epoch": kept.epoch,
                "cumulative": str(kept.cumulative),
                "amount": str(result.amount),
                "fees": str(trace.total_fees),
                "tx": trace.root.hash.hex(),
            }
        )
        state.save()
        log.info("claimed %d nanoTON from %s (fees %d)", result.amount, vault, trace.total_fees)
        return result


# ----------------------------------------------------------------- in the node service
