"""Epoch commits as external messages: the Vault pays for them out of the operator's
unwithdrawn protocol fees, and refuses everything it would refuse on the internal path,
plus a commit those fees cannot pay, before it accepts the message (no transaction, not a
nanoton spent)."""

from __future__ import annotations

import pytest
from pytoniq.contract.contract import Contract
from pytoniq_core import Address

from contracts.chain import addresses, getters, operations
from contracts.chain.messages.vault import CommitEpoch
from contracts.chain.results import ToncenterError
from protocol.signed import EpochCommit, SpendVoucher
from tests.contracts.conftest import TON, G, Key

MAINNET = -239


class OwnVault:
    """A Vault of its own (a fresh operator key) with a client's Escrow to charge."""

    def __init__(self, chain, cs, client, vault: Address, key: Key) -> None:
        self.chain, self.cs, self.client, self.vault, self.key = chain, cs, client, vault, key
        self.spend = Key()
        self.escrow: Address | None = None
        self.cumulative = 0

    @classmethod
    async def deploy(cls, chain, cs, make_wallet) -> OwnVault:
        key = Key()
        vault = await operations.deploy_vault(
            cs.operator, cs.registry, key.int, 5 * TON, client=chain
        )
        return cls(chain, cs, await make_wallet(50 * TON), vault, key)

    async def charge(self, amount: int) -> None:
        """Charge the Escrow `amount` more: the Vault accrues its protocol fee on it."""
        if self.escrow is None:
            delay = (await self.data()).escrow_close_delay
            self.escrow, _ = await operations.escrow_open(
                self.client, self.vault, self.spend.public, 20 * TON, delay
            )
        self.cumulative += amount
        voucher = SpendVoucher(G, self.escrow, self.vault, self.cumulative)
        await operations.escrow_charge(
            self.cs.operator, self.escrow, voucher, self.spend.sign(voucher)
        )

    async def data(self) -> getters.VaultData:
        return await getters.get_vault_data(self.chain, self.vault)

    async def next_commit(self, **changes) -> EpochCommit:
        """The next epoch's commit: everything charged, nothing paid, the fees accrued."""
        v = await self.data()
        fields = {
            "global_id": G, "vault": self.vault, "epoch": v.last_epoch + 1,
            "root": (v.last_epoch + 1).to_bytes(32, "big"), "charged": v.charged_in,
            "paid": 0, "fees": v.fees_accrued, "leaves": 1,
        }  # fmt: skip
        return EpochCommit(**{**fields, **changes})

    async def refused(self, commit: EpochCommit, signature: bytes, code: int) -> None:
        """Sent externally, it is refused with `code` before the accept: no transaction,
        the Vault's balance, state and last transaction unchanged."""
        before = await self.chain.get_address_information(self.vault)
        with pytest.raises(operations.OperationFailed) as e:
            await operations.vault_commit_epoch_external(self.chain, self.vault, commit, signature)
        assert e.value.exit_codes == [code] and not e.value.trace.transactions
        await self.unchanged(before)

    async def unchanged(self, before) -> None:
        after = await self.chain.get_address_information(self.vault)
        assert after.balance == before.balance
        assert after.last_transaction_lt == before.last_transaction_lt
        assert after.data.hash == before.data.hash


def slack(v: getters.VaultData) -> int:
    """The real balance less the reserve less what the Vault owes (stake + chargedIn -
    paidOut - feesWithdrawn): storage fees make it fall a little below 0 over time."""
    owed = v.stake + v.charged_in - v.paid_out - v.fees_withdrawn
    return v.balance - addresses.STORAGE_RESERVES["vault"] - owed


async def test_external_commit_fee_matches_the_contract(chain, contracts_set) -> None:
    fee = await getters.get_vault_external_commit_fee(chain, contracts_set.vault)
    assert fee == operations.EXTERNAL_COMMIT_FEE
    assert operations.EXTERNAL_COMMIT_FEE < TON // 100  # sanity: well below a wallet commit's value


async def test_an_external_commit_is_paid_from_the_operators_fees(
    chain, contracts_set, make_wallet
) -> None:
    w = await OwnVault.deploy(chain, contracts_set, make_wallet)
    fee = operations.EXTERNAL_COMMIT_FEE
    bps = (await w.data()).protocol_fee_bps

    # no fees accrued yet: the operator has nothing to pay with (311)
    commit = await w.next_commit()
    await w.refused(commit, w.key.sign(commit), 311)

    # fees of exactly one commit: the counters would pay, but the balance, after this very
    # message's import fee, no longer holds the fee on top of what it owes others (316)
    await w.charge(fee * 10_000 // bps)
    v = await w.data()
    assert v.fees_accrued - v.fees_withdrawn == fee
    commit = await w.next_commit()
    await w.refused(commit, w.key.sign(commit), 316)

    # more fees: accepted, and paid for out of them
    await w.charge(TON)
    before = await w.data()
    commit = await w.next_commit(paid=TON // 2)
    trace = await operations.vault_commit_epoch_external(chain, w.vault, commit, w.key.sign(commit))
    (tx,) = trace.transactions  # the Vault's transaction only: no wallet, no excess
    assert tx.success and Address(tx.account) == w.vault
    after = await w.data()
    assert after.last_epoch == before.last_epoch + 1 == commit.epoch
    assert after.last_root == commit.root and after.committed_paid == TON // 2
    assert (after.committed_charged, after.committed_fees) == (commit.charged, commit.fees)
    # the fees counter moves by exactly the constant; the balance by about it (the constant
    # counts the largest commit cell, 887 bits) plus the storage fee of the transaction
    assert after.fees_withdrawn - before.fees_withdrawn == fee
    assert (after.fees_accrued, after.charged_in, after.stake) == (
        before.fees_accrued, before.charged_in, before.stake
    )  # fmt: skip
    drop = before.balance - after.balance
    assert drop == tx.fee == trace.total_fees
    assert fee - 60_000 <= drop <= fee + tx.storage_fee
    assert slack(after) >= slack(before) - tx.storage_fee  # the fee came out of the fees
    # the whole trace costs well under half a wallet commit's (~0.0064 TON)
    assert trace.total_fees < 3_000_000

    # the operator withdraws what is left of its fees: exactly accrued - withdrawn
    left = after.fees_accrued - after.fees_withdrawn
    await operations.vault_withdraw_fees(contracts_set.operator, w.vault, left)
    v = await w.data()
    assert v.fees_withdrawn == v.fees_accrued
    with pytest.raises(operations.OperationFailed) as e:
        await operations.vault_withdraw_fees(contracts_set.operator, w.vault, 1)
    assert 311 in e.value.exit_codes
    # no fees left: the external path is refused, the wallet path still commits (fallback)
    commit = await w.next_commit(paid=TON // 2)
    await w.refused(commit, w.key.sign(commit), 311)
    await operations.vault_commit_epoch(contracts_set.operator, w.vault, commit, w.key.sign(commit))
    assert (await w.data()).last_epoch == commit.epoch


async def test_refused_external_commits_cost_nothing(chain, contracts_set, make_wallet) -> None:
    w = await OwnVault.deploy(chain, contracts_set, make_wallet)
    await w.charge(2 * TON)  # fees for a dozen commits
    first = await w.next_commit(paid=TON)
    signature = w.key.sign(first)
    await operations.vault_commit_epoch_external(chain, w.vault, first, signature)

    # a replay of the very same message: the epoch is not lastEpoch + 1
    await w.refused(first, signature, 310)
    # forged: signed by another key
    commit = await w.next_commit()
    await w.refused(commit, Key().sign(commit), 304)
    # signed by the operator, for another network (mainnet)
    commit = await w.next_commit(global_id=MAINNET)
    await w.refused(commit, w.key.sign(commit), 320)
    # for another vault
    commit = await w.next_commit(vault=contracts_set.vault)
    await w.refused(commit, w.key.sign(commit), 305)
    # an epoch ahead of the next one
    commit = await w.next_commit(epoch=first.epoch + 2)
    await w.refused(commit, w.key.sign(commit), 310)
    # totals that go backwards, and payouts beyond what the Vault can pay
    commit = await w.next_commit(paid=TON - 1)
    await w.refused(commit, w.key.sign(commit), 317)
    v = await w.data()
    commit = await w.next_commit(paid=v.committable + 1)
    await w.refused(commit, w.key.sign(commit), 318)

    # the internal CommitEpoch body sent as an external message: unknown opcode
    commit = await w.next_commit(paid=TON)
    body = CommitEpoch(operations.new_query_id(), w.key.sign(commit), commit).to_cell()
    boc = Contract.create_external_msg(dest=w.vault, body=body).serialize().to_boc()
    before = await chain.get_address_information(w.vault)
    with pytest.raises(ToncenterError) as e:
        await chain.send_boc_return_hash(boc)
    assert e.value.exit_code == 0xFFFF
    await w.unchanged(before)

    # none of it moved anything: the next epoch commits as if nothing had been tried
    v = await w.data()
    assert v.last_epoch == first.epoch
    await operations.vault_commit_epoch_external(chain, w.vault, commit, w.key.sign(commit))
    assert (await w.data()).last_epoch == first.epoch + 1
