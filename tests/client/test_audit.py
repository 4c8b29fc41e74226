"""`imago audit`: the pure checks over ledgers built with protocol/ledger.py, then the real
command, as a subprocess, against a fake matcher serving a ledger committed on a devnet
Vault."""

from __future__ import annotations

import base64
import copy
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytoniq_core import Address

from client.audit import (
    CommitHistory,
    LeafChain,
    OnChainCommit,
    Party,
    Totals,
    check_chain_head,
    check_commit,
    check_cumulatives,
    check_escrow_account,
    check_history,
    check_leaves,
    check_payout,
    check_provider_account,
    check_receipts,
    check_records,
    check_totals,
    load_receipt_log,
    parse_epoch,
    run_audit,
)
from client.audit_cli import load_party_key
from protocol.ledger import JobRecord
from tests.client.audit_fakes import (
    FakeLedgerMatcher,
    Job,
    LedgerBuilder,
    MemorySource,
    make_commit,
    public,
    raw,
    stub_chain,
)
from tests.contracts import conftest as contract_fixtures

FEE_BPS = 200

# the devnet, a deployed Registry and funded wallets (end-to-end tests, at the bottom)
devnet = contract_fixtures.devnet
chain = contract_fixtures.chain
contracts_set = contract_fixtures.contracts_set
make_wallet = contract_fixtures.make_wallet


def addr(tag: int) -> str:
    return "0:" + f"{tag:02x}" * 32


REGISTRY = addr(0x11)
VAULT = addr(0x7A)
E1, E2 = addr(0xE1), addr(0xE2)
P1, P2 = addr(0xB1), addr(0xB2)


@dataclass
class Ledger:
    builder: LedgerBuilder
    fake: FakeLedgerMatcher
    spend: dict[str, Ed25519PrivateKey]
    nodes: dict[str, Ed25519PrivateKey]

    def source(self, **vault_fields):
        self.chain = stub_chain(self.builder, REGISTRY, **vault_fields)
        return MemorySource(self.fake, self.chain)

    def pub(self, n: int):
        return parse_epoch(self.fake.epochs[n])


def build_ledger(epochs: list[list[Job]] | None = None) -> Ledger:
    nodes = {P1: Ed25519PrivateKey.generate(), P2: Ed25519PrivateKey.generate()}
    spend = {E1: Ed25519PrivateKey.generate(), E2: Ed25519PrivateKey.generate()}
    b = LedgerBuilder(VAULT, Ed25519PrivateKey.generate(), FEE_BPS, nodes)
    for jobs in epochs or [
        [Job(E1, P1), Job(E1, P1, 3000, 20), Job(E2, P2, 10, 700), Job(E1, P2)],
        [Job(E1, P1, 7, 9), Job(E2, P1)],
        [Job(E2, P2, 1, 1)],
    ]:
        b.add_epoch(jobs)
    keys = {("escrow", e): public(k) for e, k in spend.items()}
    keys |= {("provider", p): public(k) for p, k in nodes.items()}
    return Ledger(b, FakeLedgerMatcher(b, keys), spend, nodes)


@pytest.fixture
def ledger() -> Ledger:
    return build_ledger()


def operator_key(lg: Ledger) -> bytes:
    return public(lg.builder.operator)


# --------------------------------------------------------------------- the whole audit


async def test_a_consistent_ledger_passes(ledger):
    report = await run_audit(ledger.source(), VAULT)
    assert report.ok, report.render()
    assert [e.epoch for e in report.epochs] == [1, 2, 3]
    assert report.checked["leaves"] == 4 + 3 + 2
    assert report.checked["payout_vouchers"] == 2 and report.checked["escrow_charges"] == 2
    assert report.epochs[-1].anchored == "the Vault's lastRoot"
    assert report.epochs[0].anchored == "the Vault's commit transaction"
    data = report.to_json()
    assert data["ok"] and data["first_mismatch"] is None
    assert "OK" in report.render()


async def test_without_history_older_roots_rest_on_the_signed_commits(ledger):
    report = await run_audit(ledger.source(), VAULT, history=False)
    assert report.ok
    assert report.epochs[0].anchored == "operator-signed commit"


async def test_a_tampered_leaf_is_named_by_epoch_and_index(ledger):
    leaf = ledger.fake.leaves[2][1]
    leaf["amount"] = str(int(leaf["amount"]) + 1)  # the hash field left as published
    report = await run_audit(ledger.source(), VAULT)
    first = report.findings[0]
    assert (first.check, first.epoch, first.leaf) == ("leaf-hash", 2, 1)
    assert "epoch 2, leaf #1" in report.render()
    assert {"root", "cumulative", "total-charged"} <= {f.check for f in report.findings}


async def test_a_tampered_leaf_with_its_hash_recomputed_breaks_its_chain_and_the_root(ledger):
    from protocol.ledger import EscrowLeaf

    data = ledger.fake.leaves[1][0]
    leaf = EscrowLeaf.from_json(data)
    forged = replace(leaf, cumulative=leaf.cumulative + 5, amount=leaf.amount + 5)
    ledger.fake.leaves[1][0] = {"index": 0, **forged.to_json()}
    report = await run_audit(ledger.source(), VAULT)
    assert not report.ok
    assert any(f.check == "root" and f.epoch == 1 for f in report.findings)
    assert any(f.check == "total-charged" and f.epoch == 1 for f in report.findings), (
        report.render()
    )


async def test_a_root_other_than_the_vaults_is_named(ledger):
    ledger.fake.epochs[3] = ledger.builder.resign(ledger.fake.epochs[3], root=os.urandom(32))
    report = await run_audit(ledger.source(), VAULT)
    assert any(f.check == "root-onchain" and f.epoch == 3 for f in report.findings)
    assert any(f.check == "onchain-root" and f.epoch == 3 for f in report.findings)


async def test_an_older_root_is_checked_against_the_vaults_history(ledger):
    ledger.fake.epochs[1] = ledger.builder.resign(ledger.fake.epochs[1], root=os.urandom(32))
    report = await run_audit(ledger.source(), VAULT)
    assert report.findings[0].epoch == 1
    assert any(f.check == "onchain-root" for f in report.findings)
    # without the chain's history, the leaves still do not hash to the published root
    report = await run_audit(ledger.source(), VAULT, history=False)
    assert [f.check for f in report.findings if f.epoch == 1] == ["root"]


async def test_a_missing_or_extra_epoch_is_named(ledger):
    del ledger.fake.epochs[2]
    report = await run_audit(ledger.source(), VAULT)
    assert report.findings[0].check == "epochs" and report.findings[0].epoch == 2
    lg = build_ledger()
    report = await run_audit(lg.source(last_epoch=2, last_root=lg.builder.epochs[1].root), VAULT)
    assert any(f.check == "epochs" and f.epoch == 3 for f in report.findings)


async def test_from_epoch_chains_from_the_epoch_before(ledger):
    report = await run_audit(ledger.source(), VAULT, from_epoch=2)
    assert report.ok, report.render()
    assert [e.epoch for e in report.epochs] == [2, 3]
    assert any("taken as given" in w for w in report.warnings)
    ledger.fake.epochs[2] = ledger.builder.resign(ledger.fake.epochs[2], charged=1)
    report = await run_audit(ledger.source(), VAULT, from_epoch=3)
    assert any(f.check == "total-charged" and f.epoch == 3 for f in report.findings)


async def test_onchain_counters_beyond_the_ledger_are_findings(ledger):
    src = ledger.source(paid_out=10**9)
    ledger.chain.claimed[P1] = 1
    report = await run_audit(src, VAULT)
    assert {f.check for f in report.findings} >= {"paid-out"}
    src = ledger.source(charged_in=ledger.builder.totals[0] + 1)
    report = await run_audit(src, VAULT)
    assert [f.check for f in report.findings] == ["charged-in"]


def test_the_vaults_committed_totals_are_compared_once_its_getter_has_them(ledger):
    # VaultData gains committed_charged/paid/fees with the contract fixes; until then the
    # audit compares what it has.
    charged, paid, fees = ledger.builder.totals
    vd = ledger.source().chain.vault
    pubs = [ledger.pub(n) for n in (1, 2, 3)]
    for totals, ok in (((charged, paid, fees), True), ((charged, paid + 1, fees), False)):
        later = SimpleNamespace(
            **{
                **vd.__dict__,
                "committed_charged": totals[0],
                "committed_paid": totals[1],
                "committed_fees": totals[2],
            }
        )
        found = check_chain_head(pubs, 1, later)
        assert (not found) == ok, found
    assert [f.check for f in found] == ["totals-onchain-paid"]


# --------------------------------------------------------------------- epochs and commits


def test_commit_must_be_signed_by_the_operator_and_say_what_the_epoch_says(ledger):
    pub = ledger.pub(1)
    assert not check_commit(pub, VAULT, operator_key(ledger))
    found = check_commit(pub, VAULT, public(Ed25519PrivateKey.generate()))
    assert [f.check for f in found] == ["commit-signature"]
    data = dict(ledger.fake.epochs[1], paid="1")
    assert [f.check for f in check_commit(parse_epoch(data), VAULT, operator_key(ledger))] == [
        "commit-paid"
    ]
    assert [f.check for f in check_commit(pub, addr(0x99), operator_key(ledger))] == [
        "vault",
        "commit-vault",
    ]
    data = dict(ledger.fake.epochs[1], commit={"boc": "AAAA", "signature": "00"})
    found = check_commit(parse_epoch(data), VAULT, operator_key(ledger))
    assert found[0].check == "commit" and "unreadable" in found[0].message


def test_history_names_a_commit_the_vault_did_not_execute(ledger):
    pub = ledger.pub(2)
    other = make_commit(VAULT, 2, os.urandom(32), 1, 1, 0, 1)
    history = CommitHistory({2: OnChainCommit(other, other.hash, 5, bytes(32))}, True)
    anchored, found = check_history(pub, history)
    assert {f.check for f in found} >= {"onchain-root", "onchain-charged"}
    anchored, found = check_history(pub, CommitHistory({}, True))
    assert [f.check for f in found] == ["commit-onchain"]
    anchored, found = check_history(pub, CommitHistory({}, False))
    assert not found and anchored == "operator-signed commit"


def test_leaves_order_count_and_epoch(ledger):
    pub = ledger.pub(1)
    pages = [{"epoch": 1, "root": pub.root.hex(), "total": 4, "leaves": ledger.fake.leaves[1]}]
    leaves, found = check_leaves(pub, pages)
    assert len(leaves) == 4 and not found
    swapped = [dict(item, index=i) for i, item in enumerate(reversed(ledger.fake.leaves[1]))]
    _, found = check_leaves(pub, [{**pages[0], "leaves": swapped}])
    assert {"leaf-order", "root"} <= {f.check for f in found}
    _, found = check_leaves(pub, [{**pages[0], "leaves": ledger.fake.leaves[1][:3]}])
    assert {"leaf-count", "root"} <= {f.check for f in found}
    bad = [dict(ledger.fake.leaves[1][0], epoch=9), *ledger.fake.leaves[1][1:]]
    _, found = check_leaves(pub, [{**pages[0], "leaves": bad}])
    assert found[0].check == "leaf-epoch" and found[0].leaf == 0
    _, found = check_leaves(pub, [{**pages[0], "root": "00" * 32}])
    assert [f.check for f in found] == ["leaves-root"]
    garbage = [{"kind": "escrow"}, *ledger.fake.leaves[1][1:]]
    _, found = check_leaves(pub, [{**pages[0], "leaves": garbage}])
    assert found[0].check == "leaf-format" and found[0].leaf == 0


def test_totals_tie_out(ledger):
    b = ledger.builder
    leaves1, leaves2 = b.epochs[0].leaves, b.epochs[1].leaves
    pub1, pub2 = ledger.pub(1), ledger.pub(2)
    assert not check_totals(pub1, Totals(), leaves1, FEE_BPS)
    assert not check_totals(pub2, Totals(pub1.charged, pub1.paid, pub1.fees), leaves2, FEE_BPS)
    found = check_totals(pub2, Totals(), leaves2, FEE_BPS)  # not chained to epoch 1
    assert {"total-charged", "total-paid"} <= {f.check for f in found}
    wrong = replace(pub1, epoch_earned=pub1.epoch_earned + 1)
    assert [f.check for f in check_totals(wrong, Totals(), leaves1, FEE_BPS)] == ["epoch-earned"]
    # providers earning the whole charge: the protocol's fee is missing
    greedy = [replace(lf, amount=lf.amount * 2) if lf.KIND == "provider" else lf for lf in leaves1]
    found = check_totals(pub1, Totals(), greedy, FEE_BPS)
    assert "epoch-fees" in {f.check for f in found}


def test_cumulatives_chain_across_epochs(ledger):
    lc = LeafChain(full=True)
    for e in ledger.builder.epochs:
        assert not check_cumulatives(e.number, e.leaves, lc)
    assert lc.earned[P1] == lc.latest[("provider", P1)][0]
    lc = LeafChain(full=True)
    e1, e2 = ledger.builder.epochs[:2]
    check_cumulatives(1, e1.leaves, lc)
    skewed = [replace(e2.leaves[0], cumulative=e2.leaves[0].cumulative + 1), *e2.leaves[1:]]
    found = check_cumulatives(2, skewed, lc)
    assert [(f.check, f.epoch, f.leaf, f.address) for f in found] == [
        ("cumulative", 2, 0, e2.leaves[0].address)
    ]


def test_chain_head(ledger):
    pubs = [ledger.pub(n) for n in (1, 2, 3)]
    vd = stub_chain(ledger.builder, REGISTRY).vault
    assert not check_chain_head(pubs, 1, vd)
    found = check_chain_head(pubs, 1, replace(vd, last_root=bytes(32)))
    assert [(f.check, f.epoch) for f in found] == [("root-onchain", 3)]
    found = check_chain_head(pubs, 1, replace(vd, paid_out=pubs[-1].paid + 1))
    assert [f.check for f in found] == ["paid-out"]
    found = check_chain_head(pubs[:2], 1, vd)
    assert [(f.check, f.epoch) for f in found] == [("epochs", 3)]


# --------------------------------------------------------------------- vouchers, accounts


def test_payout_voucher(ledger):
    b = ledger.builder
    latest = (b.cumulative[("provider", P1)], 2, 2)
    args = (VAULT, operator_key(ledger), 3)
    assert not check_payout(P1, latest, b.payout_json(P1), *args, b.cumulative[("provider", P1)])
    found = check_payout(P1, latest, None, *args)
    assert [f.check for f in found] == ["payout"]
    found = check_payout(P1, (latest[0] + 1, 2, 2), b.payout_json(P1), *args)
    assert [f.check for f in found] == ["payout-cumulative"]
    found = check_payout(P2, latest, b.payout_json(P1), *args)
    assert {"payout-provider"} <= {f.check for f in found}
    forged = dict(b.payout_json(P1), signature=Ed25519PrivateKey.generate().sign(b"x").hex())
    assert [f.check for f in check_payout(P1, latest, forged, *args)] == ["payout-signature"]
    shown = dict(b.payout_json(P1), cumulative="1")
    assert [f.check for f in check_payout(P1, latest, shown, *args)] == ["payout-cumulative"]
    found = check_payout(P1, latest, b.payout_json(P1), VAULT, operator_key(ledger), 1)
    assert [f.check for f in found] == ["payout-epoch"]


def test_claims_and_charges_stay_within_the_commits(ledger):
    stub = stub_chain(ledger.builder, REGISTRY)
    latest = (100, 2, 3)
    assert not check_provider_account(P1, latest, stub.providers[P1], 100, REGISTRY)
    found = check_provider_account(P1, latest, stub.providers[P1], 101, REGISTRY)
    assert [(f.check, f.expected, f.found) for f in found] == [("claimed", "<= 100", "101")]
    assert [f.check for f in check_provider_account(P1, latest, None, 0, REGISTRY)] == [
        "provider-account"
    ]
    assert [f.check for f in check_provider_account(P1, latest, stub.providers[P1], 0, VAULT)] == [
        "provider-registry"
    ]
    escrow = stub.escrows[E1]
    cums = [10, 25, 40]
    for charged, ok in ((0, True), (10, True), (40, True), (30, False), (41, False)):
        data = replace(escrow, charged=charged)
        found = check_escrow_account(E1, (40, 3, 0), cums, None, data, VAULT)
        assert (not found) == ok, (charged, found)
    # auditing from a later epoch: a charge up to the cumulative before the window is fine
    assert not check_escrow_account(E1, (40, 3, 0), [40], 25, replace(escrow, charged=7), VAULT)
    found = check_escrow_account(E1, (40, 3, 0), cums, None, escrow, addr(0x99))
    assert "escrow-vault" in {f.check for f in found}


# --------------------------------------------------------------------- records, receipts


def _records(lg: Ledger, n: int, kind: str, address: str):
    e = lg.builder.epochs[n - 1]
    index = next(i for i, lf in enumerate(e.leaves) if (lf.KIND, lf.address) == (kind, address))
    return e, index, lg.fake.records[(n, kind, address)]


def test_records_prove_up_to_the_committed_root(ledger):
    for kind, address in (("escrow", E1), ("provider", P1), ("provider", P2)):
        e, index, response = _records(ledger, 1, kind, address)
        records, found = check_records(
            kind, address, ledger.pub(1), e.leaves[index], index, response, FEE_BPS
        )
        assert not found and len(records) == len(e.records[(kind, address)])


def test_a_tampered_record_is_named_by_job(ledger):
    e, index, response = _records(ledger, 1, "escrow", E1)
    item = response["records"][1]
    item["record"]["completion_tokens"] += 1
    _, found = check_records("escrow", E1, ledger.pub(1), e.leaves[index], index, response, FEE_BPS)
    job = item["record"]["job_id"]
    first = found[0]
    assert (first.check, first.epoch, first.leaf, first.job) == ("record-proof", 1, index, job)
    assert {"sub-root", "record-amount"} <= {f.check for f in found}


def test_records_must_be_the_whole_sub_tree(ledger):
    e, index, response = _records(ledger, 1, "escrow", E1)
    response["records"] = response["records"][1:]  # one hidden: the rest still prove
    _, found = check_records("escrow", E1, ledger.pub(1), e.leaves[index], index, response, FEE_BPS)
    assert {"records-sum"} <= {f.check for f in found}
    e, index, response = _records(ledger, 1, "provider", P1)
    other_leaf = e.leaves[index - 1]
    _, found = check_records("provider", P1, ledger.pub(1), other_leaf, index, response, FEE_BPS)
    assert "records-leaf" in {f.check for f in found}
    _, found = check_records("escrow", E1, ledger.pub(1), e.leaves[index], index, [], FEE_BPS)
    assert [f.check for f in found] == ["records"]


def _logged(lg: Ledger, kind: str, address: str, tmp_path: Path):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text(lg.builder.receipt_log(kind, address))
    receipts, warnings = load_receipt_log(path)
    assert not warnings
    return receipts


def _all_records(lg: Ledger, kind: str, address: str):
    out = []
    for e in lg.builder.epochs:
        rs = e.records.get((kind, address), [])
        index = next((i for i, lf in enumerate(e.leaves) if lf.address == address), 0)
        out.extend((e.number, index, r) for r in rs)
    return out


def _keys(lg: Ledger):
    return lambda p: {public(lg.nodes[p])} if p in lg.nodes else set()


def test_records_equal_the_receipts_kept(ledger, tmp_path):
    receipts = _logged(ledger, "escrow", E1, tmp_path)
    records = _all_records(ledger, "escrow", E1)
    matched, found, warnings = check_receipts("escrow", E1, records, receipts, _keys(ledger))
    assert matched == len(records) == len(receipts) and not found and not warnings

    receipts = _logged(ledger, "provider", P2, tmp_path)
    records = _all_records(ledger, "provider", P2)
    matched, found, _ = check_receipts("provider", P2, records, receipts, _keys(ledger))
    assert matched == len(records) and not found


def test_a_record_unlike_its_receipt_is_named(ledger, tmp_path):
    receipts = _logged(ledger, "escrow", E1, tmp_path)
    records = _all_records(ledger, "escrow", E1)
    epoch, index, r = records[2]
    records[2] = (epoch, index, replace(r, prompt_tokens=r.prompt_tokens + 1))
    records.append(records[0])  # billed twice
    _, found, _ = check_receipts("escrow", E1, records, receipts, _keys(ledger))
    assert [(f.check, f.epoch, f.job) for f in found] == [
        ("record-prompt_tokens", epoch, r.job_id.hex()),
        ("record-twice", records[0][0], records[0][2].job_id.hex()),
    ]
    # a record for a job of which no receipt was kept; a receipt billed nowhere
    stray = JobRecord(**{**r.__dict__, "job_id": os.urandom(32)})
    _, found, warnings = check_receipts(
        "escrow", E1, [*records[:2], (epoch, index, stray)], receipts, _keys(ledger)
    )
    assert [f.check for f in found] == ["receipt-missing"]
    assert "in no committed record" in warnings[0]


def test_a_receipt_signed_by_another_key_is_named(ledger, tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [json.loads(x) for x in ledger.builder.receipt_log("escrow", E2).splitlines()]
    lines[0]["signature"] = Ed25519PrivateKey.generate().sign(b"x").hex()
    del lines[1]["node"]  # no key named: the provider's node key is used
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn": \n')
    receipts, warnings = load_receipt_log(path)
    assert len(warnings) == 1 and "unreadable" in warnings[0]
    records = _all_records(ledger, "escrow", E2)
    _, found, _ = check_receipts("escrow", E2, records, receipts, _keys(ledger))
    assert [f.check for f in found] == ["receipt-signature"]


async def test_a_party_audit_checks_its_records_and_receipts(ledger, tmp_path):
    receipts = _logged(ledger, "escrow", E1, tmp_path)
    party = Party("escrow", E1, ledger.spend[E1], receipts, "log")
    report = await run_audit(ledger.source(), VAULT, party=party)
    assert report.ok, report.render()
    assert report.party["records"] == report.party["receipts_matched"] == 4
    key = ("escrow", E1)
    ledger.fake.records[(2, *key)]["records"][0]["record"]["amount"] = "1"
    report = await run_audit(ledger.source(), VAULT, party=party)
    first = report.findings[0]
    where = (first.epoch, first.kind, first.address, first.check)
    assert where == (2, "escrow", E1, "record-proof")
    assert first.job == ledger.fake.records[(2, *key)]["records"][0]["record"]["job_id"]


async def test_a_party_without_a_receipt_log_is_warned(ledger):
    party = Party("provider", P1, ledger.nodes[P1], None)
    report = await run_audit(ledger.source(), VAULT, party=party)
    assert report.ok and any("no receipt log" in w for w in report.warnings)


# --------------------------------------------------------------------- keys


def test_the_party_key_is_read_from_each_keystore_format(tmp_path):
    from contracts.chain.wallet import WalletKeys, create_keystore
    from node.keys import load_or_create_keys

    node = load_or_create_keys(tmp_path / "node_keys.json", "pw")
    key = load_party_key(tmp_path / "node_keys.json", "pw")
    assert public(key) == node.ed25519_public

    pem = tmp_path / "spend.key"
    spend = Ed25519PrivateKey.generate()
    pem.write_bytes(
        spend.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem.chmod(0o600)
    assert public(load_party_key(pem, None)) == public(spend)

    role = WalletKeys.generate(mnemonic=False)
    create_keystore(tmp_path / "role.json", role)
    assert public(load_party_key(tmp_path / "role.json", None)) == role.public_key


def test_receipt_log_lines_are_base64_boc_and_hex(ledger):
    line = json.loads(ledger.builder.receipt_log("escrow", E1).splitlines()[0])
    assert base64.b64decode(line["receipt"]) and bytes.fromhex(line["signature"])
    assert raw(E1) == E1


# --------------------------------------------------------------------- end to end, devnet
# A fresh Vault on the session's devnet (the Registry of tests/contracts), two registered
# Providers and two opened Escrows; two epochs settled the way docs/ledger.md says (each
# escrow charged its cumulative, each epoch committed on the Vault), one claim; a fake
# matcher serves the ledger; `imago audit` runs as a real subprocess.

ROOT = Path(__file__).resolve().parents[2]
TON = 1_000_000_000


@dataclass
class Settled:
    vault: str
    url: str
    chain_url: str
    fake: FakeLedgerMatcher
    builder: LedgerBuilder
    escrow: str  # E1's address, with its client state dir
    provider: str  # P1's address, with its node state dir
    client_dir: Path
    node_dir: Path
    home: Path


@pytest.fixture(scope="module")
async def settled(devnet, chain, contracts_set, make_wallet, tmp_path_factory):
    from aiohttp import web

    from contracts.chain import getters, operations
    from contracts.chain.messages.capabilities import Capabilities, ModelPrice
    from node.keys import load_or_create_keys
    from protocol.signed import model_hash
    from tests.client.audit_fakes import MODEL, make_payout, make_spend
    from tests.contracts.conftest import Key

    cs = contracts_set
    base = tmp_path_factory.mktemp("audit")
    operator_key = Key()  # a Vault of its own: its first commit is epoch 1
    vault = await operations.deploy_vault(
        cs.operator, cs.registry, operator_key.int, 5 * TON, client=chain
    )
    vd = await getters.get_vault_data(chain, vault)

    caps = Capabilities("H100", 80, 1, "eu", (ModelPrice(model_hash(MODEL), 100, 200),))
    node_dir, client_dir = base / "node", base / "client"
    node_keys = {}
    owners = {}
    providers = []
    for seq in range(2):
        owner = await make_wallet()
        if seq == 0:  # P1's node key lives in a node keystore, as `imago node` keeps it
            node = load_or_create_keys(node_dir / "node_keys.json").ed25519
        else:
            node = Key().private
        provider, _ = await operations.register_provider(
            owner, chain, cs.registry, public(node), 3 * TON, caps
        )
        providers.append(raw(provider))
        node_keys[raw(provider)] = node
        owners[raw(provider)] = owner
    spend_keys = {}
    escrows = []
    for _ in range(2):
        client = await make_wallet()
        spend = Ed25519PrivateKey.generate()
        escrow, _ = await operations.escrow_open(
            client, vault, public(spend), TON, vd.escrow_close_delay
        )
        escrows.append(raw(escrow))
        spend_keys[raw(escrow)] = spend
    e1, e2 = escrows
    p1, p2 = providers

    b = LedgerBuilder(raw(vault), operator_key.private, vd.protocol_fee_bps, node_keys)
    charged: dict[str, int] = {}
    for jobs in (
        [Job(e1, p1), Job(e1, p1, 2000, 100), Job(e2, p2, 10, 700), Job(e1, p2)],
        [Job(e1, p1, 7, 9), Job(e2, p1)],
    ):
        built = b.add_epoch(jobs)
        for e in escrows:  # each escrow charged what it will have committed
            cumulative = b.cumulative[("escrow", e)]
            if charged.get(e) != cumulative:
                voucher = make_spend(e, raw(vault), cumulative)
                await operations.escrow_charge(
                    cs.operator, Address(e), voucher, spend_keys[e].sign(voucher.hash)
                )
                charged[e] = cumulative
        await operations.vault_commit_epoch(cs.operator, vault, built.commit, built.signature)
    first = next(lf for lf in b.epochs[0].leaves if lf.address == p1 and lf.KIND == "provider")
    voucher = make_payout(raw(vault), p1, 1, first.cumulative)
    await operations.provider_claim(
        owners[p1], Address(p1), voucher, operator_key.private.sign(voucher.hash)
    )
    assert await getters.get_provider_claimed(chain, p1, vault) == first.cumulative

    # what the parties kept: E1's client (gateway spend key, receipts), P1's node
    client_dir.mkdir()
    pem = client_dir / "spend.key"
    pem.write_bytes(
        spend_keys[e1].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem.chmod(0o600)
    (client_dir / "receipts.jsonl").write_text(b.receipt_log("escrow", e1))
    (node_dir / "receipts.jsonl").write_text(b.receipt_log("provider", p1))

    keys = {("escrow", e): public(k) for e, k in spend_keys.items()}
    keys |= {("provider", p): public(k) for p, k in node_keys.items()}
    fake = FakeLedgerMatcher(b, keys)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    home = base / "home"
    home.mkdir()
    yield Settled(
        raw(vault),
        f"http://127.0.0.1:{port}",
        devnet.url,
        fake,
        b,
        e1,
        p1,
        client_dir,
        node_dir,
        home,
    )
    await runner.cleanup()


@pytest.fixture
def ledger_e2e(settled):
    settled.fake.reset()
    yield settled
    settled.fake.reset()


async def imago_audit(s: Settled, *extra: str, json_out: bool = True) -> tuple[int, dict, str]:
    """`python -m imago.cli audit ...` as a subprocess: exit code, JSON (or text), stderr."""
    import asyncio
    import sys

    env = {**os.environ, "IMAGO_HOME": str(s.home), "PYTHONPATH": str(ROOT)}
    env.pop("TONCENTER_API_KEY", None)
    args = ["audit", "--vault", s.vault, "--matcher", s.url, "--chain", s.chain_url, *extra]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imago.cli", *args, *(["--json"] if json_out else []),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    text = out.decode()
    return proc.returncode, json.loads(text) if json_out else {"text": text}, err.decode()


async def test_e2e_a_consistent_ledger_exits_0(ledger_e2e):
    code, report, err = await imago_audit(ledger_e2e)
    assert code == 0, (report, err)
    assert report["ok"] and report["last_epoch"] == 2
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert report["epochs"][0]["anchored"] == "the Vault's commit transaction"
    assert report["epochs"][1]["anchored"] == "the Vault's lastRoot"
    assert report["checked"]["leaves"] == 4 + 3
    assert report["checked"]["provider_claims"] == 2 and report["checked"]["escrow_charges"] == 2
    code, out, _ = await imago_audit(ledger_e2e, json_out=False)
    assert code == 0 and "OK: the published ledger matches the chain" in out["text"]


async def test_e2e_a_client_and_a_provider_check_their_records(ledger_e2e):
    s = ledger_e2e
    code, report, err = await imago_audit(s, "--escrow", s.escrow, "--state-dir", str(s.client_dir))
    assert code == 0, (report, err)
    assert report["party"]["records"] == report["party"]["receipts_matched"] == 4
    code, report, err = await imago_audit(
        s, "--provider", s.provider, "--state-dir", str(s.node_dir)
    )
    assert code == 0, (report, err)
    assert report["party"]["records"] == report["party"]["receipts_matched"] == 4
    assert not s.fake.refused
    # another key than the escrow's spend key is refused before asking the matcher
    other = s.home / "other.key"
    other.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    other.chmod(0o600)
    code, report, _ = await imago_audit(s, "--escrow", s.escrow, "--key-file", str(other))
    assert code == 1 and "spend key" in report["error"]


async def test_e2e_a_tampered_leaf_exits_1_naming_epoch_and_leaf(ledger_e2e):
    s = ledger_e2e
    leaf = s.fake.leaves[1][2]
    leaf["amount"] = str(int(leaf["amount"]) - 1)
    code, report, _ = await imago_audit(s)
    assert code == 1
    first = report["first_mismatch"]
    assert (first["check"], first["epoch"], first["leaf"]) == ("leaf-hash", 1, 2)
    assert first["address"] == leaf["address"]
    code, out, _ = await imago_audit(s, json_out=False)
    assert code == 1 and "MISMATCH: epoch 1, leaf #2" in out["text"]


async def test_e2e_a_tampered_root_exits_1_naming_the_epoch(ledger_e2e):
    s = ledger_e2e
    # the newest epoch: the operator signs another root; the Vault's lastRoot disagrees
    s.fake.epochs[2] = s.builder.resign(s.fake.epochs[2], root=os.urandom(32))
    code, report, _ = await imago_audit(s)
    assert code == 1
    assert report["first_mismatch"]["epoch"] == 2
    assert {"root-onchain", "onchain-root", "root"} <= {
        f["check"] for f in report["findings"] if f["epoch"] == 2
    }
    # an older epoch: only the Vault's transaction history holds its root
    s.fake.reset()
    s.fake.epochs[1] = s.builder.resign(s.fake.epochs[1], root=os.urandom(32))
    code, report, _ = await imago_audit(s)
    assert code == 1
    first = report["first_mismatch"]
    assert (first["check"], first["epoch"]) == ("onchain-root", 1)


async def test_e2e_a_wrong_total_exits_1_naming_the_epoch(ledger_e2e):
    s = ledger_e2e
    data = s.fake.epochs[1]
    s.fake.epochs[1] = s.builder.resign(data, charged=int(data["charged"]) + 1)
    code, report, _ = await imago_audit(s)
    assert code == 1
    first = report["first_mismatch"]
    assert (first["check"], first["epoch"]) == ("onchain-charged", 1)
    assert any(f["check"] == "total-charged" and f["epoch"] == 1 for f in report["findings"])
    # the same with the chain's history left out: the totals do not tie out
    code, report, _ = await imago_audit(s, "--no-history")
    assert code == 1
    checks = [(f["check"], f["epoch"]) for f in report["findings"]]
    assert ("total-charged", 1) in checks and ("total-fees", 1) in checks


async def test_e2e_a_tampered_record_exits_1_naming_epoch_leaf_and_job(ledger_e2e):
    s = ledger_e2e
    response = s.fake.records[(2, "escrow", s.escrow)]
    record = response["records"][0]["record"]
    record["prompt_tokens"] += 1
    code, report, _ = await imago_audit(s, "--escrow", s.escrow, "--state-dir", str(s.client_dir))
    assert code == 1
    first = report["first_mismatch"]
    assert (first["epoch"], first["leaf"], first["job"]) == (2, response["index"], record["job_id"])
    assert first["check"] == "record-proof"
    assert ("record-prompt_tokens", 2) in {(f["check"], f["epoch"]) for f in report["findings"]}


# --------------------------------------------------------------------- whatever is served


def _paths(node, prefix=()):
    """Every (container, key) in a JSON tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        yield node, k, prefix + (k,)
        if isinstance(v, dict | list):
            yield from _paths(v, prefix + (k,))


GARBAGE = st.one_of(
    st.none(),
    st.integers(-(2**130), 2**130),
    st.text(max_size=70),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from(["0:" + "ab" * 32, "00" * 32, "AAAA", "-1", "left", "escrow", "provider"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
async def test_whatever_the_matcher_serves_the_audit_reports_and_never_crashes(data):
    lg = build_ledger([[Job(E1, P1), Job(E1, P2), Job(E2, P1)], [Job(E2, P2, 5, 5)]])
    served = {
        "epochs": lg.fake.epochs,
        "leaves": lg.fake.leaves,
        # the records the party (E1) fetches
        "records": {f"{k}": v for k, v in lg.fake.records.items() if k[1:] == ("escrow", E1)},
        "payouts": lg.fake.payouts,
    }
    spots = [(c, k, p) for c, k, p in _paths(served) if len(p) > 1 and p[-1] != "tx_hash"]
    container, key, path = data.draw(st.sampled_from(spots))
    before = copy.deepcopy(container[key])
    container[key] = data.draw(GARBAGE)
    lg.fake.records |= {eval(k): v for k, v in served["records"].items()}  # noqa: S307
    party = Party("escrow", E1, lg.spend[E1], None)
    report = await run_audit(lg.source(), VAULT, party=party)
    report.render()
    json.dumps(report.to_json())
    if report.ok:  # only a change that means the same thing may pass
        optional = key in ("epoch_charged", "epoch_earned", "epoch_fees") and container[key] is None
        assert optional or _same_meaning(before, container[key]), (path, before, container[key])


def _same_meaning(before, after) -> bool:
    if before == after:
        return True
    if isinstance(before, str) and isinstance(after, int) and not isinstance(after, bool):
        return before == str(after)  # amounts as decimal strings or numbers
    if isinstance(before, str) and isinstance(after, str):
        return before.lower() == after.lower()
    return False


async def test_a_record_whose_counterpart_has_no_leaf_is_named(ledger):
    # a provider's record naming an escrow that has no leaf that epoch: billed nowhere
    key = (3, "provider", P2)
    response = ledger.fake.records[key]
    stray = JobRecord.from_json(response["records"][0]["record"])
    assert stray.escrow == E2
    party = Party("provider", P2, ledger.nodes[P2], None)
    ledger.fake.leaves[3] = [lf for lf in ledger.fake.leaves[3] if lf["kind"] == "provider"]
    report = await run_audit(ledger.source(), VAULT, party=party, history=False)
    assert ("record-counterpart", 3, stray.job_id.hex()) in {
        (f.check, f.epoch, f.job) for f in report.findings
    }
