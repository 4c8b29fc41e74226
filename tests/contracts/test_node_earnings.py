"""`imago provider earnings` (node/earnings.py): the matcher's ledger, checked against the
node's receipt log and the chain. The fake matcher (tests/contracts/fake_matcher.py)
publishes epochs the test settles and commits on a fresh Vault."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from contracts.chain import getters
from contracts.chain.units import format_ton
from node.earnings import EarningsError, compute_earnings
from node.keys import NodeKeys, load_or_create_keys
from node.receipt_log import FILE_NAME, ReceiptLog
from protocol.ledger import fee_of

from . import fake_matcher
from .fake_matcher import Env, make_receipt, raw

env = fake_matcher.env  # the fixture
REPO = Path(__file__).resolve().parents[2]


class Node:
    """The node's side: its keystore and receipt log in the state dir."""

    def __init__(self, env: Env) -> None:
        self.keys = load_or_create_keys(env.state_dir / "node_keys.json")
        self.log = ReceiptLog(env.state_dir / FILE_NAME)
        env.matcher.node_keys[raw(env.provider)] = self.keys.ed25519_public

    def serve(self, job: int, prompt: int, completion: int, *, logged: bool = True):
        """Sign a receipt as the node does at the end of a job; (receipt, its hash)."""
        receipt = make_receipt(job, prompt, completion)
        boc, receipt_hash = receipt.encode()
        signature = self.keys.ed25519.sign(receipt_hash)
        if logged:
            self.log.append(
                receipt.job_id.to_bytes(32, "big"),
                receipt.time,
                base64.b64encode(boc).decode(),
                signature.hex(),
            )
        return receipt, receipt_hash


async def earnings(env: Env, key: NodeKeys | None = None):
    async with aiohttp.ClientSession() as session:
        return await compute_earnings(
            client=env.chain,
            session=session,
            matcher=env.matcher.url,
            provider=env.provider,
            node_key=(key or load_or_create_keys(env.state_dir / "node_keys.json")).ed25519,
            state_dir=env.state_dir,
        )


def net(receipts, fee_bps: int) -> int:
    return sum(r.amount - fee_of(r.amount, fee_bps) for r, _ in receipts)


async def test_earnings_by_epoch_checked_three_ways(env):
    node = Node(env)
    fee_bps = (await getters.get_vault_data(env.chain, env.vault)).protocol_fee_bps
    first = [node.serve(1, 100, 2000), node.serve(2, 50, 1000)]
    second = [node.serve(3, 10, 500)]
    pending = node.serve(4, 7, 70)
    n1 = await env.publish_epoch(first, fee_bps)
    n2 = await env.publish_epoch(second, fee_bps)
    earned1, earned2 = net(first, fee_bps), net(second, fee_bps)
    env.serve(env.sign_payout(n1, earned1))
    claim = await env.claimer(multiple=0).run_once()  # epoch 1 claimed
    assert [v.status for v in claim.vaults] == ["claimed"]
    env.serve(env.sign_payout(n2, earned1 + earned2))  # epoch 2 released, not claimed

    e = await earnings(env)
    assert e.issues == [] and env.matcher.refused == []
    assert e.vault == raw(env.vault)
    rows = [
        (r.epoch, r.jobs, r.prompt_tokens, r.completion_tokens, r.earned, r.committed)
        for r in e.epochs
    ]
    assert rows == [
        (n1, 2, 150, 3000, earned1, earned1),
        (n2, 1, 10, 500, earned2, earned1 + earned2),
    ]
    assert [(r.claimed, r.claimable) for r in e.epochs] == [(earned1, 0), (0, earned2)]
    assert (e.claimed, e.claimable, e.committed) == (earned1, earned2, earned1 + earned2)
    assert e.epochs[0].gross == sum(r.amount for r, _ in first)
    assert (e.pending_jobs, e.pending_tokens) == (1, (7, 70))
    assert e.pending == pending[0].amount - fee_of(pending[0].amount, fee_bps)
    assert e.logged == 4

    # Checked epochs are cached: the records are not fetched again.
    env.matcher.records.clear()
    again = await earnings(env)
    assert again.issues == [] and [r.jobs for r in again.epochs] == [2, 1]

    # A matcher that rewrites a committed epoch is caught.
    env.matcher.epochs[n1] = {**env.matcher.epochs[n1], "root": "ab" * 32}
    rewritten = await earnings(env)
    assert any("another root" in i for i in rewritten.issues)


async def test_earnings_report_what_does_not_add_up(env):
    node = Node(env)
    fee_bps = (await getters.get_vault_data(env.chain, env.vault)).protocol_fee_bps
    n1 = await env.publish_epoch([node.serve(1, 100, 2000)], fee_bps)
    # a job in the ledger this node never logged (nor signed)
    n2 = await env.publish_epoch([node.serve(2, 100, 2000, logged=False)], fee_bps)
    # records that do not rebuild the leaf
    n3 = await env.publish_epoch([node.serve(3, 100, 2000)], fee_bps)
    record = env.matcher.records[(n3, raw(env.provider))]["records"][0]["record"]
    record["amount"] = str(int(record["amount"]) + 1)
    # a commit the operator did not sign
    n4 = await env.publish_epoch([node.serve(4, 100, 2000)], fee_bps)
    env.matcher.epochs[n4]["commit"]["signature"] = "00" * 64
    n5 = await env.publish_epoch([node.serve(5, 100, 2000)], fee_bps)  # good again
    e = await earnings(env)
    assert [r.epoch for r in e.epochs] == [n1, n2, n5]
    assert not any("cumulative" in i for i in e.issues), e.issues  # no cascade
    assert any("not in the receipt log" in i for i in e.issues)
    assert any(f"epoch {n3}: the records do not rebuild the leaf" in i for i in e.issues)
    assert any(f"epoch {n4}: the commit is not signed" in i for i in e.issues)
    assert e.pending_jobs == 2  # jobs 3 and 4: in no epoch that checks out


async def test_earnings_need_the_node_key(env):
    Node(env)
    await env.publish_epoch([], 0)
    with pytest.raises(EarningsError, match="403"):
        await earnings(env, key=NodeKeys.generate())


async def test_imago_provider_earnings_json_in_ton(env, tmp_path):
    node = Node(env)
    fee_bps = (await getters.get_vault_data(env.chain, env.vault)).protocol_fee_bps
    jobs = [node.serve(1, 1000, 200_000)]
    n1 = await env.publish_epoch(jobs, fee_bps)
    env.serve(env.sign_payout(n1, net(jobs, fee_bps)))
    node.serve(2, 5, 5)  # pending
    cmd = [
        sys.executable, "-m", "imago.cli", "provider", "earnings", "--json",
        "--chain", env.chain.base_url, "--matcher", env.matcher.url,
        "--state-dir", str(env.state_dir), "--address", raw(env.provider),
    ]  # fmt: skip
    variables = {**os.environ, "IMAGO_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=variables, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out.decode().splitlines()[-1])
    earned = format_ton(net(jobs, fee_bps), unit=False)
    assert doc["issues"] == []
    assert doc["epochs"][0]["epoch"] == n1 and doc["epochs"][0]["earned"] == earned
    assert doc["epochs"][0]["jobs"] == 1 and doc["epochs"][0]["completion_tokens"] == 200_000
    assert doc["totals"]["claimable"] == earned and doc["totals"]["claimed"] == "0"
    assert doc["pending"]["jobs"] == 1
    # and the table people read
    proc = await asyncio.create_subprocess_exec(
        *(c for c in cmd if c != "--json"), env=variables, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0 and "claimable" in text and "pending: 1 job (5 + 5 tokens)" in text
    assert earned in text
