#!/usr/bin/env python3
"""Settlement on the devnet: transactions per epoch, fees against value, build and audit
time, accounts to the nanoton, and how soon a job's pay is claimable. Prints JSON.

    .venv/bin/python scripts/bench_settlement.py            # the figures of docs/benchmarks.md
    .venv/bin/python scripts/bench_settlement.py --quick    # a small slice (CI)

It runs the matcher's own settlement service (``marketplace.settlement``) and the node's
claim step (``node.claims``) against a real devnet (the TVM of @ton/sandbox), with many
clients and nodes. Jobs do not run a model: each is a real node-signed receipt and each
client pays with real signed vouchers through the matcher's voucher path, so the ledger,
the epochs, the charges and the claims are exactly those of real traffic.

Keys of the JSON:
- ``tx_per_epoch_1k`` / ``tx_per_epoch_100k``: on-chain transactions settling one epoch
  of 1,000 and of 100,000 jobs from the same clients and nodes, spending the same;
  ``tx_growth`` is their ratio (1: settlement cost does not grow with jobs). A first
  epoch settles before them, so that both commit the same way (as an external message,
  paid out of the fees its charges accrued);
- ``fee_ratio``: network fees (commits, charges, claims, each trace whole) divided by the
  value settled, under the default settings, for 100 clients spending 1 TON a day and 10
  nodes, over ``--days`` simulated days of a Vault in business (it holds the fees of
  earlier charges, which pay its epoch commits; each client owes part of a charge and each
  node part of a claim, spread evenly); ``fee_ratio_new_vault_day1`` is a new Vault's
  first day (no fees yet: every commit goes from the operator's wallet);
- ``epoch_build_s``: building the 100,000-job epoch; ``audit_s``: recomputing it from the
  public leaves (``public``) and one client checking all its own records (``party``);
- ``accounting_gap_nanoton``: |signed vouchers - charged on-chain| + |ledger payouts -
  what providers can claim| after a final settlement; must be 0;
- ``seconds_to_claimable``: from a job's end to its node's payout being claimable, with
  `imago up`'s 30 s epochs (measured), and the bound under the default hour.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from pytoniq_core import Address  # noqa: E402

from client.audit import LoggedReceipt  # noqa: E402
from contracts.chain import getters, operations  # noqa: E402
from contracts.chain.addresses import DEFAULT_PARAMS  # noqa: E402
from contracts.chain.devnet import DevnetClient, DevnetProcess  # noqa: E402
from contracts.chain.messages.capabilities import Capabilities, ModelPrice  # noqa: E402
from contracts.chain.wallet import Wallet, WalletKeys  # noqa: E402
from marketplace.config import SettlementConfig  # noqa: E402
from marketplace.db import JobStatus, make_engine  # noqa: E402
from marketplace.ledger import Ledger, VoucherUpdate  # noqa: E402
from marketplace.settlement.epochs import build_epoch  # noqa: E402
from marketplace.settlement.publication import READ_ENGINE, add_routes  # noqa: E402
from marketplace.settlement.service import SettlementService  # noqa: E402
from node.claims import Claimer  # noqa: E402
from protocol.errors import error_middleware  # noqa: E402
from protocol.signed import DEVNET_GLOBAL_ID, Receipt, SpendVoucher, model_hash  # noqa: E402

TON = 1_000_000_000
MODEL = "bench-model"
PRICE = (20_000_000, 60_000_000)  # nanoTON per million tokens
PARAMS = replace(DEFAULT_PARAMS, min_vault_stake=100 * TON, min_provider_stake=2 * TON)


class Clock:
    """The devnet's clock, which the bench moves an hour per epoch."""

    now = int(time.time())


class ChainClockWallet(Wallet):
    """Signs transfers valid for ten minutes of chain time (the bench runs days ahead)."""

    def build_external(self, messages, *, seqno, deploy=False, valid_until=None):
        return super().build_external(
            messages, seqno=seqno, deploy=deploy, valid_until=Clock.now + 600
        )


def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes_raw()


def raw(a: Address) -> str:
    return a.to_str(is_user_friendly=False)


@dataclass
class Client:
    spend: Ed25519PrivateKey
    wallet: Wallet
    escrow: Address
    cumulative: int = 0


@dataclass
class Node:
    key: Ed25519PrivateKey
    owner: Wallet
    provider: Address
    claimer: Claimer | None = None


@dataclass
class Market:
    chain: DevnetClient
    vault: Address
    operator: Wallet
    operator_key: Ed25519PrivateKey
    clients: list[Client]
    nodes: list[Node]
    ledger: Ledger
    engine: object
    value: int = 0  # what clients signed for, in all
    claim_fees: int = 0
    claim_txs: int = 0
    jobs: list[tuple[str, int, int]] = field(default_factory=list)  # (id, client, amount)
    url: str = ""  # the matcher's public ledger API
    claim_runs: Counter = field(default_factory=Counter)  # what the claim steps did
    receipts: dict = field(default_factory=dict)  # client 0's, as its receipt log keeps them

    def service(self, **settings) -> SettlementService:
        config = SettlementConfig(
            operator_wallet=Path("-"), operator_key=Path("-"), escrow_poll_s=0, **settings
        )
        return SettlementService(
            config, self.ledger, self.chain, self.operator, self.operator_key, raw(self.vault),
            "bench", DEVNET_GLOBAL_ID,
        )  # fmt: skip


async def wallet(chain: DevnetClient, amount: int) -> Wallet:
    w = ChainClockWallet(chain, WalletKeys.generate(mnemonic=False))
    await chain.faucet(w.address, amount)
    await w.deploy()
    return w


async def market(chain: DevnetClient, db: Path, clients: int, nodes: int, deposit: int):
    gov = await wallet(chain, 100 * TON)
    operator = await wallet(chain, 20000 * TON)
    operator_key = key()
    dep = await operations.deploy_all(
        gov, params=PARAMS, operator=operator, operator_key=public(operator_key),
        vault_stake=10000 * TON,
    )  # fmt: skip
    registry, vault = Address(dep.registry), Address(next(iter(dep.vaults.values())))
    for model in (MODEL,):
        await operations.allow_model(gov, registry, model_hash(model), True)
    close_delay = (await getters.get_vault_data(chain, vault)).escrow_close_delay
    caps = Capabilities("cpu", 0, 0, "bench", (ModelPrice(model_hash(MODEL), *PRICE),))
    node_list = []
    for _ in range(nodes):
        k, owner = key(), await wallet(chain, 20 * TON)
        provider, _ = await operations.register_provider(
            owner, chain, registry, public(k), 3 * TON, caps
        )
        node_list.append(Node(k, owner, provider))
    client_list = []
    for _ in range(clients):
        spend, w = key(), await wallet(chain, deposit + 5 * TON)
        escrow, _ = await operations.escrow_open(w, vault, public(spend), deposit, close_delay)
        client_list.append(Client(spend, w, escrow))
    engine = make_engine(f"sqlite:///{db}")
    ledger = Ledger(engine, "bench")
    await ledger.start()
    for n in node_list:
        await ledger.save_node(
            {"node_id": public(n.key).hex(), "url": "-", "x25519_public": "",
             "attestation_kind": "dev", "provider": raw(n.provider)}
        )  # fmt: skip
    return Market(chain, vault, operator, operator_key, client_list, node_list, ledger, engine)


async def traffic(
    m: Market,
    jobs: int,
    spend_per_client: int,
    *,
    spread: bool = False,
    only: tuple[int, Node] | None = None,
) -> None:
    """``jobs`` jobs spread over every client and node, each client spending about
    ``spend_per_client`` (with ``spread``, client i of n spends i/n of it; with ``only``,
    one client pays one node); one voucher per client covers its jobs, as the SDK sends."""
    per_client = max(1, jobs // len(m.clients))
    for ci, c in enumerate(m.clients):
        if only is not None and ci != only[0]:
            continue
        spend = spend_per_client * (ci + 1) // len(m.clients) if spread else spend_per_client
        tokens = max(1, spend * 1_000_000 // (per_client * PRICE[1]))
        rows, paid = [], []
        for j in range(per_client):
            node = only[1] if only is not None else m.nodes[(ci + j) % len(m.nodes)]
            job_id = os.urandom(32)
            receipt = Receipt(
                global_id=DEVNET_GLOBAL_ID, escrow=c.escrow,
                job_id=int.from_bytes(job_id, "big"), time=Clock.now,
                model=model_hash(MODEL), prompt_tokens=0, completion_tokens=tokens,
                price_prompt=PRICE[0], price_completion=PRICE[1], amount=0,
                request_hash=bytes(32), response_hash=bytes(32),
            )  # fmt: skip
            receipt = replace(receipt, amount=receipt.priced_amount)
            boc, digest = receipt.encode()
            signature = node.key.sign(digest)
            rows.append((job_id.hex(), node, receipt, boc, signature))
            if ci == 0:
                m.receipts[job_id] = LoggedReceipt(j, receipt, digest, signature, public(node.key))
            paid.append((job_id.hex(), receipt.amount))
        for start in range(0, len(rows), 512):
            chunk = rows[start : start + 512]
            await asyncio.gather(
                *(
                    m.ledger.open_job(
                        {
                            "job_id": jid,
                            "model": MODEL,
                            "escrow": raw(c.escrow),
                            "node_id": public(n.key).hex(),
                        }
                    )  # fmt: skip
                    for jid, n, *_ in chunk
                )
            )
            await asyncio.gather(
                *(
                    m.ledger.close_job(
                        jid,
                        JobStatus.COMPLETED,
                        completion_tokens=r.completion_tokens,
                        amount=r.amount,
                        receipt_boc=base64.b64encode(b).decode(),
                        receipt_signature=s.hex(),
                    )  # fmt: skip
                    for jid, _, r, b, s in chunk
                )
            )
        c.cumulative += sum(a for _, a in paid)
        m.value += sum(a for _, a in paid)
        voucher = SpendVoucher(DEVNET_GLOBAL_ID, c.escrow, m.vault, c.cumulative)
        boc, digest = voucher.encode()
        await m.ledger.submit_voucher(
            VoucherUpdate(
                escrow=raw(c.escrow), vault=raw(m.vault), spend_public=public(c.spend).hex(),
                cumulative=c.cumulative, voucher_boc=base64.b64encode(boc).decode(),
                signature=c.spend.sign(digest).hex(), jobs=dict(paid),
            )
        )  # fmt: skip
        m.jobs += [(jid, ci, a) for jid, a in paid]


async def claims(m: Market, *, force: bool = False) -> int:
    """Each node's own claim step (``node.claims.Claimer``, its default multiple; with
    ``force``, whatever it is owed), as its loop runs it. Returns the transactions sent."""
    sent = 0
    for n in m.nodes:
        run = await n.claimer.run_once(force=force)
        m.claim_runs.update(v.status for v in run.vaults)
        m.claim_runs.update([run.status] if run.refused is None else ["refused"])
        for claim in run.vaults:
            if claim.trace is not None and claim.status == "claimed":
                m.claim_fees += claim.trace.total_fees
                m.claim_txs += len(claim.trace)
                sent += len(claim.trace)
    return sent


async def serve_ledger(m: Market, tmp: Path) -> web.AppRunner:
    """The matcher's public ledger API over this market's database, and each node's
    claim step pointed at it."""
    app = web.Application(middlewares=[error_middleware()])
    app[READ_ENGINE] = m.engine
    add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = m.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    for i, n in enumerate(m.nodes):
        n.claimer = Claimer(
            client=m.chain, wallet=n.owner, provider=n.provider, matcher=url,
            state_dir=tmp / f"node-{i}",
        )  # fmt: skip
    return runner


async def advance(m: Market, seconds: int) -> None:
    Clock.now = await m.chain.set_clock(Clock.now + seconds)


async def one_epoch_txs(m: Market, jobs: int) -> tuple[int, float]:
    """Transactions to settle one epoch of ``jobs`` jobs in which every client spends
    past the charge threshold and every node claims what it earned."""
    service = m.service()  # the defaults: 40 TON charge threshold
    await service.start()
    await traffic(m, jobs, spend_per_client=41 * TON)
    before = sum(service.transactions.values())
    started = time.perf_counter()
    built = await m.ledger.call(
        lambda c: build_epoch(c, vault=raw(m.vault), fee_bps=service.fee_bps,
                              operator_key=m.operator_key, global_id=DEVNET_GLOBAL_ID)
    )  # fmt: skip
    build_s = time.perf_counter() - started
    assert built is not None and built.jobs == len(m.clients) * max(1, jobs // len(m.clients))
    await service.run_once()
    txs = sum(service.transactions.values()) - before + await claims(m, force=True)
    await advance(m, 3600)
    return txs, build_s


async def audit(m: Market, epoch: int) -> dict[str, float]:
    """``imago audit``'s own code against the matcher's public API and the chain: the
    public audit of ``epoch`` (its leaves, root, totals, every escrow's and provider's
    on-chain counters), then one client's audit of its own records in it (each proved
    up to the root and checked against the receipts it kept)."""
    from client.audit import LiveSource, Party, run_audit

    source = LiveSource(m.url, m.chain, raw(m.vault))
    try:
        started = time.perf_counter()
        report = await run_audit(source, raw(m.vault), from_epoch=epoch, history=False)
        public_s = time.perf_counter() - started
        assert report.ok, report.to_json()
        client = m.clients[0]
        party = Party("escrow", raw(client.escrow), client.spend, m.receipts)
        started = time.perf_counter()
        report = await run_audit(source, raw(m.vault), from_epoch=epoch, party=party, history=False)
        party_s = time.perf_counter() - started
        assert report.ok, report.to_json()
    finally:
        await source.close()
    return {"public": round(public_s, 3), "party": round(party_s, 3)}


async def steady(m: Market) -> None:
    """A Vault in business, not a new one: every client charged once (so the operator has
    fees on the Vault, which pay its epoch commits) and every node paid once; then each
    client owes part of a charge (client i of n: i/n of the threshold) and each node part
    of a claim (node j of n: about (j + 1/2)/n of its claim threshold), as at any moment
    of a running market."""
    service = m.service()
    await service.start()
    threshold = service.config.charge_threshold
    await traffic(m, len(m.clients), threshold + TON)
    await advance(m, 3600)
    await service.run_once(force_epoch=True)
    await claims(m, force=True)
    await traffic(m, len(m.clients), threshold, spread=True)
    await advance(m, 3600)
    await service.run_once(force_epoch=True)
    await claims(m, force=True)  # the nodes start from nothing owed, then their shares:
    for j, node in enumerate(m.nodes):  # node j's share: one job from client j
        owed = node.claimer.threshold * (2 * j + 1) // (2 * len(m.nodes))
        await traffic(m, 1, owed * 10_000 // (10_000 - service.fee_bps), only=(j, node))
    await advance(m, 3600)
    await service.run_once(force_epoch=True)
    await claims(m)


async def fee_day(m: Market, days: int, jobs_per_hour: int) -> dict:
    """Default settings; each client spends 1 TON a day in hourly epochs."""
    service = m.service()  # the defaults: an hour's epoch, 40 TON charge threshold
    await service.start()
    fees_before = sum(service.fees.values())
    value_before, claim_before, claim_txs_before = m.value, m.claim_fees, m.claim_txs
    for _ in range(days * 24):
        await traffic(m, jobs_per_hour, spend_per_client=TON // 24)
        await advance(m, 3600)
        await service.run_once(force_epoch=True)  # the hour has passed: the epoch is due
        await claims(m)
    fees = sum(service.fees.values()) - fees_before + m.claim_fees - claim_before
    value = m.value - value_before
    return {
        "fee_ratio": round(fees / value, 6),
        "fees_ton": round(fees / TON, 4),
        "value_ton": round(value / TON, 4),
        "fees_by_kind_ton": {
            **{k: round(v / TON, 4) for k, v in service.fees.items()},
            "claim": round((m.claim_fees - claim_before) / TON, 4),
        },
        "transactions": {**dict(service.transactions), "claim": m.claim_txs - claim_txs_before},
        # external: paid out of the operator's fees on the Vault (once charges accrued some)
        "commit_paths": dict(service.commit_paths),
        "claim_runs": dict(m.claim_runs),
        "days": days,
    }


async def final_gap(m: Market) -> int:
    """Charge every escrow in full and read what providers can claim: the accounts must
    agree with what the clients signed, to the nanoton."""
    service = m.service(charge_threshold=1)
    await service.start()
    await advance(m, 3600)
    await service.run_once(force_epoch=True)
    signed = sum(c.cumulative for c in m.clients)
    charged = 0
    for c in m.clients:
        charged += (await getters.get_escrow_data(m.chain, c.escrow)).charged
    ledger_paid = await m.ledger.call(
        lambda c: c.exec_driver_sql(
            "select coalesce(sum(cumulative), 0) from ledger_accounts where kind = 'provider'"
        ).scalar_one()
    )
    claimable = 0
    for n in m.nodes:
        provider = raw(n.provider)
        row = await m.ledger.call(
            lambda c, p=provider: c.exec_driver_sql(
                "select max(cumulative) from payout_vouchers where provider = ?", (p,)
            ).scalar_one()
        )
        claimable += int(row or 0)
    return abs(signed - charged) + abs(int(ledger_paid) - claimable)


async def to_claimable(chain: DevnetClient, m: Market) -> float:
    """A job ends; the matcher runs with `imago up`'s settings; how long until its node's
    payout voucher covering it is committed and claimable?"""
    service = m.service(epoch_s=30.0, charge_threshold=1, tick_s=2.0)
    await service.start()
    await traffic(m, len(m.clients), spend_per_client=TON // 1000)
    ended = time.monotonic()
    node = m.nodes[0]
    target = await m.ledger.call(
        lambda c: c.exec_driver_sql(
            "select coalesce(max(cumulative), 0) from ledger_accounts where kind='provider' "
            "and address = ?", (raw(node.provider),)
        ).scalar_one()
    )  # fmt: skip
    service.started = time.time()  # a fresh epoch began as the job ended
    service._polled_at = 0
    while True:
        await service.tick()
        vault = await getters.get_vault_data(chain, m.vault)
        row = await m.ledger.call(
            lambda c: c.exec_driver_sql(
                "select p.cumulative, p.epoch from payout_vouchers p join epochs e on "
                "e.epoch = p.epoch where p.provider = ? and e.state = 'committed' "
                "order by p.epoch desc limit 1", (raw(node.provider),)
            ).first()
        )  # fmt: skip
        if row and int(row[0]) > int(target) and row[1] <= vault.last_epoch:
            return round(time.monotonic() - ended, 1)
        await asyncio.sleep(service.config.tick_s)


async def run(args: argparse.Namespace) -> dict:
    with (
        tempfile.TemporaryDirectory(prefix="imago-bench-settle-") as tmp,
        DevnetProcess(Path(tmp) / "devnet", port=0) as proc,
    ):
        chain = DevnetClient(proc.url)
        Clock.now = await chain.set_clock(int(time.time()))
        out: dict = {"clients": args.clients, "nodes": args.nodes}

        m = await market(chain, Path(tmp) / "epochs.db", args.clients, args.nodes, 150 * TON)
        m_api = await serve_ledger(m, Path(tmp) / "m")
        await one_epoch_txs(m, args.small)  # the Vault accrues fees: the next commits go external
        small, _ = await one_epoch_txs(m, args.small)
        m.receipts.clear()  # the audited client's receipt log: the big epoch's receipts
        big, build_s = await one_epoch_txs(m, args.big)
        last = await m.ledger.call(
            lambda c: c.exec_driver_sql("select max(epoch) from epochs").scalar_one()
        )
        out |= {
            f"tx_per_epoch_{_k(args.small)}": small,
            f"tx_per_epoch_{_k(args.big)}": big,
            "tx_growth": round(big / small, 3),
            "epoch_build_s": round(build_s, 2),
            "epoch_jobs": args.big,
            "audit_s": await audit(m, last),
        }
        gap_epochs = await final_gap(m)
        await m_api.cleanup()
        await m.ledger.stop()

        f = await market(chain, Path(tmp) / "fees.db", args.clients, args.nodes, 200 * TON)
        f_api = await serve_ledger(f, Path(tmp) / "f")
        new = await fee_day(f, 1, args.jobs_per_hour)  # a new Vault: no fees to commit with
        out["fee_ratio_new_vault_day1"] = new["fee_ratio"]
        await steady(f)
        out |= await fee_day(f, args.days, args.jobs_per_hour)
        gap_fees = await final_gap(f)
        out["seconds_to_claimable"] = {
            "imago_up_30s_epochs": await to_claimable(chain, f),
            "default_bound": SettlementConfig(Path("-"), Path("-")).epoch_s,
        }
        out["accounting_gap_nanoton"] = gap_epochs + gap_fees
        for n in m.nodes + f.nodes:
            await n.claimer.close()
        await f_api.cleanup()
        await f.ledger.stop()
    return out


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--jobs-per-hour", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a small slice (CI)")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.nodes, args.small, args.big, args.days = 5, 2, 100, 1_000, 1
        args.jobs_per_hour = 10
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
