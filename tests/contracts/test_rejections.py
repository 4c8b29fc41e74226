"""Every rejection: each bad message fails in the compute phase, bounces its value, and
moves no counter."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pytoniq_core import begin_cell

from contracts.chain import addresses, getters, operations
from contracts.chain.messages.capabilities import Capabilities
from contracts.chain.messages.escrow import Charge, EscrowCharged
from contracts.chain.messages.provider import ProviderInit, SignedPayout
from contracts.chain.messages.registry import SetImage, SlashedStake
from contracts.chain.messages.vault import PayoutRequest
from protocol.signed import (
    MAINNET_GLOBAL_ID,
    EpochCommit,
    PayoutVoucher,
    Receipt,
    SpendVoucher,
)

from .conftest import TON, G, Key

CAPS = Capabilities("L4", 24, 1, "us-east")


def codes(trace) -> list:
    """Exit codes of the failed transactions, without a wallet that runs out of gas
    receiving a bounce worth almost nothing (the too-little-value cases)."""
    bad = [t for t in trace.transactions if not (t.bounced_in and t.exit_code == -14)]
    return operations.failed_exit_codes(type(trace)(bad))


@pytest.fixture
async def world(chain, contracts_set, make_wallet):
    """A fresh provider (with its node key) and a fresh funded escrow on the shared vault."""
    cs = contracts_set
    node_owner, client = await make_wallet(), await make_wallet()
    node_key, spend = Key(), Key()
    provider, _ = await operations.register_provider(
        node_owner, chain, cs.registry, node_key.public, 2 * TON, CAPS
    )
    escrow, _ = await operations.escrow_open(
        client, cs.vault, spend.public, 3 * TON, cs.params.escrow_close_delay
    )

    class W:
        pass

    w = W()
    w.cs, w.node_owner, w.client, w.node_key, w.spend = cs, node_owner, client, node_key, spend
    w.provider, w.escrow = provider, escrow
    return w


async def _committed_epoch(chain, cs) -> int:
    v = await getters.get_vault_data(chain, cs.vault)
    # every charge committed, and all the vault could pay (charged - fees + stake)
    c = EpochCommit(
        G, cs.vault, v.last_epoch + 1, b"\x07" * 32, v.charged_in, v.committable, v.fees_accrued, 0
    )
    await operations.vault_commit_epoch(cs.operator, cs.vault, c, cs.operator_key.sign(c))
    return v.last_epoch + 1


# --- escrow ------------------------------------------------------------------------------


async def test_replayed_spend_voucher(chain, world):
    w = world
    v = SpendVoucher(G, w.escrow, w.cs.vault, TON)
    await operations.escrow_charge(w.cs.operator, w.escrow, v, w.spend.sign(v))
    tr = await operations.escrow_charge(w.cs.operator, w.escrow, v, w.spend.sign(v), check=False)
    assert codes(tr) == [405]
    assert (await getters.get_escrow_data(chain, w.escrow)).charged == TON


async def test_voucher_for_another_escrow_or_vault(chain, world, contracts_set):
    w = world
    other = addresses.escrow_address(w.cs.vault, w.cs.gov.address, 1, 20)
    v = SpendVoucher(G, other, w.cs.vault, TON)
    tr = await operations.escrow_charge(w.cs.operator, w.escrow, v, w.spend.sign(v), check=False)
    assert codes(tr) == [403]
    v = SpendVoucher(G, w.escrow, w.cs.registry, TON)
    tr = await operations.escrow_charge(w.cs.operator, w.escrow, v, w.spend.sign(v), check=False)
    assert codes(tr) == [404]
    assert (await getters.get_escrow_data(chain, w.escrow)).charged == 0


async def test_spend_voucher_wrong_key(chain, world):
    w = world
    v = SpendVoucher(G, w.escrow, w.cs.vault, TON)
    tr = await operations.escrow_charge(w.cs.operator, w.escrow, v, Key().sign(v), check=False)
    assert codes(tr) == [402]


async def test_charge_beyond_deposit(chain, world):
    w = world
    e = await getters.get_escrow_data(chain, w.escrow)
    v = SpendVoucher(G, w.escrow, w.cs.vault, e.deposited + 1)
    tr = await operations.escrow_charge(w.cs.operator, w.escrow, v, w.spend.sign(v), check=False)
    assert codes(tr) == [406]
    v = SpendVoucher(G, w.escrow, w.cs.vault, e.deposited)
    await operations.escrow_charge(w.cs.operator, w.escrow, v, w.spend.sign(v))


async def test_charge_during_close_delay_then_not_after(chain, world, clock):
    w = world
    await operations.escrow_close(w.client, w.escrow)
    tr = await operations.escrow_deposit(w.client, w.escrow, TON, check=False)
    assert codes(tr) == [410]  # no deposit once closing
    v = SpendVoucher(G, w.escrow, w.cs.vault, TON)
    await operations.escrow_charge(
        w.cs.operator, w.escrow, v, w.spend.sign(v)
    )  # allowed in the delay
    tr = await operations.escrow_withdraw(w.client, w.escrow, check=False)
    assert codes(tr) == [409]  # before the close delay ends
    await clock.advance(w.cs.params.escrow_close_delay + 1)
    before = await w.client.balance()
    e = await getters.get_escrow_data(chain, w.escrow)
    await operations.escrow_withdraw(w.client, w.escrow)
    assert await w.client.balance() - before >= e.deposited - e.charged - TON // 50
    v2 = SpendVoucher(G, w.escrow, w.cs.vault, 2 * TON)
    tr = await operations.escrow_charge(w.cs.operator, w.escrow, v2, w.spend.sign(v2), check=False)
    assert codes(tr) == [407]


async def test_escrow_admin_from_non_owner(chain, world):
    tr = await operations.escrow_close(world.cs.operator, world.escrow, check=False)
    assert codes(tr) == [400]
    tr = await operations.escrow_withdraw(world.cs.operator, world.escrow, check=False)
    assert codes(tr) == [400]


async def test_charge_with_too_little_value(chain, world):
    w = world
    v = SpendVoucher(G, w.escrow, w.cs.vault, TON)
    tr = await operations.escrow_charge(
        w.cs.operator, w.escrow, v, w.spend.sign(v), value=TON // 1000, check=False
    )
    assert codes(tr) == [401]
    tr = await operations.escrow_deposit(w.client, w.escrow, TON // 1000, check=False)
    assert codes(tr) == [401]


async def test_malformed_and_unknown_bodies(chain, world):
    w = world
    v = SpendVoucher(G, w.escrow, w.cs.vault, TON)
    full = Charge(1, w.spend.sign(v), v).to_cell()
    truncated = begin_cell().store_uint(Charge.OP, 32).store_uint(1, 64).end_cell()
    tr = await w.cs.operator.transfer(w.escrow, TON // 10, truncated)
    assert codes(tr) == [9]
    tr = await w.cs.operator.transfer(
        w.escrow, TON // 10, begin_cell().store_uint(0xDEAD, 32).end_cell()
    )
    assert codes(tr) == [0xFFFF]
    for dest in (w.cs.vault, w.cs.registry, w.provider):
        tr = await w.cs.operator.transfer(
            dest, TON // 10, begin_cell().store_uint(7, 32).end_cell()
        )
        assert codes(tr) == [0xFFFF]
    assert full  # the well-formed one is accepted elsewhere


async def test_vault_refuses_a_charge_and_the_escrow_restores(chain, contracts_set, make_wallet):
    """An escrow not derived from the vault's parameters (wrong close delay): the vault
    bounces its charge, the escrow's counter goes back."""
    cs = contracts_set
    client, spend = await make_wallet(), Key()
    escrow, _ = await operations.escrow_open(client, cs.vault, spend.public, 2 * TON, 12345)
    v0 = await getters.get_vault_data(chain, cs.vault)
    v = SpendVoucher(G, escrow, cs.vault, TON)
    tr = await operations.escrow_charge(cs.operator, escrow, v, spend.sign(v), check=False)
    assert codes(tr) == [302]
    assert (await getters.get_escrow_data(chain, escrow)).charged == 0
    assert (await getters.get_vault_data(chain, cs.vault)).charged_in == v0.charged_in


# --- vault -------------------------------------------------------------------------------


async def test_forged_children(chain, world, make_wallet):
    w = world
    forger = await make_wallet()
    body = EscrowCharged(1, TON, forger.address, 1, forger.address).to_cell()
    tr = await forger.transfer(w.cs.vault, 2 * TON, body)
    assert codes(tr) == [302]
    pv = PayoutVoucher(G, w.cs.vault, forger.address, 1, TON)
    body = PayoutRequest(1, 0, TON, forger.address, 0, SignedPayout(w.cs.operator_key.sign(pv), pv))
    tr = await forger.transfer(w.cs.vault, TON, body.to_cell())
    assert codes(tr) == [303]
    body = ProviderInit(1, 100 * TON, 1, 1, 0, begin_cell().end_cell(), forger.address).to_cell()
    tr = await forger.transfer(w.provider, TON, body)
    assert codes(tr) == [202]
    # a "slashed stake" that no Provider of the registry sent
    body = SlashedStake(1, forger.address, 0).to_cell()
    tr = await forger.transfer(w.cs.registry, TON, body)
    assert codes(tr) == [104]


async def test_epoch_commit_rejections(chain, contracts_set):
    cs = contracts_set
    v = await getters.get_vault_data(chain, cs.vault)
    c = EpochCommit(G, cs.vault, v.last_epoch + 2, b"\0" * 32, 0, 0, 0, 0)
    tr = await operations.vault_commit_epoch(
        cs.operator, cs.vault, c, cs.operator_key.sign(c), check=False
    )
    assert codes(tr) == [310]
    c = EpochCommit(G, cs.vault, v.last_epoch + 1, b"\0" * 32, 0, 0, 0, 0)
    tr = await operations.vault_commit_epoch(cs.operator, cs.vault, c, Key().sign(c), check=False)
    assert codes(tr) == [304]
    c = EpochCommit(G, cs.registry, v.last_epoch + 1, b"\0" * 32, 0, 0, 0, 0)
    tr = await operations.vault_commit_epoch(
        cs.operator, cs.vault, c, cs.operator_key.sign(c), check=False
    )
    assert codes(tr) == [305]


async def test_withdraw_fees_rules(chain, contracts_set, make_wallet):
    cs = contracts_set
    v = await getters.get_vault_data(chain, cs.vault)
    tr = await operations.vault_withdraw_fees(cs.gov, cs.vault, 1, check=False)
    assert codes(tr) == [300]
    over = v.fees_accrued - v.fees_withdrawn + 1
    tr = await operations.vault_withdraw_fees(cs.operator, cs.vault, over, check=False)
    assert codes(tr) == [311]


# --- provider ----------------------------------------------------------------------------


async def _claim(chain, w, cumulative, *, epoch=None, key=None, check=False):
    epoch = epoch if epoch is not None else await _committed_epoch(chain, w.cs)
    pv = PayoutVoucher(G, w.cs.vault, w.provider, epoch, cumulative)
    k = key or w.cs.operator_key
    return await operations.provider_claim(w.node_owner, w.provider, pv, k.sign(pv), check=check)


async def test_claim_and_replayed_payout_voucher(chain, world):
    w = world
    before = await w.node_owner.balance()
    await _claim(chain, w, TON // 2, check=True)
    assert await w.node_owner.balance() - before > TON // 2 - TON // 20
    tr = await _claim(chain, w, TON // 2)
    assert codes(tr) == [208]
    assert await getters.get_provider_claimed(chain, w.provider, w.cs.vault) == TON // 2


async def test_bounced_payout_restores_counters(chain, world):
    """The vault refuses (epoch not committed): the value comes back to the owner and no
    counter moves."""
    w = world
    v0 = await getters.get_vault_data(chain, w.cs.vault)
    before = await w.node_owner.balance()
    tr = await _claim(chain, w, TON, epoch=v0.last_epoch + 5)
    assert codes(tr) == [307]
    assert any(t.bounced_in for t in tr.transactions)
    assert await getters.get_provider_claimed(chain, w.provider, w.cs.vault) == 0
    v1 = await getters.get_vault_data(chain, w.cs.vault)
    assert v1.paid_out == v0.paid_out
    spent = before - await w.node_owner.balance()
    assert 0 < spent < TON // 50  # only the gas: the value came back
    # wrong operator key: refused the same way
    tr = await _claim(chain, w, TON, key=Key())
    assert codes(tr) == [304]
    assert await getters.get_provider_claimed(chain, w.provider, w.cs.vault) == 0
    # and a good voucher afterwards is paid in full
    await _claim(chain, w, TON, check=True)
    assert await getters.get_provider_claimed(chain, w.provider, w.cs.vault) == TON


async def test_payout_voucher_for_another_provider(chain, world):
    w = world
    epoch = await _committed_epoch(chain, w.cs)
    pv = PayoutVoucher(G, w.cs.vault, w.cs.registry, epoch, TON)
    tr = await operations.provider_claim(
        w.node_owner, w.provider, pv, w.cs.operator_key.sign(pv), check=False
    )
    assert codes(tr) == [207]


async def test_vault_never_pays_beyond_charged_minus_fees_plus_stake(chain, world):
    w = world
    v = await getters.get_vault_data(chain, w.cs.vault)
    tr = await _claim(chain, w, v.payable + 1)
    assert codes(tr) == [309]
    assert (await getters.get_vault_data(chain, w.cs.vault)).paid_out == v.paid_out


async def test_provider_admin_from_non_owner(chain, world):
    w = world
    for op in (operations.provider_unstake, operations.provider_withdraw):
        tr = await op(w.cs.operator, w.provider, check=False)
        assert codes(tr) == [200]
    tr = await operations.provider_rotate_key(w.cs.operator, w.provider, 5, check=False)
    assert codes(tr) == [200]
    tr = await _claim(chain, w, TON)  # from the owner: fine; from someone else: no
    pv = PayoutVoucher(G, w.cs.vault, w.provider, 1, 2 * TON)
    tr = await operations.provider_claim(
        w.cs.operator, w.provider, pv, w.cs.operator_key.sign(pv), check=False
    )
    assert codes(tr) == [200]


async def test_registry_admin_from_non_owner(chain, contracts_set, make_wallet):
    cs = contracts_set
    stranger = await make_wallet()
    tr = await operations.allow_image(stranger, cs.registry, 99, check=False)
    assert codes(tr) == [100]
    tr = await operations.allow_model(stranger, cs.registry, "x", check=False)
    assert codes(tr) == [100]
    tr = await operations.update_params(stranger, cs.registry, cs.params, check=False)
    assert codes(tr) == [100]
    tr = await operations.change_owner(stranger, cs.registry, stranger.address, check=False)
    assert codes(tr) == [100]
    assert not await getters.is_image_allowed(chain, cs.registry, 99)
    tr = await stranger.transfer(cs.registry, TON // 1000, SetImage(1, 5, True).to_cell())
    assert codes(tr) == [101]


async def test_register_with_too_little_stake(chain, contracts_set, make_wallet):
    cs = contracts_set
    owner = await make_wallet()
    _, tr = await operations.register_provider(
        owner, chain, cs.registry, Key().public, cs.params.min_provider_stake - 1, CAPS, check=False
    )
    assert codes(tr) == [102]


async def test_unbonding(chain, world, clock):
    w = world
    tr = await operations.provider_withdraw(w.node_owner, w.provider, check=False)
    assert codes(tr) == [204]  # not unbonding yet
    await operations.provider_unstake(w.node_owner, w.provider)
    tr = await operations.provider_top_up(w.node_owner, w.provider, TON, check=False)
    assert codes(tr) == [203]
    tr = await operations.provider_withdraw(w.node_owner, w.provider, check=False)
    assert codes(tr) == [205]  # before the unbonding delay ends
    p = await getters.get_provider_data(chain, w.provider)
    assert p.state_name == "unbonding" and p.stake == 2 * TON
    now = await clock.advance(w.cs.params.unbonding_delay + 1)
    assert now >= p.unlock_time, (now, p.unlock_time, await chain.clock())
    before = await w.node_owner.balance()
    await operations.provider_withdraw(w.node_owner, w.provider)
    # the stake comes back, minus gas (the storage reserve stays on the provider)
    assert await w.node_owner.balance() - before > 2 * TON - TON // 100
    p = await getters.get_provider_data(chain, w.provider)
    assert p.state_name == "withdrawn" and p.stake == 0


def _receipts(escrow, job=9):
    r1 = Receipt(G, escrow, job, 1, 2, 3, 4, 5, 6, 7, b"\0" * 32, b"\1" * 32)
    r2 = Receipt(G, escrow, job, 1, 2, 3, 4, 5, 6, 8, b"\0" * 32, b"\1" * 32)
    return r1, r2


async def test_slash_rejections_then_slash(chain, world, make_wallet):
    w = world
    reporter = await make_wallet()
    r1, r2 = _receipts(w.escrow)
    k = w.node_key
    # the same receipt twice
    tr = await operations.provider_slash(
        reporter, w.provider, (r1, k.sign(r1)), (r1, k.sign(r1)), check=False
    )
    assert codes(tr) == [211]
    # different jobs
    r3 = Receipt(G, w.escrow, 10, 1, 2, 3, 4, 5, 6, 7, b"\0" * 32, b"\1" * 32)
    tr = await operations.provider_slash(
        reporter, w.provider, (r1, k.sign(r1)), (r3, k.sign(r3)), check=False
    )
    assert codes(tr) == [211]
    # signed by another key
    other = Key()
    tr = await operations.provider_slash(
        reporter, w.provider, (r1, other.sign(r1)), (r2, other.sign(r2)), check=False
    )
    assert codes(tr) == [211]
    # a real equivocation: the bounty goes to the reporter, the rest to governance
    p = await getters.get_provider_data(chain, w.provider)
    rb, gb = await reporter.balance(), await w.cs.gov.balance()
    await operations.provider_slash(reporter, w.provider, (r1, k.sign(r1)), (r2, k.sign(r2)))
    bounty = p.stake * p.slash_bounty_bps // 10000
    assert await reporter.balance() - rb > bounty - TON // 20
    assert await w.cs.gov.balance() - gb > p.stake - bounty - TON // 20
    assert (await getters.get_provider_data(chain, w.provider)).state_name == "slashed"
    # replay: already slashed
    tr = await operations.provider_slash(
        reporter, w.provider, (r1, k.sign(r1)), (r2, k.sign(r2)), check=False
    )
    assert codes(tr) == [210]


async def test_rotated_key_stays_slashable(chain, world, make_wallet):
    w = world
    r1, r2 = _receipts(w.escrow, job=11)
    old = w.node_key
    await operations.provider_rotate_key(w.node_owner, w.provider, Key().public)
    tr = await operations.provider_rotate_key(w.node_owner, w.provider, Key().public, check=False)
    assert codes(tr) == [213]  # one rotation per unbonding delay
    reporter = await make_wallet()
    await operations.provider_slash(reporter, w.provider, (r1, old.sign(r1)), (r2, old.sign(r2)))
    assert (await getters.get_provider_data(chain, w.provider)).state_name == "slashed"


# --- network ------------------------------------------------------------------------------


async def test_signed_objects_for_another_network_are_refused(chain, world, make_wallet):
    """Every signed object names its network: one signed (by the right key) for mainnet is
    refused on the devnet, whose global id is its own; nothing moves."""
    w = world
    assert await chain.get_global_id() == G != MAINNET_GLOBAL_ID
    # a spend voucher
    v = SpendVoucher(MAINNET_GLOBAL_ID, w.escrow, w.cs.vault, TON)
    tr = await operations.escrow_charge(w.cs.operator, w.escrow, v, w.spend.sign(v), check=False)
    assert codes(tr) == [411]
    assert (await getters.get_escrow_data(chain, w.escrow)).charged == 0
    # an epoch commit
    vd = await getters.get_vault_data(chain, w.cs.vault)
    c = EpochCommit(
        MAINNET_GLOBAL_ID,
        w.cs.vault,
        vd.last_epoch + 1,
        b"\x09" * 32,
        vd.charged_in,
        vd.committable,
        vd.fees_accrued,
        0,
    )
    tr = await operations.vault_commit_epoch(
        w.cs.operator, w.cs.vault, c, w.cs.operator_key.sign(c), check=False
    )
    assert codes(tr) == [320]
    # a payout voucher (of a committed epoch): the vault refuses, the Provider restores
    epoch = await _committed_epoch(chain, w.cs)
    pv = PayoutVoucher(MAINNET_GLOBAL_ID, w.cs.vault, w.provider, epoch, TON)
    tr = await operations.provider_claim(
        w.node_owner, w.provider, pv, w.cs.operator_key.sign(pv), check=False
    )
    assert codes(tr) == [320]
    assert await getters.get_provider_claimed(chain, w.provider, w.cs.vault) == 0
    # an equivocation proof made of receipts for another network
    r1, r2 = (replace(r, global_id=MAINNET_GLOBAL_ID) for r in _receipts(w.escrow, job=12))
    k = w.node_key
    reporter = await make_wallet()
    tr = await operations.provider_slash(
        reporter, w.provider, (r1, k.sign(r1)), (r2, k.sign(r2)), check=False
    )
    assert codes(tr) == [216]
    assert (await getters.get_provider_data(chain, w.provider)).state_name == "active"
    # the same objects for this network go through
    v = replace(v, global_id=G)
    await operations.escrow_charge(w.cs.operator, w.escrow, v, w.spend.sign(v))
    pv = replace(pv, global_id=G)
    await operations.provider_claim(w.node_owner, w.provider, pv, w.cs.operator_key.sign(pv))
