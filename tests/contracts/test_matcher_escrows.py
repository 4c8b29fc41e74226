"""The matcher's on-chain escrow check (marketplace.escrows) against real escrows."""

from __future__ import annotations

import pytest
from pytoniq_core import Address

from contracts.chain import getters, operations
from marketplace.escrows import EscrowBook, EscrowMismatch, EscrowRefused, EscrowUnfunded
from protocol.api import relay_message
from tests.contracts.conftest import TON, Key


async def test_a_voucher_must_be_signed_by_the_escrows_own_spend_key(
    chain, contracts_set, make_wallet
) -> None:
    owner = await make_wallet()
    spend, stranger = Key(), Key()
    vault_data = await getters.get_vault_data(chain, contracts_set.vault)
    escrow, _ = await operations.escrow_open(
        owner, contracts_set.vault, spend.public, 2 * TON, vault_data.escrow_close_delay
    )
    book = EscrowBook(chain, contracts_set.vault.to_str(is_user_friendly=False))

    await book.check(escrow, spend.public)  # the key the escrow was deployed with
    with pytest.raises(EscrowMismatch) as wrong_key:  # squatting another client's escrow
        await book.check(escrow, stranger.public)
    assert wrong_key.value.code == "wrong_spend_key"

    elsewhere = EscrowBook(chain, Address("0:" + "33" * 32).to_str(is_user_friendly=False))
    with pytest.raises(EscrowMismatch) as wrong_vault:
        await elsewhere.check(escrow, spend.public)
    assert wrong_vault.value.code == "wrong_vault"

    with pytest.raises(EscrowMismatch) as unknown:
        await book.check(Address("0:" + "44" * 32), spend.public)
    assert unknown.value.code == "unknown_escrow"


async def test_jobs_stop_when_the_escrow_is_spent_or_closed(
    chain, contracts_set, make_wallet
) -> None:
    owner = await make_wallet()
    spend = Key()
    vault_data = await getters.get_vault_data(chain, contracts_set.vault)
    escrow, _ = await operations.escrow_open(
        owner, contracts_set.vault, spend.public, 1 * TON, vault_data.escrow_close_delay
    )
    raw = escrow.to_str(is_user_friendly=False)
    deposited = (await getters.get_escrow_data(chain, escrow)).deposited
    book = EscrowBook(chain, contracts_set.vault.to_str(is_user_friendly=False))

    await book.ensure_funded(raw)  # open, nothing signed away yet
    # a relay request is authorized by the spend key the escrow was deployed with only
    message = relay_message(bytes(32), raw, "a-model", {"11" * 32: bytes(32)})
    assert book.signed_by_spend_key(raw, spend.private.sign(message), message)
    assert not book.signed_by_spend_key(raw, Key().private.sign(message), message)
    book.voucher_stored(raw, deposited - 1)
    await book.ensure_funded(raw)  # one nanoTON left
    book.voucher_stored(raw, deposited)
    with pytest.raises(EscrowUnfunded) as spent:
        await book.ensure_funded(raw)
    assert spent.value.code == "escrow_exhausted"

    await operations.escrow_close(owner, escrow)
    fresh = EscrowBook(chain, None)
    with pytest.raises(EscrowUnfunded) as closed:
        await fresh.ensure_funded(raw)
    assert closed.value.code == "escrow_closed"
    with pytest.raises(EscrowUnfunded) as unknown:
        await fresh.ensure_funded(Address("0:" + "55" * 32).to_str(is_user_friendly=False))
    assert unknown.value.code == "unknown_escrow"


async def test_a_forged_escrow_is_refused(chain, contracts_set, make_wallet) -> None:
    """A getter can say anything: the matcher recomputes where a genuine Escrow of those
    fields lives, and refuses a look-alike (escrow code with a deposit it never got in
    its data) and an Escrow with a close delay other than the Vault's (zero here: one
    the client could empty before any charge lands)."""
    from pytoniq_core import StateInit, begin_cell

    from contracts.chain import addresses, artifacts

    owner, spend = await make_wallet(), Key()
    vault = contracts_set.vault
    vault_data = await getters.get_vault_data(chain, vault)
    book = EscrowBook(chain, vault.to_str(is_user_friendly=False))

    # the look-alike: the escrow's own code, claiming a 1,000 TON deposit
    forged_data = (
        begin_cell()
        .store_address(vault)
        .store_address(owner.address)
        .store_uint(spend.int, 256)
        .store_uint(vault_data.escrow_close_delay, 32)
        .store_uint(0, 8)
        .store_uint(0, 32)
        .store_coins(1000 * TON)
        .store_coins(0)
        .end_cell()
    )
    forged_init = StateInit(code=artifacts.load("escrow").code, data=forged_data)
    forged = addresses.address_of(forged_init)
    await owner.transfer(forged, TON // 10, None, state_init=forged_init, bounce=False)
    lie = await getters.get_escrow_data(chain, forged)
    assert lie.deposited >= 1000 * TON and lie.spend_key == spend.int  # what it claims
    with pytest.raises(EscrowMismatch) as refused:
        await book.check(forged, spend.public)
    assert refused.value.code == "forged_escrow"
    with pytest.raises(EscrowRefused):
        await book.ensure_funded(forged.to_str(is_user_friendly=False))

    # a genuine Escrow contract, opened with no close delay: not one of this Vault's
    quick, _ = await operations.escrow_open(owner, vault, spend.public, TON, 0, check=False)
    assert (await getters.get_escrow_data(chain, quick)).close_delay == 0
    with pytest.raises(EscrowMismatch) as refused:
        await book.check(quick, spend.public)
    assert refused.value.code == "forged_escrow"

    # and the genuine one passes
    genuine, _ = await operations.escrow_open(
        owner, vault, spend.public, TON, vault_data.escrow_close_delay
    )
    await book.check(genuine, spend.public)
