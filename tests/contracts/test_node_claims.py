"""The node's claim loop (node/claims.py) against the devnet.

Each test gets a fresh Vault and a fresh Provider with its owner's wallet (``env``), and a
fake matcher (``tests/contracts/fake_matcher.py``, a small aiohttp server) that serves
``/v1/ledger/payouts/{provider}`` from payout vouchers the test signs with the operator
key, for epochs the test commits on the Vault.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from pytoniq_core import Address

from contracts.chain import getters, operations
from contracts.chain.transactions import Trace
from contracts.chain.wallet import create_keystore
from node.claim_state import ClaimState
from node.claims import CLAIM_FEE
from protocol.signed import PayoutVoucher

from . import fake_matcher
from .conftest import TON, Key
from .fake_matcher import Env, raw

env = fake_matcher.env  # the fixture
REPO = Path(__file__).resolve().parents[2]


def storage_fees(t) -> int:
    phase = getattr(t.parsed.description, "storage_ph", None)
    return int(phase.storage_fees_collected) if phase is not None else 0


def owner_fees(traces: list[Trace], owner: Address) -> int:
    """What the owner's wallet paid in fees for these traces: every transaction's fees
    and the forward fees of the messages they sent (as test_properties counts them), but
    the storage fees the Provider and the Vault paid from their own balances."""
    return sum(
        t.fee
        + sum(m.fwd_fee for m in t.out_msgs if m.destination)
        - (storage_fees(t) if t.address != owner else 0)
        for trace in traces
        for t in trace.transactions
    )


async def test_claims_when_above_the_multiple_and_only_once(env):
    epoch = await env.commit_epoch(TON)
    env.serve(env.sign_payout(epoch, TON))
    before = await env.owner.balance()
    vault_before = await getters.get_vault_data(env.chain, env.vault)
    run = await env.claimer(multiple=10).run_once()
    assert run.refused is None and [v.status for v in run.vaults] == ["claimed"], run
    claim = run.vaults[0]
    assert (claim.amount, claim.claimed_before, claim.epoch) == (TON, 0, epoch)
    assert await env.claimed() == TON
    vault_after = await getters.get_vault_data(env.chain, env.vault)
    assert vault_after.paid_out - vault_before.paid_out == TON
    paid = await env.owner.balance() - before
    fees = owner_fees([claim.trace], env.owner.address)
    assert paid == TON - fees
    assert CLAIM_FEE - CLAIM_FEE // 10 < fees <= CLAIM_FEE  # the multiple's unit is right
    # Kept durably, and a second run has nothing to claim.
    state = ClaimState.load(env.state_dir, env.provider)
    assert state.vouchers[raw(env.vault)].cumulative == TON
    assert state.claims[-1]["amount"] == str(TON)
    again = await env.claimer(multiple=10).run_once()
    assert [v.status for v in again.vaults] == ["nothing"]
    assert await env.owner.balance() - before == paid


async def test_does_not_claim_below_the_multiple_until_forced(env):
    epoch = await env.commit_epoch(TON // 20)
    env.serve(env.sign_payout(epoch, TON // 20))  # 0.05 TON < 10 × 0.0057
    run = await env.claimer(multiple=10).run_once()
    assert [v.status for v in run.vaults] == ["below_multiple"]
    assert run.vaults[0].threshold == 10 * CLAIM_FEE and run.vaults[0].amount == TON // 20
    assert await env.claimed() == 0
    forced = await env.claimer(multiple=10).run_once(force=True)  # `imago provider claim`
    assert [v.status for v in forced.vaults] == ["claimed"]
    assert await env.claimed() == TON // 20


async def test_refuses_a_voucher_whose_epoch_is_not_committed(env):
    await env.commit_epoch(TON)
    env.serve(env.sign_payout(2, TON))  # epoch 2 is not on-chain
    run = await env.claimer(multiple=0).run_once()
    assert run.refused and "not committed" in run.refused
    assert run.vaults == [] and await env.claimed() == 0
    assert ClaimState.load(env.state_dir, env.provider).refused[-1]["epoch"] == 2


async def test_refuses_a_forged_or_misaddressed_voucher(env, make_wallet):
    epoch = await env.commit_epoch(TON)
    env.serve(env.sign_payout(epoch, TON, key=Key()))  # not the operator's key
    run = await env.claimer(multiple=0).run_once()
    assert run.refused and "signature does not verify" in run.refused
    assert run.vaults == [] and await env.claimed() == 0
    # a tampered amount under the operator's signature of another amount
    doc = env.sign_payout(epoch, TON)
    doc["voucher"] = env.sign_payout(epoch, 2 * TON)["voucher"]
    doc["cumulative"] = str(2 * TON)
    env.serve(doc)
    run = await env.claimer(multiple=0).run_once()
    assert run.refused and "signature does not verify" in run.refused
    # signed by the operator, but for another provider
    other = (await make_wallet()).address
    env.serve(env.sign_payout(epoch, TON, provider=other))
    run = await env.claimer(multiple=0).run_once()
    assert run.refused and "another provider" in run.refused
    # the JSON says one thing, the voucher another
    doc = env.sign_payout(epoch, TON)
    doc["cumulative"] = str(TON // 2)
    env.serve(doc)
    run = await env.claimer(multiple=0).run_once()
    assert run.refused and "differ" in run.refused
    assert await env.claimed() == 0
    assert len(ClaimState.load(env.state_dir, env.provider).refused) == 4


async def test_refuses_a_lowered_or_replayed_voucher_and_keeps_the_best(env):
    e1 = await env.commit_epoch(TON)
    first = env.sign_payout(e1, TON)
    env.serve(first)
    run = await env.claimer(multiple=1000).run_once()  # kept, not claimed (below the multiple)
    assert run.refused is None and [v.status for v in run.vaults] == ["below_multiple"]
    e2 = await env.commit_epoch(2 * TON)
    env.serve(env.sign_payout(e2, TON // 2))  # lowered
    run = await env.claimer(multiple=1000).run_once()
    assert run.refused and run.refused.startswith("lowered")
    env.serve(env.sign_payout(e2, 2 * TON))
    run = await env.claimer(multiple=1000).run_once()
    assert run.refused is None and run.vaults[0].cumulative == 2 * TON
    env.serve(first)  # replayed: the voucher of epoch 1 again
    run = await env.claimer(multiple=1000).run_once()
    assert run.refused and run.refused.startswith("lowered")
    env.serve(env.sign_payout(e2, 3 * TON))  # a second amount for epoch 2
    run = await env.claimer(multiple=1000).run_once()
    assert run.refused and "two vouchers for epoch 2" in run.refused
    e3 = await env.commit_epoch(2 * TON)
    env.serve(env.sign_payout(e1, 2 * TON))  # same amount, but an older epoch
    run = await env.claimer(multiple=1000).run_once()
    assert run.refused and run.refused.startswith("replayed")
    # The matcher withholds the best voucher: the node still claims what it kept.
    env.serve(first)
    forced = await env.claimer(multiple=1000).run_once(force=True)
    assert forced.refused and [v.status for v in forced.vaults] == ["claimed"]
    assert forced.vaults[0].amount == 2 * TON and await env.claimed() == 2 * TON
    # Once claimed, a voucher below the on-chain claim is refused even with no memory.
    env.serve(env.sign_payout(e3, TON))
    run = await env.claimer(multiple=0, state_dir=env.state_dir / "fresh").run_once()
    assert run.refused and "already claimed" in run.refused
    assert run.vaults == []


async def test_does_not_claim_what_the_vault_cannot_pay(env):
    # the fresh Vault holds its 5 TON stake: it commits 4 TON of payouts at most, and a
    # voucher above its last commit would be refused
    epoch = await env.commit_epoch(4 * TON)
    env.serve(env.sign_payout(epoch, 6 * TON))
    run = await env.claimer(multiple=0).run_once()
    assert [v.status for v in run.vaults] == ["insolvent"]
    assert await env.claimed() == 0


async def test_a_restart_after_kill_never_double_pays(env, monkeypatch):
    epoch = await env.commit_epoch(TON)
    env.serve(env.sign_payout(epoch, TON))
    before = await env.owner.balance()
    traces: list[Trace] = []

    # 1. Claimed, then killed: the restart has lost its state (a fresh state dir).
    run = await env.claimer(multiple=0).run_once()
    assert [v.status for v in run.vaults] == ["claimed"]
    traces.append(run.vaults[0].trace)
    (env.state_dir / "claims.json").unlink()
    run = await env.claimer(multiple=0).run_once()
    assert [v.status for v in run.vaults] == ["nothing"] and run.vaults[0].trace is None

    # 2. Killed after the Claim was sent, before anything was recorded: same thing.
    e2 = await env.commit_epoch(2 * TON)
    sent = env.sign_payout(e2, 2 * TON)
    env.serve(sent)
    voucher = PayoutVoucher.from_boc(base64.b64decode(sent["voucher"]))
    traces.append(
        await operations.provider_claim(
            env.owner, env.provider, voucher, bytes.fromhex(sent["signature"])
        )
    )
    run = await env.claimer(multiple=0, state_dir=env.state_dir / "after-kill").run_once()
    assert [v.status for v in run.vaults] == ["nothing"]

    # 3. Even a node that claims again anyway (it read `claimed` before the first Claim
    #    landed) is refused by the Provider's counter: it only loses the fee.
    async def stale_claimed(client, provider, vault):
        return 0

    monkeypatch.setattr(getters, "get_provider_claimed", stale_claimed)
    run = await env.claimer(multiple=0, state_dir=env.state_dir / "stale").run_once()
    monkeypatch.undo()
    assert [v.status for v in run.vaults] == ["failed"] and "208" in run.vaults[0].message
    traces.append(run.vaults[0].trace)

    assert await env.claimed() == 2 * TON
    assert await env.owner.balance() - before == 2 * TON - owner_fees(traces, env.owner.address)


async def test_the_node_service_claims_on_its_own(env, tmp_path):
    """`imago node serve --chain … --claim-wallet …`: the loop starts with the app."""
    from node.app import NodeConfig, create_app

    keystore = tmp_path / "owner.json"
    create_keystore(keystore, env.owner.keys, network="devnet")
    epoch = await env.commit_epoch(TON)
    env.serve(env.sign_payout(epoch, TON))
    config = NodeConfig(
        state_dir=env.state_dir,
        devnet=True,
        upstream="http://127.0.0.1:9",  # no engine: the claims do not need one
        matcher=env.matcher.url,
        provider=raw(env.provider),
        chain=env.chain.base_url,
        claim_wallet=str(keystore),
        claim_every=1,
    )
    server = TestServer(create_app(config))
    await server.start_server()
    try:
        for _ in range(100):
            if await env.claimed() == TON:
                break
            await asyncio.sleep(0.2)
        assert await env.claimed() == TON
    finally:
        await server.close()
    state = json.loads((env.state_dir / "claims.json").read_text())
    assert state["providers"][raw(env.provider)]["claims"][-1]["amount"] == str(TON)


async def test_half_a_claim_configuration_is_refused(tmp_path):
    from node.app import NodeConfig, create_app

    config = NodeConfig(state_dir=tmp_path, devnet=True, upstream="http://x", chain="devnet")
    with pytest.raises(ValueError, match="--claim-wallet"):
        create_app(config)


def _claim_command(env: Env, home: Path) -> tuple[list[str], dict[str, str]]:
    """`imago provider claim` for this env's Provider, as its owner (wallet "owner")."""
    if not (home / "wallets" / "owner.json").exists():
        create_keystore(home / "wallets" / "owner.json", env.owner.keys, network="devnet")
    cmd = [
        sys.executable, "-m", "imago.cli", "provider", "claim", "--json",
        "--chain", env.chain.base_url, "--name", "owner", "--address", raw(env.provider),
        "--matcher", env.matcher.url, "--state-dir", str(env.state_dir),
    ]  # fmt: skip
    variables = {**os.environ, "IMAGO_HOME": str(home), "PYTHONPATH": str(REPO)}
    return cmd, variables


async def test_imago_provider_claim_claims_now_whatever_the_multiple(env, tmp_path):
    epoch = await env.commit_epoch(TON // 100)  # far below 1000 × the claim fee
    env.serve(env.sign_payout(epoch, TON // 100))
    cmd, variables = _claim_command(env, tmp_path / "home")
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=variables, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out.decode().splitlines()[-1])
    assert doc["status"] == "ok" and doc["vaults"][0]["status"] == "claimed"
    assert doc["vaults"][0]["amount"] == str(TON // 100)
    assert await env.claimed() == TON // 100
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=variables, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert json.loads(out.decode().splitlines()[-1])["vaults"][0]["status"] == "nothing"


async def test_kill_9_at_any_moment_then_a_restart_never_double_pays(env, tmp_path):
    """`imago provider claim` killed with SIGKILL after a spread of delays (before it
    starts, while it reads the chain, while its Claim is in flight, after), then run
    again: each payout lands exactly once."""
    cmd, variables = _claim_command(env, tmp_path / "home")
    vault_before = (await getters.get_vault_data(env.chain, env.vault)).paid_out
    before = await env.owner.balance()
    cumulative, landed_at_kill = 0, []
    delays = (0.3, 0.9, 1.2, 1.4, 1.6, 1.8, 2.1, 2.6)
    for delay in delays:
        cumulative += TON // 10
        epoch = await env.commit_epoch(cumulative)
        env.serve(env.sign_payout(epoch, cumulative))
        quiet = asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(*cmd, env=variables, stdout=quiet, stderr=quiet)
        await asyncio.sleep(delay)
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        landed_at_kill.append(await env.claimed() == cumulative)
        restart = await asyncio.create_subprocess_exec(
            *cmd, env=variables, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await restart.communicate()
        assert await env.claimed() == cumulative, (out, err)
    print("claim landed before the kill:", landed_at_kill)
    paid_out = (await getters.get_vault_data(env.chain, env.vault)).paid_out - vault_before
    assert paid_out == cumulative  # every payout exactly once
    gained = await env.owner.balance() - before
    n = len(delays)  # one Claim per payout landed, at most one more refused per round
    assert cumulative - 2 * n * CLAIM_FEE <= gained <= cumulative - n * (CLAIM_FEE * 9 // 10)


async def test_only_the_owner_claims_and_an_undeployed_provider_is_waited_for(env, make_wallet):
    epoch = await env.commit_epoch(TON)
    env.serve(env.sign_payout(epoch, TON))
    stranger = env.claimer(multiple=0)
    stranger.wallet = await make_wallet()
    run = await stranger.run_once()
    assert run.status == "no_owner" and not run.failed and await env.claimed() == 0
    early = env.claimer(multiple=0)
    early.provider = Address(
        "0:" + "77" * 32
    )  # registered later (`imago up` starts the node first)
    run = await early.run_once()
    assert run.status == "no_provider" and not run.failed


async def test_a_matcher_that_is_down_does_not_stop_the_claim_of_a_kept_voucher(env):
    epoch = await env.commit_epoch(TON)
    env.serve(env.sign_payout(epoch, TON))
    run = await env.claimer(multiple=1000).run_once()  # kept, below the multiple
    assert [v.status for v in run.vaults] == ["below_multiple"]
    claimer = env.claimer(multiple=0)
    await env.matcher.server.close()
    run = await claimer.run_once()
    assert run.status == "error" and run.failed and "unavailable" in run.message
    assert [v.status for v in run.vaults] == ["claimed"] and await env.claimed() == TON
