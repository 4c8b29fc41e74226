"""Property tests: random operation sequences against the real contracts on the devnet.

After every step: no escrow pays more than was deposited; counters never fall; the vault
pays out at most what it was charged minus fees plus its stake; the Provider's claimed
counter equals what the vault paid it; TON is conserved (the balances of every account
involved plus the fees of every transaction stay constant).

``test_overlapping_claims_and_bounces`` sends several claims in one wallet message, so that
they are all in flight at once, some of them refused by the vault (bounced).
"""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytoniq_core import Address

from contracts.chain import getters, operations
from contracts.chain.devnet import DevnetClient
from contracts.chain.messages.capabilities import Capabilities
from contracts.chain.messages.provider import Claim, SignedPayout
from contracts.chain.messages.registry import RegistryParams
from contracts.chain.transactions import Trace
from contracts.chain.wallet import OutMessage, WalletKeys
from protocol.signed import EpochCommit, PayoutVoucher, SpendVoucher

from .conftest import TON, G, Key, LongValidityWallet

CENT = TON // 100
PARAMS = RegistryParams(2 * TON, 40, 20, 300, 1000, 2 * TON)

amounts = st.integers(min_value=1, max_value=150).map(lambda c: c * CENT)
steps = st.one_of(
    st.tuples(st.just("deposit"), amounts),
    st.tuples(st.just("charge"), st.sampled_from(["ok", "ok", "replay", "wrong_key"]), amounts),
    st.tuples(st.just("close")),
    st.tuples(st.just("withdraw"), st.booleans()),
    st.tuples(
        st.just("commit"),
        st.sampled_from(["ok", "ok", "backwards", "beyond"]),
        st.integers(min_value=0, max_value=100),
        st.sampled_from(["wallet", "external"]),  # external: paid out of the operator's fees
    ),
    st.tuples(st.just("claim"), amounts),
    st.tuples(st.just("withdraw_fees"), st.integers(min_value=1, max_value=100)),
)


def trace_cost(trace: Trace) -> int:
    """What a trace took out of the accounts: fees of every transaction plus the forward
    fees still carried by the messages they sent."""
    return sum(t.fee for t in trace.transactions) + sum(
        m.fwd_fee for t in trace.transactions for m in t.out_msgs if m.destination
    )


class World:
    """One Registry, Vault and Provider shared by every example; one fresh escrow each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, chain: DevnetClient):
        self.loop, self.chain = loop, chain

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def setup(self) -> None:
        c = self.chain

        async def wallet() -> LongValidityWallet:
            w = LongValidityWallet(c, WalletKeys.generate(mnemonic=False))
            await c.faucet(w.address, 10_000 * TON)
            await w.deploy()
            return w

        self.gov, self.operator, self.node, self.client = [await wallet() for _ in range(4)]
        self.operator_key, self.node_key = Key(), Key()
        self.registry, _ = await operations.deploy_registry(self.gov, PARAMS)
        self.vault = await operations.deploy_vault(
            self.operator, self.registry, self.operator_key.int, 3 * TON, client=c
        )
        self.provider, _ = await operations.register_provider(
            self.node, c, self.registry, self.node_key.public, 2 * TON, Capabilities("a", 1, 1, "b")
        )
        self.claimed, self.seq = 0, 0
        self.last_vault = await getters.get_vault_data(c, self.vault)
        self.paid_base = self.last_vault.paid_out

    async def new_escrow(self) -> None:
        self.spend = Key()
        self.escrow, tr = await operations.escrow_open(
            self.client, self.vault, self.spend.public, TON, PARAMS.escrow_close_delay
        )
        self.charged = 0
        self.paid_to_vault = 0
        self.last_escrow = await getters.get_escrow_data(self.chain, self.escrow)
        self.total = await self.balances()

    @property
    def accounts(self) -> list[Address]:
        return [
            self.operator.address,
            self.node.address,
            self.client.address,
            self.escrow,
            self.vault,
            self.provider,
        ]

    async def balances(self) -> int:
        return sum([await self.chain.get_balance(a) for a in self.accounts])

    async def step(self, op: tuple) -> None:
        c = self.chain
        kind = op[0]
        if kind == "deposit":
            trace = await operations.escrow_deposit(self.client, self.escrow, op[1], check=False)
        elif kind == "charge":
            _, how, delta = op
            cumulative = self.charged if how == "replay" else self.charged + delta
            v = SpendVoucher(G, self.escrow, self.vault, cumulative)
            key = Key() if how == "wrong_key" else self.spend
            trace = await operations.escrow_charge(
                self.operator, self.escrow, v, key.sign(v), check=False
            )
        elif kind == "close":
            trace = await operations.escrow_close(self.client, self.escrow, check=False)
        elif kind == "withdraw":
            if op[1]:
                now = (await c.clock())[0]
                await c.set_clock(now + PARAMS.escrow_close_delay + 1)
            trace = await operations.escrow_withdraw(self.client, self.escrow, check=False)
            await c.set_clock(None)
        elif kind == "commit" and op[3] == "external":
            trace = await self.commit_external(op[1], op[2])
        elif kind == "commit":
            trace = await self.commit(op[1], op[2])
        elif kind == "claim":
            v = await getters.get_vault_data(c, self.vault)
            pv = PayoutVoucher(G, self.vault, self.provider, v.last_epoch, self.claimed + op[1])
            trace = await operations.provider_claim(
                self.node, self.provider, pv, self.operator_key.sign(pv), check=False
            )
            self.claimed = await getters.get_provider_claimed(c, self.provider, self.vault)
        else:  # withdraw_fees
            v = await getters.get_vault_data(c, self.vault)
            amount = (v.fees_accrued - v.fees_withdrawn) * op[1] // 100
            trace = await operations.vault_withdraw_fees(
                self.operator, self.vault, amount, check=False
            )
        await self.check(trace)

    async def new_provider(self, payable: int) -> None:
        """A fresh Provider (claimed 0) and a vault able to pay it ``payable`` more."""
        c = self.chain
        self.seq += 1
        self.provider, _ = await operations.register_provider(
            self.node,
            c,
            self.registry,
            self.node_key.public,
            2 * TON,
            Capabilities("a", 1, 1, "b"),
            seq=self.seq,
        )
        v = await getters.get_vault_data(c, self.vault)
        if v.payable < payable:
            await operations.vault_top_up_stake(
                self.operator, self.vault, payable - v.payable + TON
            )
        await self.commit("ok", 100)  # every payable nanoTON committed
        self.paid_base = (await getters.get_vault_data(c, self.vault)).paid_out
        self.claimed = 0

    async def commit(self, how: str, percent: int) -> Trace:
        """Commit the next epoch: every charge received, and a paid total ``percent`` of
        the way from the last one to the most the vault could owe (charged - fees + stake);
        or a commit going backwards or beyond what the vault could pay, which it refuses."""
        commit = await self.next_commit(how, percent)
        return await operations.vault_commit_epoch(
            self.operator, self.vault, commit, self.operator_key.sign(commit), check=False
        )

    async def commit_external(self, how: str, percent: int) -> Trace:
        """The same commit as an external message: accepted, it takes exactly
        EXTERNAL_COMMIT_FEE out of the operator's fees; refused (the totals, or fees the
        Vault cannot spend), it leaves no transaction and the Vault untouched."""
        commit = await self.next_commit(how, percent)
        before = await getters.get_vault_data(self.chain, self.vault)
        try:
            trace = await operations.vault_commit_epoch_external(
                self.chain, self.vault, commit, self.operator_key.sign(commit)
            )
        except operations.OperationFailed as e:
            assert e.exit_codes[0] in (311, 316, 317, 318), e.exit_codes
            assert not e.trace.transactions
            assert await getters.get_vault_data(self.chain, self.vault) == before
            return e.trace
        after = await getters.get_vault_data(self.chain, self.vault)
        assert how == "ok" and after.last_epoch == commit.epoch
        assert before.fees_accrued - before.fees_withdrawn >= operations.EXTERNAL_COMMIT_FEE
        assert after.fees_withdrawn - before.fees_withdrawn == operations.EXTERNAL_COMMIT_FEE
        assert before.balance - after.balance == trace.total_fees
        return trace

    async def next_commit(self, how: str, percent: int) -> EpochCommit:
        v = await getters.get_vault_data(self.chain, self.vault)
        charged, fees = v.charged_in, v.fees_accrued
        paid = v.committed_paid + (v.committable - v.committed_paid) * percent // 100
        if how == "backwards" and v.committed_paid > 0:
            paid = v.committed_paid - 1
        elif how != "ok":
            paid = v.charged_in - v.fees_accrued + v.stake + 1
        return EpochCommit(G, self.vault, v.last_epoch + 1, b"\0" * 32, charged, paid, fees, 0)

    async def claim_batch(self, batch: list[tuple[int, str]]) -> int:
        """Send the batch's claims in one wallet message; return the highest good cumulative."""
        c = self.chain
        v = await getters.get_vault_data(c, self.vault)
        messages, cumulative, best = [], self.claimed, 0
        for delta, how in batch:
            cumulative += delta
            pv = PayoutVoucher(G, self.vault, self.provider, v.last_epoch, cumulative)
            key = Key() if how == "refused" else self.operator_key
            body = Claim(operations.new_query_id(), SignedPayout(key.sign(pv), pv)).to_cell()
            messages.append(
                OutMessage(self.provider, operations.OP_VALUE["claim"], body, None, True)
            )
            if how == "ok":
                best = cumulative
        await self.check(await self.node.send(messages))
        self.claimed = await getters.get_provider_claimed(c, self.provider, self.vault)
        return best

    async def check(self, trace: Trace) -> None:
        c = self.chain
        e = await getters.get_escrow_data(c, self.escrow)
        v = await getters.get_vault_data(c, self.vault)
        # invariant 1: an escrow never pays more than deposited; its charge only rises
        assert e.charged <= e.deposited
        assert e.charged >= self.last_escrow.charged and e.deposited >= self.last_escrow.deposited
        self.paid_to_vault += e.charged - self.last_escrow.charged
        assert self.paid_to_vault == e.charged
        # counters never fall
        for f in ("charged_in", "paid_out", "fees_accrued", "fees_withdrawn", "last_epoch"):
            assert getattr(v, f) >= getattr(self.last_vault, f), f
        # the Provider's counter is exactly what the vault paid it (the only provider
        # claiming): a bounced claim gives back its own amount, whatever else is in flight
        claimed = await getters.get_provider_claimed(c, self.provider, self.vault)
        assert claimed == v.paid_out - self.paid_base, (claimed, v.paid_out - self.paid_base)
        # epoch totals: cumulative; fees within the charged total, payouts within the last
        # commit and never beyond what the vault could pay when it was committed
        for f in ("committed_charged", "committed_paid", "committed_fees"):
            assert getattr(v, f) >= getattr(self.last_vault, f), f
        assert v.committed_fees <= v.committed_charged
        assert v.paid_out <= v.committed_paid <= v.charged_in - v.fees_accrued + v.stake
        # invariant 3: paid out <= charged - fees + stake; fee withdrawals within the fees
        assert v.paid_out <= v.charged_in - v.fees_accrued + v.stake
        assert v.fees_withdrawn <= v.fees_accrued
        assert v.balance >= v.charged_in - v.paid_out - v.fees_withdrawn + v.stake - TON // 10
        # TON conservation over the accounts involved
        total = await self.balances()
        assert total + trace_cost(trace) == self.total, (total, trace_cost(trace), self.total)
        self.total = total
        self.last_escrow, self.last_vault = e, v


@settings(
    max_examples=int(os.environ.get("IMAGO_PROP_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(steps, min_size=1, max_size=5))
def test_random_operation_sequences(world, ops):
    world.run(world.new_escrow())
    for op in ops:
        world.run(world.step(op))


# One batch: claims sent in one wallet message, in flight together. Each raises the
# cumulative by `delta`; a refused one is signed by a wrong key (the Provider accepts it and
# moves its counter, the vault bounces it).
claim_batches = st.lists(
    st.tuples(amounts, st.sampled_from(["ok", "ok", "refused"])), min_size=1, max_size=4
)


@settings(
    max_examples=int(os.environ.get("IMAGO_PROP_EXAMPLES", "200")) // 4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batches=st.lists(claim_batches, min_size=1, max_size=3))
def test_overlapping_claims_and_bounces(world, batches):
    world.run(world.new_provider(sum(d for batch in batches for d, _ in batch)))
    world.run(world.new_escrow())
    best = 0
    for batch in batches:
        best = max(best, world.run(world.claim_batch(batch)))
    # whatever bounced around it, the best good voucher still pays up to its cumulative
    if best > world.claimed:
        world.run(world.claim_batch([(best - world.claimed, "ok")]))
    assert world.claimed == best


@pytest.fixture(scope="module")
def world(devnet):
    loop = asyncio.new_event_loop()
    chain = DevnetClient(devnet.url)
    w = World(loop, chain)
    w.run(w.setup())
    yield w
    w.run(chain.close())
    loop.close()
