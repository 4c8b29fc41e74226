"""The settlement service: epochs built and committed, escrows charged, with nobody
pressing a button. APScheduler runs ``tick`` on the matcher's scheduler.

Each tick, on the replica that holds the settlement lease:
1. reads the Escrows that owe something (state, on-chain charge), at most every
   ``escrow_poll_s``;
2. builds an epoch when one is due, or at once when a closing Escrow has jobs no epoch
   holds (its client must be charged for them before the close delay ends);
3. sends every built epoch's stored commit until the Vault holds it, then publishes
   its payout vouchers (invariant 6). The commit goes as an external message the Vault
   pays for out of the operator's accrued protocol fees while those cover it (no wallet
   transaction, no forward fee, no excess), else from the operator's wallet;
4. charges each Escrow with the voucher of its latest committed leaf when what is
   uncharged passes the threshold, or at once when the Escrow is closing.

Durable and idempotent: everything it decides is in the database before it reaches
the chain, and the chain's counters (the Vault's last epoch, each Escrow's cumulative
charge) say what already happened. After a kill -9 anywhere, the next tick reads them
and resends only what the chain lacks; a resent commit or charge the chain already
holds is refused there and moves nothing.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address
from sqlalchemy import Connection, func, select, update

from contracts.chain import addresses, getters, operations
from contracts.chain.results import ToncenterError
from contracts.chain.toncenter import ToncenterClient
from contracts.chain.transactions import Trace
from contracts.chain.wallet import Wallet, WalletError
from marketplace.config import SettlementConfig
from marketplace.db import (
    ChargeRecord,
    EpochRecord,
    LeafRecord,
    LeaseRecord,
    SpendVoucherRecord,
    now_ms,
    read_connection,
)
from marketplace.ledger import Ledger
from marketplace.settlement.epochs import (
    BuiltEpoch,
    EpochConflict,
    EpochPlan,
    plan_epoch,
    write_epoch,
)
from protocol.signed import EpochCommit, SpendVoucher

__all__ = ["SettlementError", "SettlementService"]

log = logging.getLogger(__name__)

BEYOND_WHAT_IT_CAN_PAY = 318  # the Vault refuses a commit whose payouts it could not pay

EPOCHS = EpochRecord.__table__
LEAVES = LeafRecord.__table__
CHARGES = ChargeRecord.__table__
VOUCHERS = SpendVoucherRecord.__table__
LEASES = LeaseRecord.__table__


class SettlementError(RuntimeError):
    """The settlement service cannot run against this chain and Vault."""


@dataclass
class _Backoff:
    failures: int = 0
    retry_at: float = 0.0

    def failed(self, config: SettlementConfig) -> None:
        self.failures += 1
        self.retry_at = time.monotonic() + _retry_delay(config, self.failures)

    def ready(self) -> bool:
        return time.monotonic() >= self.retry_at


class SettlementService:
    def __init__(
        self,
        config: SettlementConfig,
        ledger: Ledger,
        chain: ToncenterClient,
        wallet: Wallet,
        operator_key: Ed25519PrivateKey,
        vault: str,
        instance: str,
        global_id: int,
    ) -> None:
        self.config = config
        self.global_id = global_id  # the network its commits and payout vouchers name
        self.ledger = ledger
        self.chain = chain
        self.wallet = wallet
        self.operator_key = operator_key
        self.vault = Address(vault).to_str(is_user_friendly=False)
        self.instance = instance
        self.fee_bps = 0
        # what an external commit costs the operator's fees on this Vault (None: its code
        # has no external commits, every commit goes from the wallet)
        self.external_commit_fee: int | None = None
        self.started = time.time()
        self._commit_backoff = _Backoff()
        self._polled_at = 0.0
        self._lock = asyncio.Lock()
        # what this process sent: the last few (tests) and the totals (/metrics, benchmarks)
        self.submitted: deque[str] = deque(maxlen=256)
        self.transactions: Counter[str] = Counter()
        self.fees: Counter[str] = Counter()
        self.commit_paths: Counter[str] = Counter()  # "external" / "wallet"

    async def start(self) -> None:
        """Refuse a Vault whose operator key is not ours: its commits would all fail."""
        vault = await getters.get_vault_data(self.chain, Address(self.vault))
        public = int.from_bytes(self.operator_key.public_key().public_bytes_raw(), "big")
        if vault.operator_key != public:
            raise SettlementError(
                f"the Vault {self.vault} is operated by key {vault.operator_key:064x}, "
                f"not by the operator key given ({public:064x})"
            )
        self.fee_bps = vault.protocol_fee_bps
        try:
            self.external_commit_fee = await getters.get_vault_external_commit_fee(
                self.chain, Address(self.vault)
            )
        except getters.GetterError:
            log.info("the Vault %s takes no external commits: committing from the wallet",
                     self.vault)  # fmt: skip
            self.external_commit_fee = None

    # --- the tick ----------------------------------------------------------------------

    async def tick(self) -> None:
        async with self._lock:  # APScheduler's max_instances, and run_once from tests
            if not await self.ledger.call(self._take_lease):
                return
            try:
                await self._settle()
            except (ToncenterError, OSError, TimeoutError) as e:
                log.warning("settlement: the chain did not answer: %s", e)

    async def run_once(self, *, force_epoch: bool = False) -> BuiltEpoch | None:
        """One full pass now (``imago matcher settle``, tests, the benchmark)."""
        async with self._lock:
            if not await self.ledger.call(self._take_lease):
                return None
            return await self._settle(force_epoch=force_epoch)

    async def _settle(self, *, force_epoch: bool = False) -> BuiltEpoch | None:
        await self._confirm_commits()
        closing_behind = await self._poll_escrows()
        built = None
        if force_epoch or closing_behind or await self._epoch_due():
            built = await self._build()
            if built is not None:
                log.info(
                    "epoch %d built: %d jobs, %d leaves, charged %d, earned %d",
                    built.epoch, built.jobs, built.leaves, built.epoch_charged,
                    built.epoch_earned,
                )  # fmt: skip
            await self._confirm_commits()
        await self._charge()
        return built

    async def _build(self) -> BuiltEpoch | None:
        """Plan the epoch on a connection of its own, off the event loop (reading and
        hashing every job takes seconds for 100,000 of them), then write it through the
        ledger's writer in one short transaction: relayed jobs never wait for it."""

        def plan() -> EpochPlan | None:
            with read_connection(self.ledger.engine) as conn:
                return plan_epoch(
                    conn, vault=self.vault, fee_bps=self.fee_bps,
                    operator_key=self.operator_key, global_id=self.global_id,
                )  # fmt: skip

        planned = await asyncio.to_thread(plan)
        if planned is None:
            return None
        try:
            return await self.ledger.call(lambda c: write_epoch(c, planned))
        except EpochConflict as e:  # the next tick plans again
            log.warning("epoch not written: %s", e)
            return None

    async def _epoch_due(self) -> bool:
        last = await self.ledger.call(
            lambda c: c.execute(select(func.max(EPOCHS.c.built_at))).scalar_one()
        )
        since = (last / 1000) if last else self.started
        return time.time() - since >= self.config.epoch_s

    def _sent(self, kind: str, what: str, trace: Trace) -> None:
        self.submitted.append(what)
        self.transactions[kind] += len(trace)
        self.fees[kind] += trace.total_fees

    # --- the lease ---------------------------------------------------------------------

    def _take_lease(self, conn: Connection) -> bool:
        """One settlement leader among replicas: a row lock decides, the lease expires
        if its holder stops renewing it."""
        now = now_ms()
        expires = now + int(self.config.lease_s * 1000)
        row = conn.execute(
            select(LEASES).where(LEASES.c.name == "settlement").with_for_update()
        ).first()
        if row is None:
            conn.execute(LEASES.insert().values(name="settlement", holder=self.instance,
                                                expires_at=expires))  # fmt: skip
            return True
        if row.holder != self.instance and row.expires_at > now:
            return False
        conn.execute(
            update(LEASES)
            .where(LEASES.c.name == "settlement")
            .values(holder=self.instance, expires_at=expires)
        )
        return True

    # --- epochs ------------------------------------------------------------------------

    async def _confirm_commits(self) -> None:
        built = await self.ledger.call(
            lambda c: c.execute(
                select(EPOCHS).where(EPOCHS.c.state == "built").order_by(EPOCHS.c.epoch)
            ).all()
        )
        for epoch in built:
            vault = await getters.get_vault_data(self.chain, Address(self.vault))
            if vault.last_epoch >= epoch.epoch:
                if vault.last_epoch == epoch.epoch and vault.last_root.hex() != epoch.root:
                    log.critical(
                        "the Vault holds another root for epoch %d (%s, ours %s): is the "
                        "operator key used elsewhere?", epoch.epoch, vault.last_root.hex(),
                        epoch.root,
                    )  # fmt: skip
                    return
                await self._mark_committed(epoch.epoch, None)
                continue
            if vault.last_epoch != epoch.epoch - 1:
                log.error("the Vault is at epoch %d; epoch %d cannot follow it",
                          vault.last_epoch, epoch.epoch)  # fmt: skip
                return
            if not self._commit_backoff.ready():
                return
            commit = EpochCommit.from_boc(base64.b64decode(epoch.commit_boc))
            signature = bytes.fromhex(epoch.commit_signature)
            try:
                try:
                    trace = await self._commit(vault, commit, signature)
                except operations.OperationFailed as e:
                    if BEYOND_WHAT_IT_CAN_PAY not in e.exit_codes:
                        raise
                    # The payouts it commits need more than the Vault holds (its charges
                    # less fees, plus its stake): charge what is owed now, whatever the
                    # threshold, then commit.
                    log.info("epoch %d needs the escrows charged first", epoch.epoch)
                    await self._charge(threshold=1)
                    vault = await getters.get_vault_data(self.chain, Address(self.vault))
                    trace = await self._commit(vault, commit, signature)
            except (operations.OperationFailed, ToncenterError, WalletError, TimeoutError) as e:
                self._commit_backoff.failed(self.config)
                log.warning("epoch %d: commit failed (%s); retrying", epoch.epoch, e)
                return
            self._commit_backoff = _Backoff()
            self._sent("commit", f"commit:{epoch.epoch}", trace)
            await self._mark_committed(epoch.epoch, _tx_on(trace, self.vault))
            log.info("epoch %d committed on the Vault", epoch.epoch)

    async def _commit(
        self, vault: getters.VaultData, commit: EpochCommit, signature: bytes
    ) -> Trace:
        """Send one commit: as an external message when the operator's fees on the Vault
        pay for it, else (or when the Vault refuses it for anything but the epoch) from
        the wallet. A refusal happens before the Vault accepts the message: it costs
        nothing. A resent commit the Vault already holds is refused either way (310)."""
        if self._external_pays(vault):
            try:
                trace = await operations.vault_commit_epoch_external(
                    self.chain, Address(self.vault), commit, signature
                )
            except operations.OperationFailed as e:
                if operations.WRONG_EPOCH in e.exit_codes:
                    raise  # another commit got there first: the next tick reads the Vault
                log.warning("epoch %d: the Vault refused the external commit (%s); "
                            "committing from the wallet", commit.epoch, e)  # fmt: skip
            else:
                self.commit_paths["external"] += 1
                return trace
        trace = await operations.vault_commit_epoch(self.wallet, Address(self.vault), commit,
                                                    signature)  # fmt: skip
        self.commit_paths["wallet"] += 1
        return trace

    def _external_pays(self, vault: getters.VaultData) -> bool:
        """The Vault's rule for an external commit, on its getter: the operator's
        unwithdrawn fees cover the fee, and the balance holds it beyond the reserve and
        everything owed to others. The Vault checks the balance after this message's
        import and storage fees: when those tip it, it refuses (for nothing) and
        :meth:`_commit` falls back to the wallet."""
        fee = self.external_commit_fee
        if fee is None:
            return False
        others = vault.stake + vault.charged_in - vault.fees_accrued - vault.paid_out
        reserve = addresses.STORAGE_RESERVES["vault"]
        return (
            vault.fees_accrued - vault.fees_withdrawn >= fee
            and vault.balance >= reserve + others + fee
        )

    async def _mark_committed(self, epoch: int, tx_hash: str | None) -> None:
        values = {"state": "committed", "committed_at": now_ms()}
        if tx_hash:
            values["tx_hash"] = tx_hash
        await self.ledger.call(
            lambda c: c.execute(update(EPOCHS).where(EPOCHS.c.epoch == epoch).values(values))
        )

    # --- escrows -----------------------------------------------------------------------

    async def _poll_escrows(self) -> bool:
        """Read every Escrow with a voucher; True if one is closing with jobs no
        epoch holds yet (then an epoch is built now)."""
        if time.monotonic() - self._polled_at < self.config.escrow_poll_s:
            return False
        self._polled_at = time.monotonic()
        escrows = await self.ledger.call(
            lambda c: c.execute(select(VOUCHERS.c.escrow, VOUCHERS.c.cumulative)).all()
        )
        behind = False
        for escrow, cumulative in escrows:
            data = await getters.get_escrow_data(self.chain, Address(escrow))
            await self.ledger.call(lambda c, e=escrow, d=data: _save_escrow(c, e, d))
            if data.state_name == "closing":
                committed = await self.ledger.call(lambda c, e=escrow: _committed_leaf(c, e))
                held = committed.cumulative if committed is not None else 0
                behind = behind or int(cumulative) > int(held)
        return behind

    async def _charge(self, threshold: int | None = None) -> None:
        """Every charge due (owing ``threshold`` or more, the setting by default), in as
        few wallet transfers as possible (one for up to ``MAX_BATCH``): the wallet's own
        transaction is paid once, not per Escrow."""
        limit = self.config.charge_threshold if threshold is None else threshold
        due = await self.ledger.call(lambda c: _charges_due(c, limit))
        for start in range(0, len(due), operations.MAX_BATCH):
            batch = [
                (Address(escrow), SpendVoucher.from_boc(base64.b64decode(leaf.voucher_boc)),
                 bytes.fromhex(leaf.voucher_signature), escrow)
                for escrow, leaf in due[start : start + operations.MAX_BATCH]
            ]  # fmt: skip
            try:
                trace = await operations.escrow_charges(self.wallet, [b[:3] for b in batch])
            except (ToncenterError, WalletError, TimeoutError) as e:
                for *_, escrow in batch:
                    await self.ledger.call(lambda c, e_=escrow: _charge_failed(c, e_, self.config))
                log.warning("%d charges not sent (%s); retrying", len(batch), e)
                continue
            self._sent("charge", f"charges:{len(batch)}", trace)
            for address, voucher, _, escrow in batch:
                data = await getters.get_escrow_data(self.chain, address)
                tx = _tx_on(trace, escrow)
                await self.ledger.call(
                    lambda c, e_=escrow, d=data, v=voucher, h=tx: _charge_done(
                        c, e_, d, v.cumulative, h, self.config
                    )
                )
                if data.charged < voucher.cumulative:
                    log.warning("escrow %s: charged %d on-chain after a charge to %d",
                                escrow, data.charged, voucher.cumulative)  # fmt: skip


# --- database steps (run on the ledger's writer, each one transaction) -------------------


def _save_escrow(conn: Connection, escrow: str, data: getters.EscrowData) -> None:
    values = {
        "charged": data.charged,
        "state": data.state_name,
        "unlock_time": data.unlock_time,
        "checked_at": now_ms(),
    }
    done = conn.execute(update(CHARGES).where(CHARGES.c.escrow == escrow).values(values))
    if not done.rowcount:
        conn.execute(CHARGES.insert().values(escrow=escrow, **values))


def _committed_leaf(conn: Connection, escrow: str):
    """The escrow's leaf in its latest committed epoch (with the voucher to charge)."""
    return conn.execute(
        select(LEAVES)
        .join(EPOCHS, EPOCHS.c.epoch == LEAVES.c.epoch)
        .where(
            LEAVES.c.kind == "escrow",
            LEAVES.c.address == escrow,
            EPOCHS.c.state == "committed",
            LEAVES.c.voucher_boc.is_not(None),
        )
        .order_by(LEAVES.c.epoch.desc())
        .limit(1)
    ).first()


def _charges_due(conn: Connection, threshold: int) -> list:
    now = now_ms()
    due = []
    for charge in conn.execute(select(CHARGES).where(CHARGES.c.retry_at <= now)).all():
        leaf = _committed_leaf(conn, charge.escrow)
        if leaf is None:
            continue
        owed = int(leaf.cumulative) - int(charge.charged)
        if owed > 0 and (owed >= threshold or charge.state == "closing"):
            due.append((charge.escrow, leaf))
    return due


def _charge_done(
    conn: Connection,
    escrow: str,
    data: getters.EscrowData,
    cumulative: int,
    tx_hash: str | None,
    config: SettlementConfig,
) -> None:
    _save_escrow(conn, escrow, data)
    values: dict = {"submitted": cumulative, "tx_hash": tx_hash}
    if data.charged >= cumulative:
        values.update(failures=0, retry_at=0)
    conn.execute(update(CHARGES).where(CHARGES.c.escrow == escrow).values(values))
    if data.charged < cumulative:  # refused on-chain (closed and withdrawn, or short)
        _charge_failed(conn, escrow, config)


def _charge_failed(conn: Connection, escrow: str, config: SettlementConfig) -> None:
    """Count one more failure and wait before the next try, longer each time."""
    row = conn.execute(select(CHARGES.c.failures).where(CHARGES.c.escrow == escrow)).first()
    failures = (row.failures if row else 0) + 1
    retry_at = now_ms() + int(_retry_delay(config, failures) * 1000)
    conn.execute(
        update(CHARGES)
        .where(CHARGES.c.escrow == escrow)
        .values(failures=failures, retry_at=retry_at)
    )


def _retry_delay(config: SettlementConfig, failures: int) -> float:
    return min(config.retry_max_s, config.retry_min_s * 2 ** (failures - 1))


def _tx_on(trace: Trace, account: str) -> str | None:
    """The hash of the trace's transaction on ``account`` (the Vault, the Escrow)."""
    for tx in trace:
        if Address(tx.account).to_str(is_user_friendly=False) == account:
            return tx.hash.hex()
    return None
