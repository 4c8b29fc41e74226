"""Happy paths of every message, over the devnet."""

from __future__ import annotations

import os
from dataclasses import replace

from contracts.chain import getters, operations
from contracts.chain.messages.capabilities import Capabilities, ModelPrice
from protocol.signed import EpochCommit, PayoutVoucher, Receipt, SpendVoucher, model_hash

from .conftest import TON, G, Key

CAPS = Capabilities("H100", 80, 8, "eu-west", (ModelPrice(model_hash("smollm2"), 100, 200),))


def gas(trace) -> int:
    return sum(t.gas_used for t in trace.transactions[1:])


async def test_full_flow(chain, contracts_set, make_wallet):
    cs = contracts_set
    node_owner = await make_wallet()
    node_key = Key()
    provider, tr = await operations.register_provider(
        node_owner, chain, cs.registry, node_key.public, 3 * TON, CAPS
    )
    print("register", gas(tr), [t.gas_used for t in tr.transactions])
    p = await getters.get_provider_data(chain, provider)
    assert p.state_name == "active" and p.stake == 3 * TON and p.node_key == node_key.int
    assert Capabilities.from_cell(p.capabilities) == CAPS

    client = await make_wallet()
    spend = Key()
    v = await getters.get_vault_data(chain, cs.vault)
    escrow, tr = await operations.escrow_open(
        client, cs.vault, spend.public, 3 * TON, v.escrow_close_delay
    )
    print("open", gas(tr), [t.gas_used for t in tr.transactions])
    tr = await operations.escrow_deposit(client, escrow, 1 * TON)
    print("deposit", gas(tr), [t.gas_used for t in tr.transactions])
    e = await getters.get_escrow_data(chain, escrow)
    assert e.deposited > 3.8 * TON  # 4 TON but the storage reserve (0.1 TON) and gas

    voucher = SpendVoucher(G, escrow, cs.vault, 2 * TON)
    tr = await operations.escrow_charge(cs.operator, escrow, voucher, spend.sign(voucher))
    print("charge", gas(tr), [t.gas_used for t in tr.transactions])
    e = await getters.get_escrow_data(chain, escrow)
    v = await getters.get_vault_data(chain, cs.vault)
    assert e.charged == 2 * TON and v.charged_in == 2 * TON and v.fees_accrued == 2 * TON * 2 // 100

    commit = EpochCommit(G, cs.vault, 1, os.urandom(32), 2 * TON, TON, v.fees_accrued, 3)
    tr = await operations.vault_commit_epoch(
        cs.operator, cs.vault, commit, cs.operator_key.sign(commit)
    )
    print("commit", gas(tr), [t.gas_used for t in tr.transactions])

    pv = PayoutVoucher(G, cs.vault, provider, 1, TON)
    before = await node_owner.balance()
    tr = await operations.provider_claim(node_owner, provider, pv, cs.operator_key.sign(pv))
    print("claim", gas(tr), [t.gas_used for t in tr.transactions])
    after = await node_owner.balance()
    assert after - before > TON - TON // 10
    assert await getters.get_provider_claimed(chain, provider, cs.vault) == TON

    r1 = Receipt(G, escrow, 7, 1, 1, 1, 1, 1, 1, 1, b"\0" * 32, b"\1" * 32)
    r2 = Receipt(G, escrow, 7, 1, 1, 1, 1, 1, 1, 2, b"\0" * 32, b"\1" * 32)
    reporter = await make_wallet()
    rb = await reporter.balance()
    tr = await operations.provider_slash(
        reporter, provider, (r1, node_key.sign(r1)), (r2, node_key.sign(r2))
    )
    print("slash", gas(tr), [t.gas_used for t in tr.transactions])
    assert await reporter.balance() - rb > 3 * TON // 10 - TON // 20
    p = await getters.get_provider_data(chain, provider)
    assert p.state_name == "slashed"


async def test_registry_admin_happy_paths(chain, contracts_set, make_wallet):
    cs = contracts_set
    await operations.allow_image(cs.gov, cs.registry, 0xABC)
    assert await getters.is_image_allowed(chain, cs.registry, 0xABC)
    await operations.allow_image(cs.gov, cs.registry, 0xABC, allowed=False)
    assert not await getters.is_image_allowed(chain, cs.registry, 0xABC)
    await operations.allow_model(cs.gov, cs.registry, "llama")
    assert await getters.is_model_allowed(chain, cs.registry, model_hash("llama"))
    await operations.allow_model(cs.gov, cs.registry, "llama", allowed=False)
    assert not await getters.is_model_allowed(chain, cs.registry, model_hash("llama"))
    await operations.update_params(cs.gov, cs.registry, replace(cs.params, protocol_fee_bps=250))
    assert (await getters.get_registry_data(chain, cs.registry)).protocol_fee_bps == 250
    await operations.update_params(cs.gov, cs.registry, cs.params)
    other = await make_wallet()
    await operations.change_owner(cs.gov, cs.registry, other.address)
    assert (await getters.get_registry_data(chain, cs.registry)).owner == other.address
    await operations.change_owner(other, cs.registry, cs.gov.address)
    assert (await getters.get_registry_data(chain, cs.registry)).owner == cs.gov.address


async def test_provider_and_vault_maintenance(chain, contracts_set, make_wallet):
    cs = contracts_set
    owner, key = await make_wallet(), Key()
    provider, _ = await operations.register_provider(
        owner, chain, cs.registry, key.public, 2 * TON, CAPS
    )
    await operations.provider_top_up(owner, provider, TON)
    p = await getters.get_provider_data(chain, provider)
    assert 2 * TON + TON - TON // 100 < p.stake < 3 * TON
    caps = Capabilities("A100", 40, 2, "us", ())
    await operations.provider_update_capabilities(owner, provider, caps)
    p = await getters.get_provider_data(chain, provider)
    assert Capabilities.from_cell(p.capabilities) == caps
    new_key = Key()
    await operations.provider_rotate_key(owner, provider, new_key.public)
    p = await getters.get_provider_data(chain, provider)
    assert p.node_key == new_key.int and p.prev_key == key.int and p.prev_key_until > 0

    v0 = await getters.get_vault_data(chain, cs.vault)
    await operations.vault_top_up_stake(cs.operator, cs.vault, TON)
    v1 = await getters.get_vault_data(chain, cs.vault)
    assert TON - TON // 100 < v1.stake - v0.stake < TON
    if v1.fees_accrued > v1.fees_withdrawn:
        amount = v1.fees_accrued - v1.fees_withdrawn
        before = await cs.operator.balance()
        await operations.vault_withdraw_fees(cs.operator, cs.vault, amount)
        v2 = await getters.get_vault_data(chain, cs.vault)
        assert v2.fees_withdrawn == v1.fees_accrued
        assert await cs.operator.balance() - before > amount - TON // 50


async def test_registering_twice_refunds(chain, contracts_set, make_wallet):
    cs = contracts_set
    owner = await make_wallet()
    provider, _ = await operations.register_provider(
        owner, chain, cs.registry, Key().public, 2 * TON, CAPS
    )
    before = await owner.balance()
    again, _ = await operations.register_provider(
        owner, chain, cs.registry, Key().public, 3 * TON, CAPS
    )
    assert again == provider
    assert before - await owner.balance() < TON // 20  # the 3 TON came back
    assert (await getters.get_provider_data(chain, provider)).stake == 2 * TON
    other, _ = await operations.register_provider(
        owner, chain, cs.registry, Key().public, 2 * TON, CAPS, seq=1
    )
    assert other != provider
    assert (await getters.get_provider_data(chain, other)).seq == 1


async def test_plain_transfer_to_an_escrow_is_a_deposit(chain, contracts_set, make_wallet):
    cs = contracts_set
    client, spend = await make_wallet(), Key()
    escrow, _ = await operations.escrow_open(
        client, cs.vault, spend.public, TON, cs.params.escrow_close_delay
    )
    e0 = await getters.get_escrow_data(chain, escrow)
    await client.transfer(escrow, TON, None, bounce=True)
    e1 = await getters.get_escrow_data(chain, escrow)
    assert TON - TON // 100 < e1.deposited - e0.deposited < TON
