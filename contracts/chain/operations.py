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

from __future__ import annotations

import re
import secrets
from dataclasses import asdict
from typing import Any

from pytoniq.contract.contract import Contract
from pytoniq_core import Address, Cell

from protocol.signed import EpochCommit, PayoutVoucher, Receipt, SpendVoucher, model_hash

from . import addresses, artifacts, getters
from .addresses import DEFAULT_PARAMS, Sender
from .messages.capabilities import Capabilities
from .messages.escrow import Charge, Close, Deposit, EscrowWithdraw
from .messages.provider import (
    Claim,
    ProviderTopUp,
    RotateKey,
    SignedPayout,
    SignedReceipt,
    Slash,
    SweepProvider,
    Unstake,
    UpdateCapabilities,
    WithdrawStake,
)
from .messages.registry import (
    ChangeOwner,
    DeployVault,
    RegisterProvider,
    RegistryParams,
    SetImage,
    SetModel,
    SweepRegistry,
    UpdateParams,
)
from .messages.vault import (
    CommitEpoch,
    ExternalCommit,
    TopUpStake,
    UnstakeVault,
    WithdrawFees,
    WithdrawVaultStake,
)
from .toncenter import ToncenterClient, ToncenterError
from .transactions import Trace

__all__ = [
    "ERROR_NAMES",
    "DeployError",
    "EXTERNAL_COMMIT_FEE",
    "OP_VALUE",
    "WRONG_EPOCH",
    "OperationFailed",
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
    "vault_withdraw_stake",
    "vault_withdraw_fees",
]

TON = 1_000_000_000

# Value attached for gas to each kind of operation (the excess comes back).
OP_VALUE = {
    "admin": TON // 20,
    "simple": TON // 20,
    "charge": TON // 20,
    "claim": TON // 10,
    "slash": TON // 10,
    "commit": TON // 20,
}

# What an external epoch commit costs the Vault, taken from the operator's unwithdrawn fees
# (added to its feesWithdrawn): the gas of GAS_VAULT_COMMIT_EXTERNAL and the import fee of the
# message (its commit cell, at most 887 bits), at the mainnet prices the devnet runs with.
# The Vault's `external_commit_fee` get-method gives it at its own chain's prices
# (externalCommitFee() in contracts/vault/fees.tolk); a test checks the two agree.
EXTERNAL_COMMIT_FEE = 2_565_200

WRONG_EPOCH = 310  # vault: an epoch commit that is not lastEpoch + 1 (a replay)

# Contract error codes (contracts/*/errors.tolk) for messages.
ERROR_NAMES = {
    100: "registry: not owner",
    101: "registry: not enough value",
    102: "registry: stake too low",
    103: "registry: bad params (fee above 100% or slashing bounty above 50%)",
    104: "registry: not from one of its providers",
    200: "provider: not owner",
    201: "provider: not enough value",
    202: "provider: not from registry",
    203: "provider: not active",
    204: "provider: not unbonding",
    205: "provider: still locked (unbonding)",
    207: "provider: voucher for another provider",
    208: "provider: voucher not above what was claimed",
    210: "provider: not slashable",
    211: "provider: proof does not verify",
    213: "provider: key rotated too recently",
    214: "provider: malformed capabilities",
    215: "provider: neither withdrawn nor slashed",
    216: "provider: a receipt of the proof is for another network",
    300: "vault: not operator",
    301: "vault: not enough value",
    302: "vault: sender is not an escrow of this vault",
    303: "vault: sender is not a provider of this registry",
    304: "vault: bad signature",
    305: "vault: voucher for another vault",
    306: "vault: voucher for another provider",
    307: "vault: epoch not committed",
    308: "vault: voucher not above what was claimed",
    309: "vault: would pay more than charged - fees + stake",
    310: "vault: wrong epoch",
    311: "vault: more than the accrued fees",
    312: "vault: VaultInit not from the registry",
    313: "vault: not unstaking (or more than the stake)",
    314: "vault: still locked (unbonding)",
    315: "vault: no stake free (it covers what is owed)",
    316: "vault: balance less the storage reserve does not cover it",
    317: "vault: epoch commit totals go backwards",
    318: "vault: epoch commit totals beyond what the vault was charged",
    319: "vault: payout above the last epoch commit's paid total",
    320: "vault: voucher or commit for another network",
    400: "escrow: not owner",
    401: "escrow: not enough value",
    402: "escrow: bad signature",
    403: "escrow: voucher for another escrow",
    404: "escrow: voucher for another vault",
    405: "escrow: voucher not above what was charged",
    406: "escrow: charge beyond the deposit",
    407: "escrow: closed",
    408: "escrow: not closing",
    409: "escrow: still locked (close delay)",
    410: "escrow: not open",
    411: "escrow: voucher for another network",
    0xFFFF: "unknown opcode",
    9: "malformed body (cell underflow)",
}


class OperationFailed(RuntimeError):
    """A transaction of the operation's trace failed, or (``exit_codes`` given, empty
    trace) the contract refused an external message before accepting it."""

    def __init__(self, what: str, trace: Trace, *, exit_codes: list[int | None] | None = None):
        self.trace = trace
        self.exit_codes = failed_exit_codes(trace) if exit_codes is None else exit_codes
        names = ", ".join(
            f"{c} ({ERROR_NAMES.get(c, 'tvm error')})" if c is not None else "action failed"
            for c in self.exit_codes
        )
        super().__init__(f"{what} failed: {names}")


def failed_exit_codes(trace: Trace) -> list[int | None]:
    """Exit codes of the failed transactions of a trace (None: the action phase failed)."""
    out: list[int | None] = []
    for t in trace.transactions:
        if t.success or t.compute_skipped and not t.aborted:
            continue
        out.append(t.exit_code if not t.compute_success else None)
    return out


def new_query_id() -> int:
    return secrets.randbits(64)


def _key_int(key: bytes | int) -> int:
    return key if isinstance(key, int) else int.from_bytes(key, "big")


async def _send(
    what: str,
    sender: Sender,
    dest: Address,
    value: int,
    body: Cell | None,
    *,
    check: bool,
    state_init: Any = None,
    **kw: Any,
) -> Trace:
    trace = await sender.transfer(dest, value, body, state_init=state_init, bounce=True, **kw)
    if check and failed_exit_codes(trace):
        raise OperationFailed(what, trace)
    return trace


# --- Registry ----------------------------------------------------------------------------


class DeployError(RuntimeError):
    pass


def _raw(a: Address) -> str:
    return a.to_str(is_user_friendly=False)


def _check(trace: Trace, what: str) -> Trace:
    failed = [t for t in trace.transactions if not t.success]
    if failed:
        t = failed[0]
        raise DeployError(
            f"{what}: transaction on {t.address.to_str()} failed "
            f"(exit code {t.exit_code}, action {t.action_result_code})"
        )
    return trace


async def deploy_registry(
    owner: Sender, params: RegistryParams = DEFAULT_PARAMS, *, value: int | None = None
) -> tuple[Address, Trace]:
    """Deploy the Registry owned by ``owner`` (an empty-body top-up with the StateInit).

    Its initial params are checked here as ``UpdateParams`` checks them on-chain (no message
    checks the StateInit): a fee of at most 100 %, a slashing bounty of at most 50 %."""
    addresses.check_params(params)
    reserve = addresses.STORAGE_RESERVES["registry"]
    if value is None:
        value = reserve + TON // 10
    if value < reserve:
        raise ValueError(f"a Registry keeps a {reserve} nanoTON reserve")
    si = addresses.registry_state_init(owner.address, params)
    addr = addresses.address_of(si)
    trace = await owner.transfer(addr, value, None, state_init=si, bounce=False)
    return addr, _check(trace, "registry deploy")


async def deploy_all(
    owner: Sender,
    *,
    chain: str = "devnet",
    params: RegistryParams = DEFAULT_PARAMS,
    operator: Sender | None = None,
    operator_key: int | None = None,
    vault_stake: int | None = None,
) -> addresses.Deployment:
    """Deploy the Registry and, given an operator, its Vault. Returns the Deployment."""
    registry, _ = await deploy_registry(owner, params)
    dep = addresses.Deployment(
        chain=chain,
        registry=_raw(registry),
        owner=_raw(owner.address),
        params=asdict(params),
        code_hashes={n: a.code_hash_hex for n, a in artifacts.load_all().items()},
        vaults={},
        providers={},
        escrows={},
    )
    if operator is not None and operator_key is not None:
        stake = vault_stake if vault_stake is not None else params.min_vault_stake
        vault = await deploy_vault(
            operator,
            registry,
            operator_key,
            stake,
            client=getattr(operator, "client", None),
            params=params,
        )
        dep.vaults[_raw(operator.address)] = _raw(vault)
    return dep


async def update_params(
    owner: Sender, registry: Address, params: RegistryParams, *, check: bool = True, **kw: Any
) -> Trace:
    body = UpdateParams(new_query_id(), params).to_cell()
    return await _send("update params", owner, registry, OP_VALUE["admin"], body, check=check, **kw)


async def allow_image(
    owner: Sender,
    registry: Address,
    image: int | bytes,
    allowed: bool = True,
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    body = SetImage(new_query_id(), _key_int(image), allowed).to_cell()
    return await _send("allow image", owner, registry, OP_VALUE["admin"], body, check=check, **kw)


async def allow_model(
    owner: Sender,
    registry: Address,
    model: int | str,
    allowed: bool = True,
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    m = model_hash(model) if isinstance(model, str) else model
    body = SetModel(new_query_id(), m, allowed).to_cell()
    return await _send("allow model", owner, registry, OP_VALUE["admin"], body, check=check, **kw)


async def registry_sweep(
    owner: Sender, registry: Address, *, check: bool = True, **kw: Any
) -> Trace:
    """Send everything on the Registry above its storage reserve to its owner (governance)."""
    body = SweepRegistry(new_query_id()).to_cell()
    return await _send(
        "registry sweep", owner, registry, OP_VALUE["admin"], body, check=check, **kw
    )


async def change_owner(
    owner: Sender, registry: Address, new_owner: Address, *, check: bool = True, **kw: Any
) -> Trace:
    body = ChangeOwner(new_query_id(), new_owner).to_cell()
    return await _send("change owner", owner, registry, OP_VALUE["admin"], body, check=check, **kw)


# --- Provider ----------------------------------------------------------------------------


async def register_provider(
    owner: Sender,
    client: ToncenterClient,
    registry: Address,
    node_key: bytes | int,
    stake: int,
    capabilities: Capabilities | Cell,
    *,
    seq: int = 0,
    check: bool = True,
    **kw: Any,
) -> tuple[Address, Trace]:
    """Register a node: the Registry deploys its Provider with ``stake``."""
    reg = await getters.get_registry_data(client, registry)
    caps = capabilities.to_cell() if isinstance(capabilities, Capabilities) else capabilities
    body = RegisterProvider(new_query_id(), seq, _key_int(node_key), caps).to_cell()
    trace = await _send(
        "register provider", owner, registry, stake + reg.register_fee, body, check=check, **kw
    )
    return addresses.provider_address(registry, owner.address, seq), trace


async def provider_top_up(
    owner: Sender, provider: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    body = ProviderTopUp(new_query_id()).to_cell()
    return await _send("provider top-up", owner, provider, amount, body, check=check, **kw)


async def provider_rotate_key(
    owner: Sender, provider: Address, node_key: bytes | int, *, check: bool = True, **kw: Any
) -> Trace:
    body = RotateKey(new_query_id(), _key_int(node_key)).to_cell()
    return await _send("rotate key", owner, provider, OP_VALUE["simple"], body, check=check, **kw)


async def provider_update_capabilities(
    owner: Sender,
    provider: Address,
    capabilities: Capabilities | Cell,
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    caps = capabilities.to_cell() if isinstance(capabilities, Capabilities) else capabilities
    body = UpdateCapabilities(new_query_id(), caps).to_cell()
    return await _send(
        "update capabilities", owner, provider, OP_VALUE["simple"], body, check=check, **kw
    )


async def provider_unstake(
    owner: Sender, provider: Address, *, check: bool = True, **kw: Any
) -> Trace:
    body = Unstake(new_query_id()).to_cell()
    return await _send("unstake", owner, provider, OP_VALUE["simple"], body, check=check, **kw)


async def provider_withdraw(
    owner: Sender, provider: Address, *, check: bool = True, **kw: Any
) -> Trace:
    body = WithdrawStake(new_query_id()).to_cell()
    return await _send(
        "withdraw stake", owner, provider, OP_VALUE["simple"], body, check=check, **kw
    )


async def provider_sweep(
    owner: Sender, provider: Address, *, check: bool = True, **kw: Any
) -> Trace:
    """Withdrawn or slashed: send everything above the storage reserve to the owner."""
    body = SweepProvider(new_query_id()).to_cell()
    return await _send("sweep", owner, provider, OP_VALUE["simple"], body, check=check, **kw)


async def provider_claim(
    owner: Sender,
    provider: Address,
    voucher: PayoutVoucher,
    signature: bytes,
    *,
    value: int | None = None,
    check: bool = True,
    **kw: Any,
) -> Trace:
    """Claim an operator-signed payout voucher; the payout reaches the owner's wallet."""
    body = Claim(new_query_id(), SignedPayout(signature, voucher)).to_cell()
    return await _send(
        "claim", owner, provider, value or OP_VALUE["claim"], body, check=check, **kw
    )


async def provider_slash(
    reporter: Sender,
    provider: Address,
    proof1: tuple[Receipt, bytes],
    proof2: tuple[Receipt, bytes],
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    """Report an equivocation: two different receipts for one job signed by the node key."""
    body = Slash(
        new_query_id(),
        SignedReceipt(proof1[1], proof1[0]),
        SignedReceipt(proof2[1], proof2[0]),
    ).to_cell()
    return await _send("slash", reporter, provider, OP_VALUE["slash"], body, check=check, **kw)


# --- Vault -------------------------------------------------------------------------------


async def deploy_vault(
    operator: Sender,
    registry: Address,
    operator_key: bytes | int,
    stake: int,
    *,
    client: ToncenterClient | None = None,
    params: RegistryParams | None = None,
    check: bool = True,
    **kw: Any,
) -> Address:
    """Ask the Registry to deploy this operator's Vault with ``stake``.

    The Vault's address depends only on (registry, operator, key), not on the Registry's
    params (``params`` is accepted for compatibility and ignored); ``client`` reads the
    exact deploy fee on-chain. Deploying again only adds stake.
    """
    del params
    if client is not None:
        fee = (await getters.get_registry_data(client, registry)).deploy_vault_fee
    else:
        fee = TON  # above deployVaultFee(): gas, forward fee, storage reserve
    body = DeployVault(new_query_id(), _key_int(operator_key)).to_cell()
    await _send("deploy vault", operator, registry, stake + fee, body, check=check, **kw)
    return addresses.vault_address(registry, operator.address, _key_int(operator_key))


async def vault_commit_epoch(
    sender: Sender,
    vault: Address,
    commit: EpochCommit,
    signature: bytes,
    *,
    check: bool = True,
    **kw: Any,
) -> Trace:
    body = CommitEpoch(new_query_id(), signature, commit).to_cell()
    return await _send("epoch commit", sender, vault, OP_VALUE["commit"], body, check=check, **kw)


async def vault_commit_epoch_external(
    client: ToncenterClient,
    vault: Address,
    commit: EpochCommit,
    signature: bytes,
    *,
    timeout: float = 60.0,
    on_poll: Any = None,
) -> Trace:
    """Commit an epoch with an external message to the Vault: no wallet, no value. The Vault
    pays its gas and import fee (``external_commit_fee``) out of the operator's unwithdrawn
    fees. Returns the trace (the Vault's transaction alone).

    Raises :class:`OperationFailed` when the Vault refuses it (every check comes before it
    accepts the message: a replayed epoch 310, another network 320, a bad signature 304,
    fees short 311, balance short 316...): the chain then ran no transaction and nothing was
    spent; ``exit_codes`` holds the code the chain reported (None if it gave none)."""
    body = ExternalCommit(signature, commit).to_cell()
    boc = Contract.create_external_msg(dest=vault, body=body).serialize().to_boc()
    info = await client.get_address_information(vault)
    try:
        sent = await client.send_boc_return_hash(boc)
    except ToncenterError as e:
        if not _not_accepted(e):
            raise
        raise OperationFailed(
            "external epoch commit", Trace([]), exit_codes=[_refusal_exit_code(e)]
        ) from e
    root = await client.wait_for_message(
        sent, vault, after_lt=info.last_transaction_lt, timeout=timeout, on_poll=on_poll
    )
    trace = await client.wait_for_trace(root, timeout=timeout, on_poll=on_poll)
    if failed_exit_codes(trace):
        raise OperationFailed("external epoch commit", trace)
    return trace


def _not_accepted(e: ToncenterError) -> bool:
    """An external message the contract did not accept (the liteserver's wording, which
    toncenter and the devnet pass on)."""
    return e.exit_code is not None or "not accepted" in e.message


_EXIT_CODE = re.compile(r"exit[ _]?code[=:]?\s*(-?\d+)", re.IGNORECASE)


def _refusal_exit_code(e: ToncenterError) -> int | None:
    if e.exit_code is not None:
        return int(e.exit_code)
    m = _EXIT_CODE.search(e.message)
    return int(m[1]) if m else None


async def vault_withdraw_fees(
    operator: Sender, vault: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    body = WithdrawFees(new_query_id(), amount).to_cell()
    return await _send(
        "withdraw fees", operator, vault, OP_VALUE["simple"], body, check=check, **kw
    )


async def vault_top_up_stake(
    operator: Sender, vault: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    body = TopUpStake(new_query_id()).to_cell()
    return await _send("vault top-up", operator, vault, amount, body, check=check, **kw)


async def vault_unstake(
    operator: Sender, vault: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    """Start the unbonding delay for ``amount`` of the Vault's stake (operator only)."""
    body = UnstakeVault(new_query_id(), amount).to_cell()
    return await _send("vault unstake", operator, vault, OP_VALUE["admin"], body, check=check, **kw)


async def vault_withdraw_stake(
    operator: Sender, vault: Address, *, check: bool = True, **kw: Any
) -> Trace:
    """After the delay: pay the requested stake, at most what invariant 3 leaves free."""
    body = WithdrawVaultStake(new_query_id()).to_cell()
    return await _send(
        "vault withdraw stake", operator, vault, OP_VALUE["admin"], body, check=check, **kw
    )


# --- Escrow ------------------------------------------------------------------------------


async def escrow_open(
    owner: Sender,
    vault: Address,
    spend_key: bytes | int,
    amount: int,
    close_delay: int,
    *,
    check: bool = True,
    **kw: Any,
) -> tuple[Address, Trace]:
    """Deploy the owner's Escrow for ``vault`` with a first deposit of ``amount``.

    ``close_delay`` must be the vault's escrow close delay (``VaultData.escrow_close_delay``).
    """
    si = addresses.escrow_state_init(vault, owner.address, _key_int(spend_key), close_delay)
    addr = addresses.address_of(si)
    body = Deposit(new_query_id()).to_cell()
    trace = await _send("escrow open", owner, addr, amount, body, check=check, state_init=si, **kw)
    return addr, trace


async def escrow_deposit(
    sender: Sender, escrow: Address, amount: int, *, check: bool = True, **kw: Any
) -> Trace:
    body = Deposit(new_query_id()).to_cell()
    return await _send("deposit", sender, escrow, amount, body, check=check, **kw)


async def escrow_charge(
    sender: Sender,
    escrow: Address,
    voucher: SpendVoucher,
    signature: bytes,
    *,
    value: int | None = None,
    check: bool = True,
    **kw: Any,
) -> Trace:
    """Submit a client-signed spend voucher: the escrow pays the delta to its vault."""
    body = Charge(new_query_id(), signature, voucher).to_cell()
    return await _send(
        "charge", sender, escrow, value or OP_VALUE["charge"], body, check=check, **kw
    )


MAX_BATCH = 200  # messages in one wallet transfer (v5r1 takes up to 255)


async def escrow_charges(
    sender: Any, charges: list[tuple[Address, SpendVoucher, bytes]], **kw: Any
) -> Trace:
    """Several charges in one wallet transfer (``sender`` is a wallet with ``send``): one
    wallet transaction for all of them. Check each Escrow's ``charged`` afterwards: one
    refused charge does not stop the others."""
    from .wallet import OutMessage

    if not 0 < len(charges) <= MAX_BATCH:
        raise ValueError(f"between 1 and {MAX_BATCH} charges in one transfer")
    messages = [
        OutMessage(
            escrow,
            OP_VALUE["charge"],
            Charge(new_query_id(), signature, voucher).to_cell(),
            bounce=True,
        )
        for escrow, voucher, signature in charges
    ]
    return await sender.send(messages, **kw)


async def escrow_close(owner: Sender, escrow: Address, *, check: bool = True, **kw: Any) -> Trace:
    body = Close(new_query_id()).to_cell()
    return await _send("escrow close", owner, escrow, OP_VALUE["simple"], body, check=check, **kw)


async def escrow_withdraw(
    owner: Sender, escrow: Address, *, check: bool = True, **kw: Any
) -> Trace:
    body = EscrowWithdraw(new_query_id()).to_cell()
    return await _send(
        "escrow withdraw", owner, escrow, OP_VALUE["simple"], body, check=check, **kw
    )
