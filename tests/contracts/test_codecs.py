"""Python codecs: message round trips, and child addresses computed in Python equal the
ones the contracts compute."""

from __future__ import annotations

import os

import pytest
from pytoniq_core import Address, begin_cell

from contracts.chain import addresses, getters
from contracts.chain.messages import body, escrow, opcodes, parse, provider, registry, vault
from contracts.chain.messages.body import MessageError
from contracts.chain.messages.capabilities import Capabilities, ModelPrice
from contracts.chain.messages.registry import RegistryParams
from protocol.signed import EpochCommit, PayoutVoucher, Receipt, SpendVoucher

from .conftest import G, Key

A = Address("0:" + "ab" * 32)
B = Address("0:" + "cd" * 32)
SIG = bytes(range(64))
R = Receipt(G, A, 1, 2, 3, 4, 5, 6, 7, 8, b"\1" * 32, b"\2" * 32)

SAMPLES = [
    body.ReturnExcess(1),
    registry.UpdateParams(2, RegistryParams(1, 2, 3, 4, 5, 6)),
    registry.SetImage(3, 2**255, True),
    registry.SetModel(4, 7, False),
    registry.ChangeOwner(5, A),
    registry.RegisterProvider(6, 1, 2**256 - 1, Capabilities("H100", 80, 8, "eu").to_cell()),
    registry.DeployVault(7, 42),
    registry.SlashedStake(8, A, 3),
    registry.ForwardedFunds(9),
    provider.ProviderInit(10, 10**9, 5, 60, 1000, begin_cell().end_cell(), A),
    provider.ProviderTopUp(11),
    provider.RotateKey(12, 99),
    provider.UpdateCapabilities(13, begin_cell().store_uint(1, 8).end_cell()),
    provider.Unstake(14),
    provider.WithdrawStake(15),
    provider.Claim(16, provider.SignedPayout(SIG, PayoutVoucher(G, A, B, 1, 10))),
    provider.Slash(17, provider.SignedReceipt(SIG, R), provider.SignedReceipt(SIG, R)),
    provider.ProviderPayout(18, 5),
    provider.StakeReturned(19, 6),
    provider.SlashBounty(20, 7),
    vault.PayoutRequest(21, 1, 2, A, 3, provider.SignedPayout(SIG, PayoutVoucher(G, A, B, 1, 2))),
    vault.PayoutPaid(22, 1, 2),
    vault.CommitEpoch(23, SIG, EpochCommit(G, A, 1, b"\3" * 32, 1, 2, 3, 4)),
    vault.WithdrawFees(24, 5),
    vault.TopUpStake(25),
    vault.FeesPaid(26, 1),
    escrow.Deposit(27),
    escrow.Charge(28, SIG, SpendVoucher(G, A, B, 5)),
    escrow.Close(29),
    escrow.EscrowWithdraw(30),
    escrow.EscrowCharged(31, 5, A, 7, B),
    escrow.EscrowRefund(32, 8),
    vault.VaultInit(33, 200, 20, 40, begin_cell().end_cell(), begin_cell().end_cell()),
    vault.UnstakeVault(34, 5),
    vault.WithdrawVaultStake(35),
    vault.VaultStakeReturned(36, 5),
    body.Swept(37),
    registry.SweepRegistry(38),
    provider.SweepProvider(39),
    vault.ExternalCommit(SIG, EpochCommit(G, A, 2, b"\4" * 32, 5, 6, 7, 8)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    cell = msg.to_cell()
    assert type(msg).from_cell(cell) == msg
    assert parse.parse_body(cell) == msg


def test_every_message_is_sampled_and_opcodes_unique():
    assert {type(m) for m in SAMPLES} == set(parse.MESSAGES.values())
    assert len(parse.MESSAGES) == len(SAMPLES)


def test_malformed_cells_are_rejected():
    with pytest.raises(MessageError):
        escrow.Charge.from_cell(escrow.Deposit(1).to_cell())
    with pytest.raises(MessageError):
        escrow.Deposit.from_cell(begin_cell().store_uint(opcodes.OP_DEPOSIT, 32).end_cell())
    with pytest.raises(MessageError):
        parse.parse_body(begin_cell().store_uint(0xDEAD, 32).end_cell())
    assert parse.parse_body(begin_cell().end_cell()) is None


def test_capabilities_round_trip():
    c = Capabilities("RTX 4090", 24, 2, "eu-west", (ModelPrice(1, 2, 3), ModelPrice(4, 5, 6)))
    assert Capabilities.from_cell(c.to_cell()) == c
    with pytest.raises(MessageError):
        Capabilities("x" * 200, 1, 1, "r").to_cell()


async def test_python_addresses_equal_contract_addresses(chain, contracts_set, make_wallet):
    cs = contracts_set
    owner = await make_wallet()
    for seq in (0, 1, 2**32 - 1):
        on_chain = await getters.get_registry_provider_address(
            chain, cs.registry, owner.address, seq
        )
        assert on_chain == addresses.provider_address(cs.registry, owner.address, seq)
        via_vault = await getters.get_vault_provider_address(chain, cs.vault, owner.address, seq)
        assert via_vault == on_chain
    k = Key().int
    on_chain = await getters.get_registry_vault_address(chain, cs.registry, owner.address, k)
    assert on_chain == addresses.vault_address(cs.registry, owner.address, k)
    assert cs.vault == addresses.vault_address(
        cs.registry, cs.operator.address, cs.operator_key.int
    )
    spend = int.from_bytes(os.urandom(32), "big")
    on_chain = await getters.get_vault_escrow_address(chain, cs.vault, owner.address, spend)
    assert on_chain == addresses.escrow_address(
        cs.vault, owner.address, spend, cs.params.escrow_close_delay
    )


async def test_code_getters_match_the_build(chain, contracts_set):
    from contracts.chain import artifacts

    codes = await getters.get_child_codes(chain, contracts_set.registry)
    assert codes.provider.hash == artifacts.load("provider").code_hash
    assert codes.vault.hash == artifacts.load("vault").code_hash
    assert codes.escrow.hash == artifacts.load("escrow").code_hash
    escrow_hash, provider_hash = await getters.get_vault_code_hashes(chain, contracts_set.vault)
    assert escrow_hash == codes.escrow.hash and provider_hash == codes.provider.hash
