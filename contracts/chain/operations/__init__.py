"""High-level on-chain operations of every role, used by the CLI and the tests.

Each operation sends one internal message from a wallet (anything with ``address`` and
``transfer(...)``, e.g. ``contracts.chain.wallet.Wallet``), waits for the whole chain of
transactions it causes and returns the :class:`~contracts.chain.transactions.Trace`. With
``check=True`` (the default) a failed transaction anywhere in the trace raises
:class:`OperationFailed` naming the contract error.

One goes without a wallet: :func:`vault_commit_epoch_external` sends the operator-signed
commit straight to the Vault as an external message, which the Vault pays for out of the
operator's fees; a refusal there happens before the Vault accepts the message, so it leaves
no transaction and raises :class:`OperationFailed` with the exit code the chain reported.
"""

from .base import (
    ERROR_NAMES,
    EXTERNAL_COMMIT_FEE,
    OP_VALUE,
    TON,
    WRONG_EPOCH,
    OperationFailed,
    failed_exit_codes,
    new_query_id,
)
from .escrow import (
    MAX_BATCH,
    escrow_charge,
    escrow_charges,
    escrow_close,
    escrow_deposit,
    escrow_open,
    escrow_withdraw,
)
from .provider import (
    provider_claim,
    provider_rotate_key,
    provider_slash,
    provider_sweep,
    provider_top_up,
    provider_unstake,
    provider_update_capabilities,
    provider_withdraw,
    register_provider,
)
from .registry import (
    allow_image,
    allow_model,
    change_owner,
    deploy_all,
    deploy_registry,
    registry_sweep,
    update_params,
)
from .vault import (
    deploy_vault,
    vault_commit_epoch,
    vault_commit_epoch_external,
    vault_top_up_stake,
    vault_unstake,
    vault_withdraw_fees,
    vault_withdraw_stake,
)

__all__ = [
    "MAX_BATCH",
    "TON",
    "ERROR_NAMES",
    "EXTERNAL_COMMIT_FEE",
    "OP_VALUE",
    "OperationFailed",
    "WRONG_EPOCH",
    "allow_image",
    "allow_model",
    "change_owner",
    "deploy_all",
    "deploy_registry",
    "deploy_vault",
    "escrow_charge",
    "escrow_charges",
    "escrow_close",
    "escrow_deposit",
    "escrow_open",
    "escrow_withdraw",
    "failed_exit_codes",
    "new_query_id",
    "provider_claim",
    "provider_rotate_key",
    "provider_slash",
    "provider_sweep",
    "provider_top_up",
    "provider_unstake",
    "provider_update_capabilities",
    "provider_withdraw",
    "register_provider",
    "registry_sweep",
    "update_params",
    "vault_commit_epoch",
    "vault_commit_epoch_external",
    "vault_top_up_stake",
    "vault_unstake",
    "vault_withdraw_fees",
    "vault_withdraw_stake",
]
