"""The node's claim loop (node/claims.py) against the devnet.

Each test gets a fresh Vault (its own operator key) and a fresh Provider with its owner's
wallet. A fake matcher (a small aiohttp server) serves ``/v1/ledger/payouts/{provider}``
from payout vouchers the test signs with the operator key, for epochs the test commits on
the Vault. Signed objects and commits are built only in ``sign_payout`` and
``commit_epoch`` below, through ``protocol.signed`` constructors and
``contracts.chain.operations``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytoniq_core import Address

from contracts.chain import getters, operations
from contracts.chain.messages import Capabilities, ModelPrice
from contracts.chain.toncenter import Trace
from contracts.chain.wallet import Wallet, create_keystore
from node.claims import CLAIM_FEE, Claimer, ClaimState
from protocol.signed import EpochCommit, PayoutVoucher, model_hash

from .conftest import TON, Key

CAPS = Capabilities("cpu", 0, 0, "local", (ModelPrice(model_hash("smollm2"), 100, 200),))


def raw(a: Address) -> str:
    return a.to_str(is_user_friendly=False)


class FakeMatcher:
    """A fake matcher: serves the payout voucher the test set for each provider."""

    def __init__(self) -> None:
        self.payouts: dict[str, dict] = {}
        self.requests = 0
        app = web.Application()
        app.router.add_get("/v1/ledger/payouts/{provider}", self._payout)
        self.server = TestServer(app)

    async def _payout(self, request: web.Request) -> web.Response:
        self.requests += 1
        doc = self.payouts.get(request.match_info["provider"])
        if doc is None:
            return web.json_response({"error": "no voucher"}, status=404)
        return web.json_response(doc)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@dataclass
class Env:
    chain: object
    operator: Wallet
    operator_key: Key
    vault: Address
    owner: Wallet
    provider: Address
    matcher: FakeMatcher
    state_dir: Path
    epoch: int = 0
    paid: int = 0
    claimers: list[Claimer] = field(default_factory=list)

    # -- the two helpers that build signed objects -----------------------------------

    def sign_payout(self, epoch: int, cumulative: int, *, key: Key | None = None, **over) -> dict:
        """The matcher's answer: a payout voucher signed by the operator (or ``key``)."""
        fields = {"vault": self.vault, "provider": self.provider, "epoch": epoch}
        fields.update(over)
        voucher = PayoutVoucher(cumulative=cumulative, **fields)
        boc, _ = voucher.encode()
        return {
            "provider": raw(voucher.provider),
            "vault": raw(voucher.vault),
            "epoch": voucher.epoch,
            "cumulative": str(voucher.cumulative),
            "voucher": base64.b64encode(boc).decode(),
            "signature": (key or self.operator_key).sign(voucher).hex(),
        }

    async def commit_epoch(self, paid: int) -> int:
        """Commit the next epoch on the Vault, with ``paid`` (cumulative) as providers' due."""
        self.epoch += 1
        self.paid = paid
        commit = EpochCommit(self.vault, self.epoch, os.urandom(32), 0, paid, 0, 1)
        await operations.vault_commit_epoch(
            self.operator, self.vault, commit, self.operator_key.sign(commit)
        )
        return self.epoch

    # ---------------------------------------------------------------------------------

    def serve(self, doc: dict) -> None:
        self.matcher.payouts[raw(self.provider)] = doc

    def claimer(self, multiple: float = 10, state_dir: Path | None = None) -> Claimer:
        """A node's claimer; each one starts from what its state dir holds (a restart)."""
        c = Claimer(
            client=self.chain,
            wallet=self.owner,
            provider=self.provider,
            matcher=self.matcher.url,
            state_dir=state_dir or self.state_dir,
            multiple=multiple,
        )
        self.claimers.append(c)
        return c

    async def claimed(self) -> int:
        return await getters.get_provider_claimed(self.chain, self.provider, self.vault)


@pytest.fixture
async def env(chain, contracts_set, make_wallet, tmp_path) -> AsyncIterator[Env]:
    cs = contracts_set
    key = Key()  # a fresh Vault: its own operator key, its own epochs
    vault = await operations.deploy_vault(cs.operator, cs.registry, key.int, 5 * TON, client=chain)
    owner = await make_wallet(20 * TON)
    provider, _ = await operations.register_provider(
        owner, chain, cs.registry, Key().public, 2 * TON, CAPS
    )
    matcher = FakeMatcher()
    await matcher.server.start_server()
    e = Env(chain, cs.operator, key, vault, owner, provider, matcher, tmp_path / "node")
    yield e
    for c in e.claimers:
        await c.close()
    await matcher.server.close()


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
    epoch = await env.commit_epoch(6 * TON)
    env.serve(env.sign_payout(epoch, 6 * TON))  # the fresh Vault holds its 5 TON stake
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
