"""Storage reserves and sweeping.

Each long-lived contract keeps a storage reserve on its balance that pays at least ten years
of storage at the chain's prices (config param 18) for its actual size (the account's
storage stat); a withdrawn or slashed Provider and the Registry hand anything above it to
their owner on an authenticated Sweep.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from pytoniq_core import HashMap, Slice

from contracts.chain import addresses, getters, operations
from contracts.chain.devnet import DevnetClient
from contracts.chain.messages.capabilities import Capabilities, ModelPrice
from protocol.signed import model_hash

from .conftest import TON, G, Key
from .test_rejections import codes

ROOT = Path(__file__).resolve().parents[2]
TEN_YEARS = 10 * 365 * 86400 + 3 * 86400  # with their leap days
CAPS = Capabilities(
    "H100", 80, 8, "eu-west", tuple(ModelPrice(model_hash(f"m{i}"), 100, 200) for i in range(4))
)


def tolk_reserve(name: str) -> int:
    """The `<NAME>_STORAGE_RESERVE = ton("x")` constant of contracts/<name>/fees.tolk."""
    text = (ROOT / "contracts" / name / "fees.tolk").read_text()
    m = re.search(rf'^const {name.upper()}_STORAGE_RESERVE = ton\("([0-9.]+)"\)', text, re.M)
    assert m, f"no {name.upper()}_STORAGE_RESERVE in contracts/{name}/fees.tolk"
    whole, _, frac = m[1].partition(".")
    return int(whole) * TON + int((frac + "000000000")[:9])


async def storage_prices(chain: DevnetClient) -> tuple[int, int]:
    """(bit_price_ps, cell_price_ps) of the basechain now, from config param 18:
    storage_prices#cc utime_since:uint32 bit_price_ps:uint64 cell_price_ps:uint64
    mc_bit_price_ps:uint64 mc_cell_price_ps:uint64 (Hashmap 32 of them)."""

    def prices(s: Slice) -> tuple[int, int, int]:
        assert s.load_uint(8) == 0xCC
        return s.load_uint(32), s.load_uint(64), s.load_uint(64)

    param = await chain.get_config_param(18)
    table = HashMap.parse(param.begin_parse(), 32, value_deserializer=prices)
    now = int(time.time())
    since, bit, cell = max(p for p in table.values() if p[0] <= now)
    return bit, cell


def storage_fee(bits: int, cells: int, seconds: int, prices: tuple[int, int]) -> int:
    """What an account of that size pays for ``seconds`` (rounded up, as the chain does)."""
    bit_price, cell_price = prices
    return -(-(bits * bit_price + cells * cell_price) * seconds // 65536)


async def test_storage_reserves_cover_ten_years(chain, contracts_set, make_wallet):
    cs = contracts_set
    node, client = await make_wallet(), await make_wallet()
    provider, _ = await operations.register_provider(
        node, chain, cs.registry, Key().public, 2 * TON, CAPS, seq=7
    )
    v = await getters.get_vault_data(chain, cs.vault)
    escrow, _ = await operations.escrow_open(
        client, cs.vault, Key().public, TON, v.escrow_close_delay
    )
    prices = await storage_prices(chain)
    assert prices == (1, 500)  # the shipped (mainnet) config's basechain prices
    for name, address in [
        ("registry", cs.registry),
        ("vault", cs.vault),
        ("provider", provider),
        ("escrow", escrow),
    ]:
        cells, bits = await chain.storage_stat(address)
        fee = storage_fee(bits, cells, TEN_YEARS, prices)
        reserve = tolk_reserve(name)
        print(f"{name}: {cells} cells, {bits} bits: 10 years {fee / TON:.4f} TON, {reserve=}")
        assert reserve >= fee, (name, reserve, fee)
        assert addresses.STORAGE_RESERVES[name] == reserve, name
    # and the reserves are on the balances: what each keeps beyond what it owes
    p = await getters.get_provider_data(chain, provider)
    assert p.balance >= p.stake + addresses.STORAGE_RESERVES["provider"] - TON // 1000
    e = await getters.get_escrow_data(chain, escrow)
    assert e.balance >= e.deposited - e.charged + addresses.STORAGE_RESERVES["escrow"] - TON // 1000
    v = await getters.get_vault_data(chain, cs.vault)
    owed = v.stake + v.charged_in - v.paid_out - v.fees_withdrawn
    assert v.balance >= owed + addresses.STORAGE_RESERVES["vault"] - TON // 1000
    r = await chain.get_balance(cs.registry)
    assert r >= addresses.STORAGE_RESERVES["registry"] - TON // 1000


async def test_provider_sweeps_what_is_left_to_its_owner(chain, contracts_set, make_wallet, clock):
    cs = contracts_set
    node, stranger = await make_wallet(), await make_wallet()
    provider, _ = await operations.register_provider(
        node, chain, cs.registry, Key().public, 2 * TON, CAPS
    )
    tr = await operations.provider_sweep(node, provider, check=False)
    assert codes(tr) == [215]  # active: its balance is its stake
    await operations.provider_unstake(node, provider)
    await clock.advance(cs.params.unbonding_delay + 1)
    await operations.provider_withdraw(node, provider)
    # value sent to a withdrawn provider (a late top-up) is its owner's
    await stranger.transfer(provider, 3 * TON, None, bounce=False)
    tr = await operations.provider_sweep(stranger, provider, check=False)
    assert codes(tr) == [200]
    before = await node.balance()
    await operations.provider_sweep(node, provider)
    assert await node.balance() - before > 3 * TON - TON // 50
    p = await getters.get_provider_data(chain, provider)
    assert addresses.STORAGE_RESERVES["provider"] - TON // 1000 <= p.balance
    assert p.balance <= addresses.STORAGE_RESERVES["provider"]


async def test_slashed_provider_sweeps_to_its_owner(chain, contracts_set, make_wallet):
    from protocol.signed import Receipt

    cs = contracts_set
    node, reporter, key = await make_wallet(), await make_wallet(), Key()
    provider, _ = await operations.register_provider(
        node, chain, cs.registry, key.public, 2 * TON, CAPS
    )
    escrow = addresses.escrow_address(cs.vault, node.address, 1, 1)
    r1 = Receipt(G, escrow, 5, 1, 2, 3, 4, 5, 6, 7, b"\0" * 32, b"\1" * 32)
    r2 = Receipt(G, escrow, 5, 1, 2, 3, 4, 5, 6, 8, b"\0" * 32, b"\1" * 32)
    await operations.provider_slash(reporter, provider, (r1, key.sign(r1)), (r2, key.sign(r2)))
    await reporter.transfer(provider, TON, None, bounce=False)
    before = await node.balance()
    await operations.provider_sweep(node, provider)
    assert await node.balance() - before > TON - TON // 50
    p = await getters.get_provider_data(chain, provider)
    assert p.state_name == "slashed" and p.balance <= addresses.STORAGE_RESERVES["provider"]


async def test_registry_sweeps_to_governance(chain, contracts_set, make_wallet):
    cs = contracts_set
    stranger = await make_wallet()
    await stranger.transfer(cs.registry, 2 * TON, None, bounce=False)
    tr = await operations.registry_sweep(stranger, cs.registry, check=False)
    assert codes(tr) == [100]
    before = await cs.gov.balance()
    await operations.registry_sweep(cs.gov, cs.registry)
    assert await cs.gov.balance() - before > 2 * TON - TON // 50
    balance = await chain.get_balance(cs.registry)
    assert addresses.STORAGE_RESERVES["registry"] - TON // 1000 <= balance
    assert balance <= addresses.STORAGE_RESERVES["registry"]
