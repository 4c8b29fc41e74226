"""Fakes for the audit tests, named as such: a LedgerBuilder that settles jobs into epochs
the way docs/ledger.md says a matcher does (signed receipts, salted records, leaves, roots,
operator-signed commits and payout vouchers), a FakeLedgerMatcher (aiohttp) that serves
them over the endpoints of docs/ledger.md with every answer open to tampering, and a
MemorySource that gives the audit the same data and a stub chain without a network."""

from __future__ import annotations

import base64
import copy
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

from client.audit import CommitHistory, OnChainCommit, SourceError
from contracts.chain.getters import EscrowData, ProviderData, VaultData
from protocol.ledger import (
    RECORDS_AUTH_WINDOW_S,
    EscrowLeaf,
    JobRecord,
    ProviderLeaf,
    fee_of,
    merkle_proof,
    merkle_root,
    records_auth_message,
)
from protocol.signed import (
    DEVNET_GLOBAL_ID,
    EpochCommit,
    PayoutVoucher,
    Receipt,
    SpendVoucher,
    cost_nanoton,
    model_hash,
    signature_valid,
)

MODEL = "smollm2"
PRICES = (100_000_000, 200_000_000)  # nanoTON per million prompt / completion tokens


def raw(a: Address | str) -> str:
    return (Address(a) if isinstance(a, str) else a).to_str(is_user_friendly=False)


def public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


# --------------------------------------------------------------------- signed objects
# Built here only, through the constructors of protocol/signed.py, so that a change to
# their fields touches these few lines.


def make_receipt(escrow: str, job_id: bytes, prompt: int, completion: int) -> Receipt:
    return Receipt(
        global_id=DEVNET_GLOBAL_ID,
        escrow=Address(escrow),
        job_id=int.from_bytes(job_id, "big"),
        time=int(time.time()),
        model=model_hash(MODEL),
        prompt_tokens=prompt,
        completion_tokens=completion,
        price_prompt=PRICES[0],
        price_completion=PRICES[1],
        amount=cost_nanoton(prompt, completion, *PRICES),
        request_hash=os.urandom(32),
        response_hash=os.urandom(32),
    )


def make_commit(
    vault: str, epoch: int, root: bytes, charged: int, paid: int, fees: int, leaves: int
) -> EpochCommit:
    return EpochCommit(
        global_id=DEVNET_GLOBAL_ID,
        vault=Address(vault),
        epoch=epoch,
        root=root,
        charged=charged,
        paid=paid,
        fees=fees,
        leaves=leaves,
    )


def make_spend(escrow: str, vault: str, cumulative: int) -> SpendVoucher:
    return SpendVoucher(
        global_id=DEVNET_GLOBAL_ID, escrow=Address(escrow), vault=Address(vault),
        cumulative=cumulative,
    )  # fmt: skip


def make_payout(vault: str, provider: str, epoch: int, cumulative: int) -> PayoutVoucher:
    return PayoutVoucher(
        global_id=DEVNET_GLOBAL_ID,
        vault=Address(vault),
        provider=Address(provider),
        epoch=epoch,
        cumulative=cumulative,
    )


# --------------------------------------------------------------------- the ledger


@dataclass(frozen=True)
class Job:
    escrow: str
    provider: str
    prompt: int = 1000
    completion: int = 500


@dataclass
class BuiltEpoch:
    number: int
    records: dict[tuple[str, str], list[JobRecord]]  # (kind, address) -> sorted by job id
    leaves: list[EscrowLeaf | ProviderLeaf]
    root: bytes
    commit: EpochCommit
    signature: bytes


@dataclass
class LoggedLine:
    escrow: str
    provider: str
    line: dict[str, Any]


@dataclass
class LedgerBuilder:
    """Settles jobs into epochs as docs/ledger.md says the matcher does."""

    vault: str
    operator: Ed25519PrivateKey
    fee_bps: int
    node_keys: dict[str, Ed25519PrivateKey]  # provider -> node key
    epochs: list[BuiltEpoch] = field(default_factory=list)
    receipts: list[LoggedLine] = field(default_factory=list)
    payouts: dict[str, tuple[PayoutVoucher, bytes]] = field(default_factory=dict)
    cumulative: dict[tuple[str, str], int] = field(default_factory=dict)
    totals: tuple[int, int, int] = (0, 0, 0)

    def add_epoch(self, jobs: list[Job]) -> BuiltEpoch:
        number = len(self.epochs) + 1
        records: dict[tuple[str, str], list[JobRecord]] = {}
        for job in jobs:
            job_id = os.urandom(32)
            receipt = make_receipt(job.escrow, job_id, job.prompt, job.completion)
            node_key = self.node_keys[job.provider]
            boc, cell_hash = receipt.encode()
            self.receipts.append(
                LoggedLine(
                    raw(job.escrow),
                    raw(job.provider),
                    {
                        "receipt": base64.b64encode(boc).decode(),
                        "signature": node_key.sign(cell_hash).hex(),
                        "job_id": job_id.hex(),
                        "node": public(node_key).hex(),
                        "amount": str(receipt.amount),
                    },
                )
            )
            record = JobRecord(
                salt=os.urandom(32),
                job_id=job_id,
                escrow=raw(job.escrow),
                provider=raw(job.provider),
                model=model_hash(MODEL).to_bytes(32, "big"),
                prompt_tokens=receipt.prompt_tokens,
                completion_tokens=receipt.completion_tokens,
                price_prompt=receipt.price_prompt,
                price_completion=receipt.price_completion,
                amount=receipt.amount,
                receipt_hash=cell_hash,
            )
            records.setdefault(("escrow", record.escrow), []).append(record)
            records.setdefault(("provider", record.provider), []).append(record)
        for rs in records.values():
            rs.sort(key=lambda r: r.job_id)

        def order(key: tuple[str, str]) -> tuple[int, int, bytes]:
            a = Address(key[1])
            return (0 if key[0] == "escrow" else 1, a.wc, a.hash_part)

        leaves: list[EscrowLeaf | ProviderLeaf] = []
        for kind, address in sorted(records, key=order):
            rs = records[(kind, address)]
            if kind == "escrow":
                amount = sum(r.amount for r in rs)
            else:
                amount = sum(r.amount - fee_of(r.amount, self.fee_bps) for r in rs)
            cumulative = self.cumulative.get((kind, address), 0) + amount
            self.cumulative[(kind, address)] = cumulative
            cls = EscrowLeaf if kind == "escrow" else ProviderLeaf
            sub_root = merkle_root([r.hash() for r in rs])
            leaves.append(cls(address, number, amount, cumulative, sub_root))
        charged = self.totals[0] + sum(lf.amount for lf in leaves if lf.KIND == "escrow")
        paid = self.totals[1] + sum(lf.amount for lf in leaves if lf.KIND == "provider")
        self.totals = (charged, paid, charged - paid)
        root = merkle_root([lf.hash() for lf in leaves])
        commit = make_commit(self.vault, number, root, charged, paid, charged - paid, len(leaves))
        built = BuiltEpoch(number, records, leaves, root, commit, commit.sign(self.operator))
        self.epochs.append(built)
        for lf in leaves:
            if lf.KIND == "provider":
                voucher = make_payout(self.vault, lf.address, number, lf.cumulative)
                self.payouts[lf.address] = (voucher, voucher.sign(self.operator))
        return built

    # -- what the matcher publishes (docs/ledger.md)

    def epoch_json(self, e: BuiltEpoch) -> dict[str, Any]:
        c = e.commit
        charged = sum(lf.amount for lf in e.leaves if lf.KIND == "escrow")
        earned = sum(lf.amount for lf in e.leaves if lf.KIND == "provider")
        return {
            "epoch": e.number,
            "vault": self.vault,
            "root": e.root.hex(),
            "charged": str(c.charged),
            "paid": str(c.paid),
            "fees": str(c.fees),
            "leaves": len(e.leaves),
            "epoch_charged": str(charged),
            "epoch_earned": str(earned),
            "epoch_fees": str(charged - earned),
            "state": "committed",
            "tx_hash": None,
            "commit": {
                "boc": base64.b64encode(c.to_boc()).decode(),
                "signature": e.signature.hex(),
            },
        }

    def leaves_json(self, e: BuiltEpoch) -> list[dict[str, Any]]:
        return [{"index": i, **lf.to_json()} for i, lf in enumerate(e.leaves)]

    def records_json(self, e: BuiltEpoch, kind: str, address: str) -> dict[str, Any] | None:
        rs = e.records.get((kind, raw(address)))
        if rs is None:
            return None
        where = (kind, raw(address))
        index = next(i for i, lf in enumerate(e.leaves) if (lf.KIND, lf.address) == where)
        hashes = [r.hash() for r in rs]
        return {
            "epoch": e.number,
            "root": e.root.hex(),
            "index": index,
            "leaf": e.leaves[index].to_json(),
            "proof": [s.to_json() for s in merkle_proof([lf.hash() for lf in e.leaves], index)],
            "records": [
                {"record": r.to_json(), "proof": [s.to_json() for s in merkle_proof(hashes, i)]}
                for i, r in enumerate(rs)
            ],
        }

    def payout_json(self, provider: str) -> dict[str, Any] | None:
        if provider not in self.payouts:
            return None
        voucher, signature = self.payouts[provider]
        return {
            "provider": provider,
            "vault": self.vault,
            "epoch": voucher.epoch,
            "cumulative": str(voucher.cumulative),
            "voucher": base64.b64encode(voucher.to_boc()).decode(),
            "signature": signature.hex(),
        }

    def receipt_log(self, kind: str, address: str) -> str:
        """The JSON-lines receipt log the escrow's client (or the provider's node) kept."""
        lines = [
            json.dumps(r.line)
            for r in self.receipts
            if (r.escrow if kind == "escrow" else r.provider) == raw(address)
        ]
        return "".join(line + "\n" for line in lines)

    def resign(self, data: dict[str, Any], **changes: Any) -> dict[str, Any]:
        """``data`` (an epoch's JSON) with ``changes`` to its commit, signed again by the
        operator: what an operator who equivocates would publish."""
        boc = base64.b64decode(data["commit"]["boc"])
        commit = replace(EpochCommit.from_boc(boc), **changes)
        out = dict(data)
        for name in ("charged", "paid", "fees"):
            out[name] = str(getattr(commit, name))
        out["root"] = commit.root.hex()
        out["leaves"] = commit.leaves
        out["commit"] = {
            "boc": base64.b64encode(commit.to_boc()).decode(),
            "signature": commit.sign(self.operator).hex(),
        }
        return out


# --------------------------------------------------------------------- the fake matcher


class FakeLedgerMatcher:
    """A fake matcher's public ledger API (docs/ledger.md), served from JSON that a test
    may alter: ``epochs[n]``, ``leaves[n]``, ``records[(n, kind, address)]``,
    ``payouts[provider]``. Pages are ``page`` items long at most, to exercise paging."""

    def __init__(self, builder: LedgerBuilder, party_keys: dict[tuple[str, str], bytes], page=2):
        self.builder = builder
        self.party_keys = {(k, raw(a)): v for (k, a), v in party_keys.items()}
        self.page = page
        self.reset()

    def reset(self) -> None:
        b = self.builder
        self.epochs = {e.number: b.epoch_json(e) for e in b.epochs}
        self.leaves = {e.number: b.leaves_json(e) for e in b.epochs}
        self.records = {
            (e.number, kind, address): b.records_json(e, kind, address)
            for e in b.epochs
            for (kind, address) in e.records
        }
        self.payouts = {p: b.payout_json(p) for p in b.payouts}
        self.refused: list[str] = []

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(
            {"epochs": self.epochs, "leaves": self.leaves, "records": self.records}
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/ledger/epochs", self.list_epochs)
        app.router.add_get("/v1/ledger/epochs/{n}", self.epoch)
        app.router.add_get("/v1/ledger/epochs/{n}/leaves", self.epoch_leaves)
        app.router.add_get("/v1/ledger/epochs/{n}/proof", self.proof)
        app.router.add_get("/v1/ledger/epochs/{n}/records", self.party_records)
        app.router.add_get("/v1/ledger/payouts/{provider}", self.payout)
        return app

    def _limit(self, request: web.Request) -> int:
        return max(1, min(int(request.query.get("limit", self.page)), self.page))

    async def list_epochs(self, request: web.Request) -> web.Response:
        start = int(request.query.get("from", 1))
        numbers = sorted(n for n in self.epochs if n >= start)[: self._limit(request)]
        rest = [n for n in self.epochs if numbers and n > numbers[-1]]
        return web.json_response(
            {"epochs": [self.epochs[n] for n in numbers], "next_from": min(rest, default=None)}
        )

    async def epoch(self, request: web.Request) -> web.Response:
        data = self.epochs.get(int(request.match_info["n"]))
        return web.json_response(data) if data else _not_found()

    async def epoch_leaves(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n not in self.leaves:
            return _not_found()
        offset = int(request.query.get("offset", 0))
        leaves = self.leaves[n]
        chunk = leaves[offset : offset + self._limit(request)]
        end = offset + len(chunk)
        return web.json_response(
            {
                "epoch": n,
                "root": self.epochs[n]["root"],
                "total": len(leaves),
                "leaves": chunk,
                "next_offset": end if end < len(leaves) else None,
            }
        )

    async def proof(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        data = self.records.get((n, request.query["kind"], raw(request.query["address"])))
        if not data:
            return _not_found()
        return web.json_response({k: data[k] for k in ("epoch", "root", "index", "leaf", "proof")})

    async def party_records(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        kind, address = request.query.get("kind", ""), raw(request.query.get("address", ""))
        try:
            key = bytes.fromhex(request.headers["Imago-Party-Key"])
            when = int(request.headers["Imago-Party-Time"])
            signature = bytes.fromhex(request.headers["Imago-Party-Signature"])
            message = records_auth_message(kind, address, n, when)
        except (KeyError, ValueError):
            self.refused.append("malformed")
            return web.json_response({"error": "forbidden"}, status=403)
        if (
            abs(time.time() - when) > RECORDS_AUTH_WINDOW_S
            or key != self.party_keys.get((kind, address))
            or not signature_valid(signature, message, key)
        ):
            self.refused.append(f"{kind} {address}")
            return web.json_response({"error": "forbidden"}, status=403)
        data = self.records.get((n, kind, address))
        return web.json_response(data) if data else _not_found()

    async def payout(self, request: web.Request) -> web.Response:
        data = self.payouts.get(raw(request.match_info["provider"]))
        return web.json_response(data) if data else _not_found()


def _not_found() -> web.Response:
    return web.json_response({"error": "not found"}, status=404)


# --------------------------------------------------------------------- without a network


@dataclass
class StubChain:
    """What the chain would say, for MemorySource."""

    vault: VaultData
    escrows: dict[str, EscrowData] = field(default_factory=dict)
    providers: dict[str, ProviderData] = field(default_factory=dict)
    claimed: dict[str, int] = field(default_factory=dict)
    history: CommitHistory | None = None


class MemorySource:
    """The audit's AuditSource over a FakeLedgerMatcher's JSON and a StubChain."""

    def __init__(self, fake: FakeLedgerMatcher, chain: StubChain):
        self.fake = fake
        self.chain = chain

    async def vault(self) -> VaultData:
        return self.chain.vault

    async def commit_history(self, from_epoch: int) -> CommitHistory:
        if self.chain.history is None:
            raise RuntimeError("no history here")
        return self.chain.history

    async def epochs(self, from_epoch: int) -> list[Any]:
        return [self.fake.epochs[n] for n in sorted(self.fake.epochs) if n >= from_epoch]

    async def epoch(self, n: int) -> Any:
        if n not in self.fake.epochs:
            raise SourceError(f"404 for epoch {n}")
        return self.fake.epochs[n]

    async def leaves(self, epoch: int) -> list[Any]:
        if epoch not in self.fake.leaves or epoch not in self.fake.epochs:
            raise SourceError(f"404 for the leaves of epoch {epoch}")
        data = self.fake.leaves[epoch]
        shown = self.fake.epochs[epoch]
        root = shown.get("root") if isinstance(shown, dict) else None
        total = len(data) if isinstance(data, list) else None
        return [{"epoch": epoch, "root": root, "total": total, "leaves": data}]

    async def payout(self, provider: str) -> Any | None:
        return self.fake.payouts.get(provider)

    async def records(self, epoch: int, kind: str, address: str, key: Any) -> Any:
        assert public(key) == self.fake.party_keys[(kind, raw(address))]
        if (epoch, kind, raw(address)) not in self.fake.records:
            raise SourceError(f"404 for the records of epoch {epoch}")
        return self.fake.records[(epoch, kind, raw(address))]

    async def escrow(self, address: str) -> EscrowData | None:
        return self.chain.escrows.get(address)

    async def provider(self, address: str) -> ProviderData | None:
        return self.chain.providers.get(address)

    async def claimed(self, provider: str) -> int:
        return self.chain.claimed.get(provider, 0)


def stub_chain(builder: LedgerBuilder, registry: str, **vault_fields: Any) -> StubChain:
    """A chain where everything the builder committed happened: the last commit is the
    Vault's, each escrow was charged its latest cumulative, nothing was claimed yet."""
    last = builder.epochs[-1] if builder.epochs else None
    charged = builder.totals[0]
    fields: dict[str, Any] = dict(
        registry=Address(registry),
        operator=Address(registry),
        operator_key=int.from_bytes(public(builder.operator), "big"),
        protocol_fee_bps=builder.fee_bps,
        escrow_close_delay=20,
        unbonding_delay=40,
        stake=5 * 10**9,
        charged_in=charged,
        paid_out=0,
        fees_accrued=charged * builder.fee_bps // 10_000,
        fees_withdrawn=0,
        last_epoch=last.number if last else 0,
        last_root=last.root if last else bytes(32),
        unstaking=0,
        unlock_time=0,
        ready=True,
        balance=10**10,
        committed_charged=builder.totals[0],
        committed_paid=builder.totals[1],
        committed_fees=builder.totals[2],
    )
    fields.update(vault_fields)
    chain = StubChain(VaultData(**fields))
    for (kind, address), cumulative in builder.cumulative.items():
        if kind == "escrow":
            chain.escrows[address] = EscrowData(
                vault=Address(builder.vault),
                owner=Address(registry),
                spend_key=1,
                close_delay=20,
                state=0,
                unlock_time=0,
                deposited=10**10,
                charged=cumulative,
                balance=10**10,
            )
        else:
            node = builder.node_keys[address]
            chain.providers[address] = ProviderData(
                registry=Address(registry),
                owner=Address(registry),
                seq=0,
                state=1,
                node_key=int.from_bytes(public(node), "big"),
                stake=3 * 10**9,
                unlock_time=0,
                unbonding_delay=40,
                slash_bounty_bps=1000,
                prev_key=0,
                prev_key_until=0,
                capabilities=None,
                balance=3 * 10**9,
            )
    chain.history = CommitHistory(
        {
            e.number: OnChainCommit(e.commit, e.commit.hash, 1000 + e.number, bytes(32))
            for e in builder.epochs
        },
        True,
    )
    return chain
