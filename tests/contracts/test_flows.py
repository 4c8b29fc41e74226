"""Happy paths of every message, over the devnet."""

from __future__ import annotations

import os

from contracts import getters, roles
from contracts.messages import Capabilities, ModelPrice
from contracts.protocol.signed import EpochCommit, PayoutVoucher, Receipt, SpendVoucher, model_hash

from .conftest import TON, Key

CAPS = Capabilities("H100", 80, 8, "eu-west", (ModelPrice(model_hash("smollm2"), 100, 200),))


def gas(trace) -> int:
    return sum(t.gas_used for t in trace.transactions[1:])


async def test_full_flow(chain, contracts_set, make_wallet):
    cs = contracts_set
    node_owner = await make_wallet()
    node_key = Key()
    provider, tr = await roles.register_provider(
        node_owner, chain, cs.registry, node_key.public, 3 * TON, CAPS
    )
    print("register", gas(tr), [t.gas_used for t in tr.transactions])
    p = await getters.get_provider_data(chain, provider)
    assert p.state_name == "active" and p.stake == 3 * TON and p.node_key == node_key.int
    assert Capabilities.from_cell(p.capabilities) == CAPS

    client = await make_wallet()
    spend = Key()
    v = await getters.get_vault_data(chain, cs.vault)
    escrow, tr = await roles.escrow_open(
        client, cs.vault, spend.public, 3 * TON, v.escrow_close_delay
    )
    print("open", gas(tr), [t.gas_used for t in tr.transactions])
    tr = await roles.escrow_deposit(client, escrow, 1 * TON)
    print("deposit", gas(tr), [t.gas_used for t in tr.transactions])
    e = await getters.get_escrow_data(chain, escrow)
    assert e.deposited > 3.9 * TON

    voucher = SpendVoucher(escrow, cs.vault, 2 * TON)
    tr = await roles.escrow_charge(cs.operator, escrow, voucher, spend.sign(voucher))
    print("charge", gas(tr), [t.gas_used for t in tr.transactions])
    e = await getters.get_escrow_data(chain, escrow)
    v = await getters.get_vault_data(chain, cs.vault)
    assert e.charged == 2 * TON and v.charged_in == 2 * TON and v.fees_accrued == 2 * TON * 2 // 100

    commit = EpochCommit(cs.vault, 1, os.urandom(32), 2 * TON, 0, v.fees_accrued, 3)
    tr = await roles.vault_commit_epoch(cs.operator, cs.vault, commit, cs.operator_key.sign(commit))
    print("commit", gas(tr), [t.gas_used for t in tr.transactions])

    pv = PayoutVoucher(cs.vault, provider, 1, TON)
    before = await node_owner.balance()
    tr = await roles.provider_claim(node_owner, provider, pv, cs.operator_key.sign(pv))
    print("claim", gas(tr), [t.gas_used for t in tr.transactions])
    after = await node_owner.balance()
    assert after - before > TON - TON // 10
    assert await getters.get_provider_claimed(chain, provider, cs.vault) == TON

    r1 = Receipt(escrow, 7, 1, 1, 1, 1, 1, 1, 1, b"\0" * 32, b"\1" * 32)
    r2 = Receipt(escrow, 7, 1, 1, 1, 1, 1, 1, 2, b"\0" * 32, b"\1" * 32)
    reporter = await make_wallet()
    rb = await reporter.balance()
    tr = await roles.provider_slash(
        reporter, provider, (r1, node_key.sign(r1)), (r2, node_key.sign(r2))
    )
    print("slash", gas(tr), [t.gas_used for t in tr.transactions])
    assert await reporter.balance() - rb > 3 * TON // 10 - TON // 20
    p = await getters.get_provider_data(chain, provider)
    assert p.state_name == "slashed"
