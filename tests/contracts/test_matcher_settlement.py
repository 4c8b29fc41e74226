"""The matcher's settlement service against the real TVM: epochs built and committed,
escrows charged, payout vouchers claimable, every account exact to the nanoton, and a
restart at any step never double-submits nor loses a leaf.

Jobs are put in the matcher's ledger the way the relay and the voucher endpoint put
them (signed receipts, a client-signed voucher listing each job's amount); the model
and the relay are not needed to settle them.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytoniq_core import Address
from sqlalchemy import select

from contracts.chain import getters, operations
from contracts.chain.messages.capabilities import Capabilities, ModelPrice
from marketplace.config import SettlementConfig
from marketplace.db import EpochRecord, JobRecord, JobStatus, make_engine
from marketplace.ledger import Ledger, VoucherUpdate
from marketplace.settlement.epochs import build_epoch
from marketplace.settlement.publication import READ_ENGINE, add_routes
from marketplace.settlement.service import SettlementService
from protocol.errors import error_middleware
from protocol.ledger import (
    EscrowLeaf,
    ProofStep,
    ProviderLeaf,
    fee_of,
    merkle_root,
    records_auth_message,
    verify_proof,
)
from protocol.ledger import (
    JobRecord as LedgerJob,
)
from protocol.signed import DEVNET_GLOBAL_ID, PayoutVoucher, Receipt, SpendVoucher, model_hash
from tests.contracts.conftest import TON, Key

MODEL = "settle-model"
PRICES = (20_000_000, 60_000_000)


def raw(a: Address) -> str:
    return a.to_str(is_user_friendly=False)


class World:
    """A Vault of its own (a fresh operator key), one staked Provider with its node key,
    a client's Escrow, and a matcher database."""

    def __init__(self, chain, contracts_set, tmp_path: Path) -> None:
        self.chain, self.cs, self.tmp = chain, contracts_set, tmp_path
        self.node, self.spend, self.operator_key = Key(), Key(), Key()
        self.cumulative = 0
        self.engine = make_engine(f"sqlite:///{tmp_path / 'matcher.db'}")
        self.ledger = Ledger(self.engine, "settle-test")

    async def setup(self, make_wallet) -> None:
        self.vault = await operations.deploy_vault(
            self.cs.operator, self.cs.registry, self.operator_key.int, 5 * TON, client=self.chain
        )
        self.owner = await make_wallet(50 * TON)
        caps = Capabilities("cpu", 0, 0, "local", (ModelPrice(model_hash(MODEL), *PRICES),))
        self.provider, _ = await operations.register_provider(
            self.owner, self.chain, self.cs.registry, self.node.public, 3 * TON, caps,
            seq=int.from_bytes(os.urandom(3), "big"),
        )  # fmt: skip
        self.client = await make_wallet(50 * TON)
        vault = await getters.get_vault_data(self.chain, self.vault)
        self.escrow, _ = await operations.escrow_open(
            self.client, self.vault, self.spend.public, 10 * TON, vault.escrow_close_delay
        )
        await self.ledger.start()
        await self.ledger.save_node(
            {"node_id": self.node.public.hex(), "url": "http://node", "x25519_public": "",
             "attestation_kind": "dev", "provider": raw(self.provider)}
        )  # fmt: skip

    def service(self, **overrides) -> SettlementService:
        settings = {"epoch_s": 3600, "charge_threshold": 1, "tick_s": 1, "escrow_poll_s": 0}
        config = SettlementConfig(
            operator_wallet=Path("unused"), operator_key=Path("unused"),
            **{**settings, **overrides},
        )  # fmt: skip
        return SettlementService(
            config, self.ledger, self.chain, self.cs.operator, self.operator_key.private,
            raw(self.vault), "settle-test", DEVNET_GLOBAL_ID,
        )  # fmt: skip

    async def job(self, completion_tokens: int = 100) -> tuple[str, int]:
        """A completed job with its node-signed receipt, as the relay records it."""
        job_id = os.urandom(32)
        receipt = Receipt(
            global_id=DEVNET_GLOBAL_ID, escrow=self.escrow,
            job_id=int.from_bytes(job_id, "big"), time=int(time.time()),
            model=model_hash(MODEL), prompt_tokens=10, completion_tokens=completion_tokens,
            price_prompt=PRICES[0], price_completion=PRICES[1], amount=0,
            request_hash=bytes(32), response_hash=bytes(32),
        )  # fmt: skip
        receipt = dataclasses.replace(receipt, amount=receipt.priced_amount)
        boc, digest = receipt.encode()
        await self.ledger.open_job(
            {"job_id": job_id.hex(), "model": MODEL, "escrow": raw(self.escrow),
             "node_id": self.node.public.hex()}
        )  # fmt: skip
        await self.ledger.close_job(
            job_id.hex(), JobStatus.COMPLETED, prompt_tokens=10,
            completion_tokens=completion_tokens, amount=receipt.amount,
            receipt_boc=base64.b64encode(boc).decode(),
            receipt_signature=self.node.private.sign(digest).hex(),
        )  # fmt: skip
        return job_id.hex(), receipt.amount

    async def pay(self, jobs: list[tuple[str, int]]) -> SpendVoucher:
        """The client's voucher for these jobs, through the matcher's voucher path."""
        self.cumulative += sum(a for _, a in jobs)
        voucher = SpendVoucher(DEVNET_GLOBAL_ID, self.escrow, self.vault, self.cumulative)
        await self.ledger.submit_voucher(
            VoucherUpdate(
                escrow=raw(self.escrow), vault=raw(self.vault),
                spend_public=self.spend.public.hex(), cumulative=self.cumulative,
                voucher_boc=base64.b64encode(voucher.to_boc()).decode(),
                signature=self.spend.sign(voucher).hex(), jobs=dict(jobs),
            )
        )  # fmt: skip
        return voucher

    async def epochs(self) -> list:
        return await self.ledger.call(
            lambda c: c.execute(select(EpochRecord.__table__).order_by("epoch")).all()
        )

    async def close(self) -> None:
        await self.ledger.stop()
        self.engine.dispose()


@pytest.fixture
async def world(chain, contracts_set, make_wallet, tmp_path):
    w = World(chain, contracts_set, tmp_path)
    await w.setup(make_wallet)
    yield w
    await w.close()


async def test_an_epoch_settles_exactly(world: World, chain) -> None:

    vault_before = await getters.get_vault_data(chain, world.vault)
    jobs = [await world.job(n) for n in (50, 120, 7)]
    voucher = await world.pay(jobs)
    service = world.service()
    await service.start()
    built = await service.run_once(force_epoch=True)
    assert built is not None and built.jobs == 3 and built.leaves == 2

    vault = await getters.get_vault_data(chain, world.vault)
    (epoch,) = await world.epochs()
    assert epoch.state == "committed" and epoch.tx_hash
    assert vault.last_epoch == vault_before.last_epoch + 1 == epoch.epoch
    assert vault.last_root.hex() == epoch.root
    # the escrow's on-chain charge equals what the client signed for its jobs
    escrow = await getters.get_escrow_data(chain, world.escrow)
    assert escrow.charged == voucher.cumulative == sum(a for _, a in jobs)
    assert vault.charged_in - vault_before.charged_in == voucher.cumulative
    earned = sum(a - fee_of(a, vault.protocol_fee_bps) for _, a in jobs)
    assert int(epoch.epoch_earned) == earned and int(epoch.epoch_charged) == voucher.cumulative

    # the provider claims its payout voucher: its owner's wallet rises by it, less fees
    payout = await world.ledger.call(
        lambda c: c.execute(select(JobRecord.__table__.c.epoch)).scalars().all()
    )
    assert set(payout) == {epoch.epoch}
    voucher_row = await world.ledger.call(
        lambda c: c.exec_driver_sql("select voucher_boc, signature from payout_vouchers").first()
    )
    pv = PayoutVoucher.from_boc(base64.b64decode(voucher_row[0]))
    assert pv.cumulative == earned and pv.provider == world.provider
    before = await world.owner.balance()
    trace = await operations.provider_claim(
        world.owner, world.provider, pv, bytes.fromhex(voucher_row[1])
    )
    after = await world.owner.balance()
    assert 0 < earned - (after - before) <= trace.total_fees + TON // 100
    vault = await getters.get_vault_data(chain, world.vault)
    # invariant 3: never more paid out than charged less fees plus the stake
    assert vault.paid_out <= vault.charged_in - vault.fees_accrued + vault.stake
    assert vault.fees_accrued >= vault_before.fees_accrued + (voucher.cumulative - earned) - 3


async def test_a_restart_between_build_and_commit_commits_once(world: World, chain) -> None:
    await world.pay([await world.job(40)])
    service = world.service()
    await service.start()
    # The matcher built the epoch, then died before sending the commit (kill -9).
    built = await world.ledger.call(
        lambda c: build_epoch(c, vault=raw(world.vault), fee_bps=service.fee_bps,
                              operator_key=world.operator_key.private,
                              global_id=DEVNET_GLOBAL_ID)
    )  # fmt: skip
    assert built is not None
    before = await getters.get_vault_data(chain, world.vault)
    restarted = world.service()
    await restarted.start()
    assert await restarted.run_once() is None  # nothing new to build...
    assert restarted.submitted[0] == f"commit:{built.epoch}"  # ...the stored commit is sent
    after = await getters.get_vault_data(chain, world.vault)
    assert after.last_epoch == before.last_epoch + 1 == built.epoch
    # The matcher died again after the commit landed but before it recorded that: the
    # chain's counter says it happened, and nothing is sent twice.
    await world.ledger.call(
        lambda c: c.exec_driver_sql("update epochs set state = 'built', tx_hash = null")
    )
    again = world.service()
    await again.start()
    await again.run_once()
    assert not [s for s in again.submitted if s.startswith("commit")]
    assert [e.state for e in await world.epochs()] == ["committed"]
    # and the charge it owes was sent exactly once, to exactly the voucher's amount
    escrow = await getters.get_escrow_data(chain, world.escrow)
    assert escrow.charged == world.cumulative


async def test_commits_go_external_once_the_vault_has_fees(world: World, chain) -> None:
    """The first epoch is committed from the wallet (the Vault has no fees yet); once its
    charge has accrued the operator's fees, the next epoch goes as an external message
    that those fees pay for: one transaction, no wallet, the fees counter moves by the
    constant, and a resend after a restart sends nothing."""
    service = world.service()
    await service.start()
    assert service.external_commit_fee == operations.EXTERNAL_COMMIT_FEE
    # ~0.24 TON of jobs: 2 % of it (~0.005 TON) pays for one external commit at least
    await world.pay([await world.job(4_000_000)])
    await service.run_once(force_epoch=True)
    assert service.commit_paths == {"wallet": 1}
    assert service.transactions["commit"] == 3  # wallet, Vault, excess back to the wallet
    wallet_fees = service.fees["commit"]
    vault = await getters.get_vault_data(chain, world.vault)
    assert vault.fees_accrued - vault.fees_withdrawn >= operations.EXTERNAL_COMMIT_FEE

    await world.pay([await world.job(4_000_000)])
    await service.run_once(force_epoch=True)
    assert service.commit_paths == {"wallet": 1, "external": 1}
    assert service.transactions["commit"] == 3 + 1  # the Vault's transaction alone
    external_fees = service.fees["commit"] - wallet_fees
    assert 0 < external_fees <= operations.EXTERNAL_COMMIT_FEE < wallet_fees / 2
    after = await getters.get_vault_data(chain, world.vault)
    assert after.fees_withdrawn - vault.fees_withdrawn == operations.EXTERNAL_COMMIT_FEE
    epochs = await world.epochs()
    assert [e.state for e in epochs] == ["committed", "committed"]
    assert after.last_epoch == epochs[-1].epoch and after.last_root.hex() == epochs[-1].root
    assert epochs[-1].tx_hash  # the Vault's transaction
    # every charge it owes is sent, to exactly the voucher's amount
    assert (await getters.get_escrow_data(chain, world.escrow)).charged == world.cumulative

    # a restart that lost the record: the Vault's counter says it happened, nothing is sent
    await world.ledger.call(
        lambda c: c.exec_driver_sql(
            "update epochs set state = 'built', tx_hash = null where epoch = ?",
            (epochs[-1].epoch,),
        )
    )
    again = world.service()
    await again.start()
    await again.run_once()
    assert not [s for s in again.submitted if s.startswith("commit")]
    assert not again.commit_paths
    assert (await getters.get_vault_data(chain, world.vault)).balance == after.balance


async def test_a_refused_external_commit_falls_back_to_the_wallet(
    world: World, chain, caplog
) -> None:
    """Should the service misjudge the Vault's fees (here it believes the Vault, which has
    none, can pay), the Vault refuses the external message before accepting it, which
    costs nothing, and the wallet commits the epoch."""
    service = world.service()
    await service.start()
    service._external_pays = lambda vault: True  # type: ignore[method-assign]
    before = await getters.get_vault_data(chain, world.vault)
    await world.pay([await world.job(100)])
    with caplog.at_level("WARNING"):
        await service.run_once(force_epoch=True)
    assert "311" in caplog.text and "committing from the wallet" in caplog.text
    assert service.commit_paths == {"wallet": 1}
    after = await getters.get_vault_data(chain, world.vault)
    assert after.last_epoch == before.last_epoch + 1
    assert after.fees_withdrawn == before.fees_withdrawn
    assert [e.state for e in await world.epochs()] == ["committed"]


async def test_a_closing_escrow_is_charged_in_full_before_its_delay_ends(
    world: World, chain
) -> None:
    service = world.service(charge_threshold=100 * TON)  # far above what it owes
    await service.start()
    await world.pay([await world.job(30)])
    await service.run_once(force_epoch=True)
    assert (await getters.get_escrow_data(chain, world.escrow)).charged == 0  # below threshold
    # more jobs after the epoch, then the client closes at once
    await world.pay([await world.job(60), await world.job(5)])
    await operations.escrow_close(world.client, world.escrow)
    await service.run_once()  # no epoch is due: the closing escrow forces one
    escrow = await getters.get_escrow_data(chain, world.escrow)
    assert escrow.state_name == "closing" and escrow.charged == world.cumulative
    assert len(await world.epochs()) == 2


async def test_publication(world: World) -> None:
    service = world.service()
    await service.start()
    jobs = [await world.job(n) for n in (11, 22)]
    await world.pay(jobs)
    await service.run_once(force_epoch=True)

    app = web.Application(middlewares=[error_middleware()])
    app[READ_ENGINE] = world.engine
    add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1/ledger"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/epochs") as resp:
                listing = await resp.json()
            epoch = listing["epochs"][-1]
            n = epoch["epoch"]
            async with http.get(f"{url}/epochs/{n}/leaves") as resp:
                page = await resp.json()
            public = repr(listing) + repr(page)
            for job_id, _ in jobs:  # no per-job field in public
                assert job_id not in public
            assert "tokens" not in public and "salt" not in public and "time" not in public
            leaves = [
                (EscrowLeaf if x["kind"] == "escrow" else ProviderLeaf).from_json(x)
                for x in page["leaves"]
            ]
            assert merkle_root([x.hash() for x in leaves]).hex() == epoch["root"]
            charged = sum(x.amount for x in leaves if isinstance(x, EscrowLeaf))
            earned = sum(x.amount for x in leaves if isinstance(x, ProviderLeaf))
            assert charged == int(epoch["epoch_charged"]) and earned == int(epoch["epoch_earned"])
            assert charged - earned == int(epoch["epoch_fees"]) > 0

            query = {"kind": "escrow", "address": raw(world.escrow)}
            async with http.get(f"{url}/epochs/{n}/proof", params=query) as resp:
                proof = await resp.json()
            steps = [ProofStep.from_json(s) for s in proof["proof"]]
            leaf = EscrowLeaf.from_json(proof["leaf"])
            assert verify_proof(leaf.hash(), steps, bytes.fromhex(epoch["root"]))

            async with http.get(f"{url}/payouts/{raw(world.provider)}") as resp:
                payout = await resp.json()
            assert int(payout["cumulative"]) == earned and payout["epoch"] == n

            # records: only to the escrow's spend key, and each one proves into the leaf
            async def records(key: Key, kind: str, address: Address):
                when = int(time.time())
                message = records_auth_message(kind, raw(address), n, when)
                headers = {
                    "Imago-Party-Key": key.public.hex(), "Imago-Party-Time": str(when),
                    "Imago-Party-Signature": key.private.sign(message).hex(),
                }  # fmt: skip
                params = {"kind": kind, "address": raw(address)}
                async with http.get(f"{url}/epochs/{n}/records", params=params,
                                    headers=headers) as resp:  # fmt: skip
                    return resp.status, await resp.json()

            status, _ = await records(Key(), "escrow", world.escrow)
            assert status == 403
            status, _ = await records(world.node, "escrow", world.escrow)
            assert status == 403
            for key, kind, address in (
                (world.spend, "escrow", world.escrow),
                (world.node, "provider", world.provider),
            ):
                status, mine = await records(key, kind, address)
                assert status == 200
                sub_root = bytes.fromhex(mine["leaf"]["sub_root"])
                got = {}
                for item in mine["records"]:
                    record = LedgerJob.from_json(item["record"])
                    proof = [ProofStep.from_json(s) for s in item["proof"]]
                    assert verify_proof(record.hash(), proof, sub_root)
                    got[record.job_id.hex()] = record.amount
                assert got == dict(jobs)
            async with http.get(f"{url}/epochs/{n + 1}") as resp:
                assert resp.status == 404
    finally:
        await runner.cleanup()


async def test_a_commit_beyond_the_stake_charges_the_escrows_first(world: World, chain) -> None:
    """Charges lag the ledger (past a threshold), and the Vault's stake pays providers
    meanwhile; when a commit would promise more than the Vault can pay, the service
    charges what is owed first, then commits."""
    service = world.service(charge_threshold=1000 * TON)  # no charge by threshold
    await service.start()
    vault = await getters.get_vault_data(chain, world.vault)
    first = [await world.job(int(vault.stake * 0.6 / 60))]  # 60 nanoTON a token
    await world.pay(first)
    await service.run_once(force_epoch=True)
    assert (await getters.get_escrow_data(chain, world.escrow)).charged == 0
    await world.pay([await world.job(int(vault.stake * 0.6 / 60))])
    await service.run_once(force_epoch=True)  # 1.2 stakes of payouts: charge, then commit
    epochs = await world.epochs()
    assert [e.state for e in epochs] == ["committed", "committed"]
    escrow = await getters.get_escrow_data(chain, world.escrow)
    assert escrow.charged == sum(a for _, a in first)  # the committed epoch's voucher
    after = await getters.get_vault_data(chain, world.vault)
    assert after.committed_paid <= after.charged_in - after.fees_accrued + after.stake
