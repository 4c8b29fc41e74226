"""Regression tests of the review fixes: the Vault's stake can be withdrawn (only what
invariant 3 leaves free), a charge bounced after an escrow closed reaches the owner, a Vault's
address does not move with the Registry's params, a bounced registration refunds the
registrant, final withdrawals keep the account alive."""

from __future__ import annotations

from dataclasses import replace

from pytoniq_core import Address, begin_cell

from contracts.chain import addresses, getters, operations
from contracts.chain.messages.escrow import Charge, EscrowWithdraw
from contracts.chain.messages.vault import VaultInit
from contracts.chain.wallet import OutMessage
from protocol.signed import EpochCommit, PayoutVoucher, Receipt, SpendVoucher

from .conftest import TEST_PARAMS, TON, G, Key
from .test_rejections import CAPS, codes


async def _fresh_vault(chain, registry, make_wallet, stake=3 * TON):
    operator, key = await make_wallet(), Key()
    vault = await operations.deploy_vault(operator, registry, key.int, stake, client=chain)
    return operator, key, vault


# --- 1. the Vault's stake -----------------------------------------------------------------


async def test_vault_stake_unbonds_and_only_the_free_part_is_withdrawn(
    chain, contracts_set, make_wallet, clock
):
    cs = contracts_set
    op, key, vault = await _fresh_vault(chain, cs.registry, make_wallet)
    v = await getters.get_vault_data(chain, vault)
    assert v.ready and v.unbonding_delay == cs.params.unbonding_delay
    assert 3 * TON - TON // 100 < v.stake < 3 * TON + TON // 100  # stake + fee - costs

    # an empty-body transfer (from anyone) is stake
    await cs.gov.transfer(vault, TON)
    v1 = await getters.get_vault_data(chain, vault)
    assert v.stake + TON * 99 // 100 < v1.stake < v.stake + TON

    tr = await operations.vault_withdraw_stake(op, vault, check=False)
    assert codes(tr) == [313]  # no Unstake
    tr = await operations.vault_unstake(cs.gov, vault, TON, check=False)
    assert codes(tr) == [300]
    tr = await operations.vault_unstake(op, vault, v1.stake + 1, check=False)
    assert codes(tr) == [313]
    await operations.vault_unstake(op, vault, v1.stake)
    tr = await operations.vault_withdraw_stake(op, vault, check=False)
    assert codes(tr) == [314]  # still unbonding

    # claims stay payable during the delay: a payout of 1 TON with nothing charged is
    # covered by the stake alone
    node, node_key = await make_wallet(), Key()
    provider, _ = await operations.register_provider(
        node, chain, cs.registry, node_key.public, 2 * TON, CAPS
    )
    c = EpochCommit(G, vault, 1, b"\x01" * 32, 0, TON, 0, 0)  # 1 TON owed, from the stake
    await operations.vault_commit_epoch(op, vault, c, key.sign(c))
    pv = PayoutVoucher(G, vault, provider, 1, TON)
    await operations.provider_claim(node, provider, pv, key.sign(pv))
    v2 = await getters.get_vault_data(chain, vault)
    assert v2.paid_out == TON and v2.charged_in == 0

    await clock.advance(cs.params.unbonding_delay + 1)
    tr = await operations.vault_withdraw_stake(op, vault, check=False)
    assert codes(tr) == [], tr
    v3 = await getters.get_vault_data(chain, vault)
    # the 1 TON already paid from the stake stays: paidOut <= chargedIn - fees + stake
    assert v3.stake == TON and v3.unstaking == 0
    assert v3.paid_out <= v3.charged_in - v3.fees_accrued + v3.stake
    assert v3.payable == 0
    paid = [t for t in tr.transactions if Address(t.account) == op.address]
    assert paid and v2.balance - v3.balance > v1.stake - TON - TON // 100
    # what stays is exactly what the vault still owes (stake + charged - paid - fees paid)
    # and its storage reserve
    owed = v3.stake + v3.charged_in - v3.paid_out - v3.fees_withdrawn
    # (+ what top-ups did not spend of their gas: the constant is the largest of its group)
    assert v3.balance <= owed + addresses.STORAGE_RESERVES["vault"] + TON // 200

    # nothing left to withdraw
    await operations.vault_unstake(op, vault, TON)
    await clock.advance(cs.params.unbonding_delay + 1)
    tr = await operations.vault_withdraw_stake(op, vault, check=False)
    assert codes(tr) == [315]


# --- 2. a charge bounced after the escrow closed ------------------------------------------


async def test_charge_bounced_after_withdraw_reaches_the_owner(
    chain, contracts_set, make_wallet, clock
):
    cs = contracts_set
    client, spend = await make_wallet(), Key()
    # not the vault's close delay: the vault refuses this escrow's charges (302)
    escrow, _ = await operations.escrow_open(client, cs.vault, spend.public, 2 * TON, 7)
    await operations.escrow_close(client, escrow)
    await clock.advance(8)
    v = SpendVoucher(G, escrow, cs.vault, TON)
    # one external: Charge then Withdraw; the charge's bounce arrives after the Withdraw
    tr = await client.send(
        [
            OutMessage(escrow, TON // 20, Charge(1, spend.sign(v), v).to_cell(), None, True),
            OutMessage(escrow, TON // 20, EscrowWithdraw(2).to_cell(), None, True),
        ]
    )
    assert codes(tr) == [302]
    e = await getters.get_escrow_data(chain, escrow)
    assert e.state == 2 and e.charged == 0
    assert e.balance <= addresses.STORAGE_RESERVES["escrow"]  # the bounced TON went to the owner
    refunds = [t for t in tr.transactions if Address(t.account) == client.address]
    assert len(refunds) >= 2  # the Withdraw's refund and the bounced charge


# --- 3. the Vault's address does not depend on mutable params -----------------------------


async def test_vault_address_survives_update_params(chain, contracts_set, make_wallet):
    cs = contracts_set
    registry, _ = await operations.deploy_registry(cs.gov, TEST_PARAMS)
    op, key, vault = await _fresh_vault(chain, registry, make_wallet)
    assert vault == await getters.get_registry_vault_address(chain, registry, op.address, key.int)
    v = await getters.get_vault_data(chain, vault)
    assert v.ready and v.stake > 2 * TON
    assert v.protocol_fee_bps == TEST_PARAMS.protocol_fee_bps

    new = replace(TEST_PARAMS, protocol_fee_bps=777, escrow_close_delay=99, unbonding_delay=5)
    await operations.update_params(cs.gov, registry, new)
    assert vault == await getters.get_registry_vault_address(chain, registry, op.address, key.int)
    assert vault == addresses.vault_address(registry, op.address, key.int)

    # deploying again adds stake to the same Vault and keeps its params
    again = await operations.deploy_vault(op, registry, key.int, 2 * TON, client=chain)
    assert again == vault
    v2 = await getters.get_vault_data(chain, vault)
    assert v2.stake > v.stake + TON
    assert (v2.protocol_fee_bps, v2.escrow_close_delay, v2.unbonding_delay) == (
        TEST_PARAMS.protocol_fee_bps,
        TEST_PARAMS.escrow_close_delay,
        TEST_PARAMS.unbonding_delay,
    )

    # only the registry initialises a Vault
    empty = begin_cell().end_cell()
    tr = await op.transfer(vault, TON, VaultInit(1, 0, 1, 1, empty, empty).to_cell())
    assert codes(tr) == [312]


# --- 4. a bounced registration refunds the registrant -------------------------------------


async def test_bounced_registration_refunds_the_registrant(chain, contracts_set, make_wallet):
    cs = contracts_set
    node = await make_wallet()
    gov_before = await cs.gov.balance()
    before = await node.balance()
    bad_caps = begin_cell().store_uint(0xBAD, 32).end_cell()
    provider, tr = await operations.register_provider(
        node, chain, cs.registry, Key().public, 2 * TON, bad_caps, check=False
    )
    assert codes(tr) == [214]
    assert (await getters.get_provider_data(chain, provider)).state == 0
    assert await cs.gov.balance() == gov_before  # governance gets nothing
    assert before - await node.balance() < TON // 20  # the stake came back, minus gas


# --- 5. final withdrawals keep a storage reserve -------------------------------------------


async def test_final_withdrawals_keep_the_account(chain, contracts_set, make_wallet, clock):
    cs = contracts_set
    node, client, spend = await make_wallet(), await make_wallet(), Key()
    provider, _ = await operations.register_provider(
        node, chain, cs.registry, Key().public, 2 * TON, CAPS
    )
    escrow, _ = await operations.escrow_open(
        client, cs.vault, spend.public, TON, cs.params.escrow_close_delay
    )
    await operations.provider_unstake(node, provider)
    await operations.escrow_close(client, escrow)
    await clock.advance(max(cs.params.unbonding_delay, cs.params.escrow_close_delay) + 1)
    await operations.provider_withdraw(node, provider)
    await operations.escrow_withdraw(client, escrow)
    p = await getters.get_provider_data(chain, provider)
    e = await getters.get_escrow_data(chain, escrow)
    # the reserve stays (less at most a little storage fee): before, 0 and deletable
    p_reserve, e_reserve = (
        addresses.STORAGE_RESERVES["provider"],
        addresses.STORAGE_RESERVES["escrow"],
    )
    assert p.state == 4 and p.stake == 0 and p_reserve - TON // 10_000 <= p.balance <= p_reserve
    assert e.state == 2 and e_reserve - TON // 10_000 <= e.balance <= e_reserve


# --- 6. a payout the Vault's real balance cannot cover is refused, never lost --------------


async def test_payout_beyond_the_real_balance_is_not_lost(chain, contracts_set, make_wallet, clock):
    """The counters say solvent but the balance is short (storage fees since the fees were
    withdrawn): the claim must come back to the Provider, not abort in the action phase
    with the Provider's counter moved. After a top-up the same voucher pays."""
    cs = contracts_set
    op, key, vault = await _fresh_vault(chain, cs.registry, make_wallet)
    node, client, spend = await make_wallet(), await make_wallet(), Key()
    provider, _ = await operations.register_provider(
        node, chain, cs.registry, Key().public, 2 * TON, CAPS
    )
    v0 = await getters.get_vault_data(chain, vault)
    escrow, _ = await operations.escrow_open(
        client, vault, spend.public, 2 * TON, v0.escrow_close_delay
    )
    sv = SpendVoucher(G, escrow, vault, TON)
    await operations.escrow_charge(op, escrow, sv, spend.sign(sv))
    v = await getters.get_vault_data(chain, vault)
    await operations.vault_withdraw_fees(op, vault, v.fees_accrued - v.fees_withdrawn)
    v = await getters.get_vault_data(chain, vault)
    # the whole of what the counters allow: charged - fees + stake - paid
    c = EpochCommit(G, vault, 1, b"\x06" * 32, v.charged_in, v.payable, v.fees_accrued, 1)
    await operations.vault_commit_epoch(op, vault, c, key.sign(c))
    await clock.advance(600)  # storage fees: the balance falls below the counters
    pv = PayoutVoucher(G, vault, provider, 1, v.payable)
    before = await node.balance()
    tr = await operations.provider_claim(node, provider, pv, key.sign(pv), check=False)
    assert codes(tr) == [316]  # the balance less the storage reserve does not cover it
    # not lost: the Provider's counter is back and the value returned to the owner
    assert await getters.get_provider_claimed(chain, provider, vault) == 0
    assert before - await node.balance() < TON // 50
    assert (await getters.get_vault_data(chain, vault)).paid_out == 0
    # anyone tops the vault up; the same voucher is then paid in full
    await cs.gov.transfer(vault, TON)
    await operations.provider_claim(node, provider, pv, key.sign(pv))
    assert await getters.get_provider_claimed(chain, provider, vault) == v.payable
    assert await node.balance() - before > v.payable - TON // 20


# --- 7. epoch totals bind the Vault ---------------------------------------------------------


async def test_epoch_totals_bind_commits_and_payouts(chain, contracts_set, make_wallet):
    """A commit's totals are cumulative, never go backwards, never exceed what the Vault
    was charged (its paid total: charged - fees + stake); no payout takes the Vault's total
    paid above the paid total of its last commit."""
    cs = contracts_set
    op, key, vault = await _fresh_vault(chain, cs.registry, make_wallet)
    node, client, spend = await make_wallet(), await make_wallet(), Key()
    provider, _ = await operations.register_provider(
        node, chain, cs.registry, Key().public, 2 * TON, CAPS
    )
    v = await getters.get_vault_data(chain, vault)
    escrow, _ = await operations.escrow_open(
        client, vault, spend.public, 3 * TON, v.escrow_close_delay
    )
    sv = SpendVoucher(G, escrow, vault, TON)
    await operations.escrow_charge(op, escrow, sv, spend.sign(sv))
    v = await getters.get_vault_data(chain, vault)
    fees = v.fees_accrued

    async def commit(epoch, charged, paid, fees):
        c = EpochCommit(G, vault, epoch, bytes([epoch]) * 32, charged, paid, fees, 1)
        return codes(await operations.vault_commit_epoch(op, vault, c, key.sign(c), check=False))

    async def claim(cumulative, epoch):
        pv = PayoutVoucher(G, vault, provider, epoch, cumulative)
        return codes(await operations.provider_claim(node, provider, pv, key.sign(pv), check=False))

    # fees above the charged total, or payouts above what the Vault can pay (its charges
    # less fees, plus its stake): refused
    assert await commit(1, TON, 0, TON + 1) == [318]
    assert await commit(1, 10 * v.stake, TON - fees + v.stake + 1, fees) == [318]
    assert (await getters.get_vault_data(chain, vault)).last_epoch == 0
    # a charged total ahead of what the escrows paid in is fine (charges lag the ledger,
    # past a threshold): the stake pays the providers meanwhile
    assert await commit(1, TON + 1, 0, fees) == []
    v = await getters.get_vault_data(chain, vault)
    assert await commit(2, TON + 1, 0, fees) == []
    assert await commit(3, TON + 1, TON // 2, fees) == []
    v1 = await getters.get_vault_data(chain, vault)
    assert (v1.last_epoch, v1.committed_charged, v1.committed_paid, v1.committed_fees) == (
        3,
        TON + 1,
        TON // 2,
        fees,
    )
    # a payout above the committed paid total is refused (and the Provider restores)
    assert await claim(TON // 2 + 1, 3) == [319]
    assert await getters.get_provider_claimed(chain, provider, vault) == 0
    assert await claim(TON // 2, 3) == []
    # totals never go backwards
    assert await commit(4, TON, TON // 2, fees) == [317]
    assert await commit(4, TON + 1, TON // 2 - 1, fees) == [317]
    assert await commit(4, TON + 1, TON // 2, fees - 1) == [317]
    assert await commit(4, TON + 1, TON - fees, fees) == []
    assert await claim(TON - fees + 1, 4) == [319]
    assert await claim(TON - fees, 4) == []
    v2 = await getters.get_vault_data(chain, vault)
    assert v2.paid_out == v2.committed_paid == TON - fees


# --- 8. a slashing bounty is at most half the stake -----------------------------------------


async def test_self_reporting_offender_still_loses_half(chain, make_wallet):
    """The reporter's bounty is capped at 50% of the stake (a Registry refuses a higher
    slash_bounty_bps, and a Provider caps whatever it was given); the rest goes to
    governance. An offender reporting itself keeps at most half."""
    gov, node = await make_wallet(), await make_wallet()
    # a Registry whose initial data (which no message checks) says 100% bounty
    params = replace(TEST_PARAMS, slash_bounty_bps=10_000)
    si = addresses.registry_state_init(gov.address, params)
    registry = addresses.address_of(si)
    await gov.transfer(registry, TON, None, state_init=si, bounce=False)
    node_key, stake = Key(), 4 * TON
    provider, _ = await operations.register_provider(
        node, chain, registry, node_key.public, stake, CAPS
    )
    escrow = addresses.escrow_address(registry, node.address, 1, 1)
    r1 = Receipt(G, escrow, 77, 1, 2, 3, 4, 5, 6, 7, b"\0" * 32, b"\1" * 32)
    r2 = Receipt(G, escrow, 77, 1, 2, 3, 4, 5, 6, 8, b"\0" * 32, b"\1" * 32)
    before, gov_before = await node.balance(), await gov.balance()
    await operations.provider_slash(
        node, provider, (r1, node_key.sign(r1)), (r2, node_key.sign(r2))
    )
    # the offender got back at most half its stake (plus its message value, minus gas)
    assert await node.balance() - before <= stake // 2
    assert await gov.balance() - gov_before >= stake // 2 - TON // 20
    assert (await getters.get_provider_data(chain, provider)).state_name == "slashed"
    # governance cannot set more than 50% either
    tr = await operations.update_params(
        gov, registry, replace(params, slash_bounty_bps=5001), check=False
    )
    assert codes(tr) == [103]
    await operations.update_params(gov, registry, replace(params, slash_bounty_bps=5000))
    assert (await getters.get_registry_data(chain, registry)).slash_bounty_bps == 5000
