from contracts.chain import getters

from .conftest import TON


async def test_deploy_set(chain, contracts_set):
    reg = await getters.get_registry_data(chain, contracts_set.registry)
    assert reg.owner == contracts_set.gov.address
    v = await getters.get_vault_data(chain, contracts_set.vault)
    print(reg, v)
    assert v.stake > 4 * TON
