"""A party's own per-job records (proved up to the committed root), and the receipts it
kept (read from its receipt log) to compare them with."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.audit.common import Kind, Leaf, _b64, _hex32, _raw, _signature
from client.audit.epochs import PublishedEpoch
from client.audit.report import Findings
from protocol.ledger import (
    EscrowLeaf,
    JobRecord,
    LedgerFormatError,
    ProofStep,
    fee_of,
    merkle_root,
    verify_proof,
)
from protocol.signed import Receipt, SignedObjectError, cost_nanoton, signature_valid

# --------------------------------------------------------------------- per-job records


def _proof(data: Any, what: str) -> list[ProofStep]:
    if not isinstance(data, list):
        raise LedgerFormatError(f"{what}: a proof is a list")
    return [ProofStep.from_json(s) for s in data]


def check_records(
    kind: Kind,
    address: str,
    pub: PublishedEpoch,
    public_leaf: Leaf,
    index: int,
    response: Any,
    fee_bps: int,
) -> tuple[list[JobRecord], Findings]:
    """A party's records of one epoch: the leaf served with them is the public one and
    proves up to the committed root; each record proves up to the leaf's sub-root, names
    the party and is priced right; together they are the leaf's whole sub-tree (sorted by
    job id) and sum to its amount (less the protocol fee, for a provider)."""
    address = _raw(address)
    out = Findings(epoch=pub.epoch, leaf=index, kind=kind, address=address)
    if not isinstance(response, dict):
        out.add("records", "the records answer is not a JSON object")
        return [], out
    if str(response.get("epoch")) != str(pub.epoch):
        out.add("records", "records of another epoch", pub.epoch, response.get("epoch"))
    try:
        shown_root = _hex32(response.get("root"), "root")
        leaf_json = response.get("leaf")
        if isinstance(leaf_json, dict) and "kind" not in leaf_json:
            leaf_json = {**leaf_json, "kind": kind}
        leaf_hash = EscrowLeaf.from_json(leaf_json).hash()
        leaf_proof = _proof(response.get("proof"), "proof")
        items = response.get("records")
        if not isinstance(items, list):
            raise LedgerFormatError("no list of records")
    except LedgerFormatError as err:
        out.add("records", f"malformed records answer: {err}")
        return [], out
    if shown_root != pub.root:
        out.add("records-root", "the records name another root", pub.root.hex(), shown_root.hex())
    if leaf_hash != public_leaf.hash():
        out.add(
            "records-leaf",
            "the leaf served with the records is not the public leaf",
            public_leaf.hash().hex(),
            leaf_hash.hex(),
        )
    elif "hash" in leaf_json and str(leaf_json["hash"]).lower() != leaf_hash.hex():
        out.add("records-leaf", "the leaf's hash is not the hash of its fields", leaf_hash.hex(),
                leaf_json["hash"])  # fmt: skip
    if str(response.get("index", index)) != str(index):
        out.add(
            "records-leaf",
            "the leaf served with the records is at another index",
            index,
            response.get("index"),
        )
    if not verify_proof(public_leaf.hash(), leaf_proof, pub.root):
        out.add(
            "leaf-proof",
            "the leaf's proof does not lead to the committed root",
            pub.root.hex(),
            "another root",
        )
    records: list[JobRecord] = []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise LedgerFormatError("a record entry is a JSON object")
            record = JobRecord.from_json(item.get("record"))
            record.payload()  # field widths
            proof = _proof(item.get("proof"), "record proof")
        except LedgerFormatError as err:
            out.add("record-format", f"record {i}: {err}")
            continue
        job = record.job_id.hex()
        party = record.escrow if kind == "escrow" else record.provider
        if _raw(party) != address:
            out.add("record-party", f"a record of another {kind}", address, _raw(party), job=job)
        if not verify_proof(record.hash(), proof, public_leaf.sub_root):
            out.add(
                "record-proof",
                "the record's proof does not lead to its leaf's sub-root",
                public_leaf.sub_root.hex(),
                "another root",
                job=job,
            )
        priced = cost_nanoton(
            record.prompt_tokens,
            record.completion_tokens,
            record.price_prompt,
            record.price_completion,
        )
        if record.amount != priced:
            out.add(
                "record-amount",
                "the amount is not the tokens at the prices",
                priced,
                record.amount,
                job=job,
            )
        records.append(record)
    ids = [r.job_id for r in records]
    if ids != sorted(set(ids)):
        out.add("records-order", "the records are not sorted by job id, once each")
    if len(records) == len(items):
        sub_root = merkle_root([r.hash() for r in sorted(records, key=lambda r: r.job_id)])
        if sub_root != public_leaf.sub_root:
            out.add(
                "sub-root",
                "the records are not the leaf's whole sub-tree (a record is "
                "missing, extra or altered)",
                public_leaf.sub_root.hex(),
                sub_root.hex(),
            )
    if kind == "escrow":
        total = sum(r.amount for r in records)
        what = "the sum of its records' amounts"
    else:
        total = sum(r.amount - fee_of(r.amount, fee_bps) for r in records)
        what = f"the sum of its records' amounts less the {fee_bps} bps fee"
    if total != public_leaf.amount:
        out.add("records-sum", f"the leaf's amount is not {what}", total, public_leaf.amount)
    return records, out


# --------------------------------------------------------------------- receipts


@dataclass(frozen=True)
class LoggedReceipt:
    """One line of a receipt log: a node-signed receipt as its party kept it."""

    line: int
    receipt: Receipt
    cell_hash: bytes  # what the node signed
    signature: bytes
    node_key: bytes | None  # the key the line names, if any

    @property
    def job_id(self) -> bytes:
        return self.receipt.job_id.to_bytes(32, "big")


def load_receipt_log(path: Path) -> tuple[dict[bytes, LoggedReceipt], list[str]]:
    """Read a JSON-lines receipt log, one receipt a line: ``{"receipt": base64 BOC,
    "signature": hex, "job_id": hex, "node": hex (optional), ...}``. Returns the receipts
    by job id, and warnings about lines that cannot be read (a torn last line after a
    crash) or a second, different receipt for one job. Raises OSError."""
    receipts: dict[bytes, LoggedReceipt] = {}
    warnings: list[str] = []
    with Path(path).open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                receipt, cell_hash = Receipt.parse_boc(_b64(line["receipt"], "receipt"))
                signature = _signature(line["signature"], "signature")
                named = line.get("node") or line.get("node_key") or line.get("node_id")
                node_key = _hex32(named, "node") if named else None
                job_id = receipt.job_id.to_bytes(32, "big")
                if line.get("job_id") is not None and _hex32(line["job_id"], "job_id") != job_id:
                    raise LedgerFormatError("job_id is not the receipt's")
            except (ValueError, KeyError, TypeError, LedgerFormatError, SignedObjectError) as e:
                warnings.append(f"{path}:{n}: unreadable receipt ({e})")
                continue
            seen = receipts.get(job_id)
            if seen is not None and seen.cell_hash != cell_hash:
                warnings.append(
                    f"{path}:{n}: a second, different receipt for job {job_id.hex()} (line "
                    f"{seen.line}): if one node key signed both, that is slashable"
                )
                continue
            receipts.setdefault(job_id, LoggedReceipt(n, receipt, cell_hash, signature, node_key))
    return receipts, warnings


def check_receipts(
    kind: Kind,
    address: str,
    records: list[tuple[int, int, JobRecord]],
    receipts: dict[bytes, LoggedReceipt],
    node_keys: Callable[[str], set[bytes]],
) -> tuple[int, Findings, list[str]]:
    """Each record (``(epoch, leaf index, record)``) is billed once and equals the receipt
    the party kept for its job: same escrow, model, tokens, prices and amount, and its
    receipt hash is that receipt's, whose signature is by the node key the log names (or
    else by one of ``node_keys(provider)``: the provider's node keys).

    Returns the number of records matched, the findings, and warnings: receipts of the
    party in no committed record (jobs not settled yet, or never billed / paid), a
    receipt signed by a key that is not the record's provider's."""
    address = _raw(address)
    out = Findings(kind=kind, address=address)
    warnings: list[str] = []
    matched = 0
    billed: dict[bytes, int] = {}
    for epoch, index, r in records:
        at = {"epoch": epoch, "leaf": index, "job": r.job_id.hex()}
        if r.job_id in billed:
            out.add("record-twice", f"the job was already billed in epoch {billed[r.job_id]}", **at)
            continue
        billed[r.job_id] = epoch
        lr = receipts.get(r.job_id)
        if lr is None:
            out.add(
                "receipt-missing", "no receipt kept for a billed job", "a receipt", "none", **at
            )
            continue
        rc = lr.receipt
        provider_keys = node_keys(_raw(r.provider))
        keys = {lr.node_key} if lr.node_key else provider_keys
        if not any(signature_valid(lr.signature, lr.cell_hash, k) for k in keys):
            out.add(
                "receipt-signature",
                f"the receipt (line {lr.line}) is not signed by the "
                "node key it names, or the provider's",
                **at,
            )
        elif lr.node_key and provider_keys and lr.node_key not in provider_keys:
            warnings.append(
                f"job {r.job_id.hex()}: the receipt's node key {lr.node_key.hex()[:16]}… is "
                "neither the current nor the previous node key of the record's provider"
            )
        for name, from_receipt, from_record in (
            ("escrow", _raw(rc.escrow), _raw(r.escrow)),
            ("model", rc.model.to_bytes(32, "big").hex(), r.model.hex()),
            ("prompt_tokens", rc.prompt_tokens, r.prompt_tokens),
            ("completion_tokens", rc.completion_tokens, r.completion_tokens),
            ("price_prompt", rc.price_prompt, r.price_prompt),
            ("price_completion", rc.price_completion, r.price_completion),
            ("amount", rc.amount, r.amount),
            ("receipt_hash", lr.cell_hash.hex(), r.receipt_hash.hex()),
        ):
            if from_receipt != from_record:
                out.add(
                    f"record-{name}",
                    f"{name} is not the receipt's (line {lr.line})",
                    from_receipt,
                    from_record,
                    **at,
                )
        matched += 1
    unbilled = [
        lr
        for lr in receipts.values()
        if lr.job_id not in billed and (kind == "provider" or _raw(lr.receipt.escrow) == address)
    ]
    if unbilled:
        sample = ", ".join(lr.job_id.hex()[:16] for lr in unbilled[:5])
        warnings.append(
            f"{len(unbilled)} receipt(s) kept are in no committed record ({sample}"
            f"{', …' if len(unbilled) > 5 else ''}): not settled yet, or never "
            + ("billed" if kind == "escrow" else "paid")
        )
    return matched, out, warnings
