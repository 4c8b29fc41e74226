"""A fake matcher for the node's claim and earnings tests, and the devnet set-up they share.

The fake matcher serves the matcher's public ledger API (docs/ledger.md) from what the
test puts in it: ``/v1/ledger/payouts/{provider}``, ``/v1/ledger/epochs`` and the
authenticated ``/v1/ledger/epochs/{n}/records`` (it checks the three headers as the doc
says, and answers 403 to any other key than the provider's node key).

``Env`` is one fresh Vault (its own operator key, so its own epochs) and one fresh
Provider with its owner's wallet. Signed objects are built only in ``Env.sign_payout``,
``Env.commit_epoch`` and ``make_receipt``, through ``protocol.signed`` constructors and
``contracts.chain.operations``: what changes in those objects changes only there.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pytoniq_core import Address

from contracts.chain import getters, operations
from contracts.chain.messages.capabilities import Capabilities, ModelPrice
from contracts.chain.wallet import Wallet
from node.claims import Claimer
from protocol.ledger import (
    EscrowLeaf,
    JobRecord,
    ProviderLeaf,
    fee_of,
    merkle_proof,
    merkle_root,
    records_auth_message,
)
from protocol.signed import DEVNET_GLOBAL_ID, EpochCommit, PayoutVoucher, Receipt, model_hash

from .conftest import TON, Key

CAPS = Capabilities("cpu", 0, 0, "local", (ModelPrice(model_hash("smollm2"), 100, 200),))
ESCROW = "0:" + "e5" * 32


def raw(a: Address | str) -> str:
    return (Address(a) if isinstance(a, str) else a).to_str(is_user_friendly=False)


class FakeMatcher:
    """A fake matcher: the payout vouchers, epochs and records the test publishes."""

    def __init__(self) -> None:
        self.payouts: dict[str, dict] = {}
        self.epochs: dict[int, dict] = {}  # n -> the listing entry
        self.records: dict[tuple[int, str], dict] = {}  # (n, provider) -> records answer
        self.node_keys: dict[str, bytes] = {}  # provider -> its node key
        self.refused: list[str] = []
        app = web.Application()
        app.router.add_get("/v1/ledger/payouts/{provider}", self._payout)
        app.router.add_get("/v1/ledger/epochs", self._epochs)
        app.router.add_get("/v1/ledger/epochs/{n}/records", self._records)
        self.server = TestServer(app)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def _payout(self, request: web.Request) -> web.Response:
        doc = self.payouts.get(request.match_info["provider"])
        if doc is None:
            return web.json_response({"error": "no voucher"}, status=404)
        return web.json_response(doc)

    async def _epochs(self, request: web.Request) -> web.Response:
        start, limit = int(request.query["from"]), int(request.query["limit"])
        numbers = sorted(n for n in self.epochs if n >= start)
        page = numbers[:limit]
        more = numbers[limit:]
        return web.json_response(
            {"epochs": [self.epochs[n] for n in page], "next_from": more[0] if more else None}
        )

    async def _records(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        kind, address = request.query["kind"], request.query["address"]
        try:
            key = bytes.fromhex(request.headers["Imago-Party-Key"])
            at = int(request.headers["Imago-Party-Time"])
            signature = bytes.fromhex(request.headers["Imago-Party-Signature"])
            assert abs(at - time.time()) <= 300
            assert kind == "provider" and key == self.node_keys[address]
            Ed25519PublicKey.from_public_bytes(key).verify(
                signature, records_auth_message(kind, address, n, at)
            )
        except Exception as e:  # anything else is 403, saying nothing
            self.refused.append(f"{type(e).__name__}: {e}")
            return web.json_response({"error": "forbidden"}, status=403)
        doc = self.records.get((n, address))
        if doc is None:
            return web.json_response({"error": "no leaf"}, status=404)
        return web.json_response(doc)


def make_receipt(job: int, prompt: int, completion: int, prices=(20_000_000, 60_000_000)):
    """A receipt as a node signs it (unsigned here: the caller signs)."""
    from protocol.signed import cost_nanoton

    return Receipt(
        global_id=DEVNET_GLOBAL_ID,
        escrow=Address(ESCROW),
        job_id=(int(time.time()) << 224) | job,
        time=int(time.time()),
        model=model_hash("smollm2"),
        prompt_tokens=prompt,
        completion_tokens=completion,
        price_prompt=prices[0],
        price_completion=prices[1],
        amount=cost_nanoton(prompt, completion, *prices),
        request_hash=os.urandom(32),
        response_hash=os.urandom(32),
    )


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
    claimers: list[Claimer] = field(default_factory=list)
    commits: dict[int, tuple[EpochCommit, bytes]] = field(default_factory=dict)
    charged: int = 0  # the matcher's cumulative totals, as its commits carry them
    paid: int = 0
    escrow_cumulative: int = 0
    provider_cumulative: int = 0

    # -- the two helpers that build matcher-signed objects ----------------------------

    def sign_payout(self, epoch: int, cumulative: int, *, key: Key | None = None, **over) -> dict:
        """The matcher's answer: a payout voucher signed by the operator (or ``key``)."""
        fields = {
            "global_id": DEVNET_GLOBAL_ID,
            "vault": self.vault,
            "provider": self.provider,
            "epoch": epoch,
        }
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

    async def commit_epoch(
        self, paid: int, *, root: bytes | None = None, charged: int | None = None, leaves: int = 1
    ) -> int:
        """Commit the next epoch on the Vault with these cumulative totals; its number."""
        self.epoch += 1
        self.paid = paid
        self.charged = paid if charged is None else charged
        commit = EpochCommit(
            DEVNET_GLOBAL_ID,
            self.vault,
            self.epoch,
            root if root is not None else os.urandom(32),
            self.charged,
            self.paid,
            self.charged - self.paid,
            leaves,
        )
        signature = self.operator_key.sign(commit)
        await operations.vault_commit_epoch(self.operator, self.vault, commit, signature)
        self.commits[self.epoch] = (commit, signature)
        return self.epoch

    # -- an epoch of the ledger, published ----------------------------------------------

    async def publish_epoch(self, receipts: list[tuple[Receipt, bytes]], fee_bps: int) -> int:
        """Settle these (receipt, receipt hash) in the next epoch the way the matcher does:
        records, one escrow leaf and one provider leaf, the root committed on-chain, the
        listing and this provider's records served by the fake matcher. Returns n."""
        n = self.epoch + 1
        provider = raw(self.provider)
        records = sorted(
            (
                JobRecord(
                    salt=os.urandom(32),
                    job_id=r.job_id.to_bytes(32, "big"),
                    escrow=ESCROW,
                    provider=provider,
                    model=r.model.to_bytes(32, "big"),
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens,
                    price_prompt=r.price_prompt,
                    price_completion=r.price_completion,
                    amount=r.amount,
                    receipt_hash=h,
                )
                for r, h in receipts
            ),
            key=lambda j: j.job_id,
        )
        hashes = [j.hash() for j in records]
        charged = sum(j.amount for j in records)
        earned = sum(j.amount - fee_of(j.amount, fee_bps) for j in records)
        self.escrow_cumulative += charged
        self.provider_cumulative += earned
        esc = EscrowLeaf(ESCROW, n, charged, self.escrow_cumulative, merkle_root([]))
        prv = ProviderLeaf(provider, n, earned, self.provider_cumulative, merkle_root(hashes))
        leaves = [esc.hash(), prv.hash()]
        root = merkle_root(leaves)
        await self.commit_epoch(
            self.provider_cumulative, root=root, charged=self.escrow_cumulative, leaves=2
        )
        commit, signature = self.commits[n]
        self.matcher.epochs[n] = {
            "epoch": n,
            "vault": raw(self.vault),
            "root": root.hex(),
            "charged": str(commit.charged),
            "paid": str(commit.paid),
            "fees": str(commit.fees),
            "leaves": 2,
            "state": "committed",
            "tx_hash": "",
            "commit": {
                "boc": base64.b64encode(commit.to_boc()).decode(),
                "signature": signature.hex(),
            },
        }
        self.matcher.records[(n, provider)] = {
            "epoch": n,
            "root": root.hex(),
            "leaf": prv.to_json(),
            "index": 1,
            "proof": [s.to_json() for s in merkle_proof(leaves, 1)],
            "records": [
                {"record": j.to_json(), "proof": [s.to_json() for s in merkle_proof(hashes, i)]}
                for i, j in enumerate(records)
            ],
        }
        return n

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
