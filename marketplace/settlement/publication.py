"""The public ledger API (``docs/ledger.md``): committed epochs, their aggregate leaves
and proofs, payout vouchers, and each party's own per-job records to that party only.

Only committed epochs are served, so a payout voucher never leaves before its epoch's
root is on the Vault (invariant 6). Nothing public names a job, a token count or a time
finer than the epoch. Reads run on their own connection off the event loop; the ledger's
writer never waits for them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from pytoniq_core import Address
from sqlalchemy import Connection, Engine, select

from marketplace.db import (
    EpochRecord,
    JobRecord,
    LeafRecord,
    NodeRecord,
    PayoutRecord,
    SpendVoucherRecord,
    read_connection,
)
from marketplace.settlement.epochs import job_record
from protocol.errors import ApiError
from protocol.ledger import (
    RECORDS_AUTH_WINDOW_S,
    EscrowLeaf,
    ProviderLeaf,
    merkle_proof,
    records_auth_message,
)
from protocol.signed import signature_valid

__all__ = ["READ_ENGINE", "add_routes"]

EPOCHS = EpochRecord.__table__
LEAVES = LeafRecord.__table__
PAYOUTS = PayoutRecord.__table__
JOBS = JobRecord.__table__
NODES = NodeRecord.__table__
VOUCHERS = SpendVoucherRecord.__table__
MAX_PAGE = 1000
READ_ENGINE = web.AppKey("read_engine", Engine)  # set by the app's database lifetime


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/ledger/epochs", list_epochs)
    app.router.add_get("/v1/ledger/epochs/{epoch}", get_epoch)
    app.router.add_get("/v1/ledger/epochs/{epoch}/leaves", get_leaves)
    app.router.add_get("/v1/ledger/epochs/{epoch}/proof", get_proof)
    app.router.add_get("/v1/ledger/epochs/{epoch}/records", get_records)
    app.router.add_get("/v1/ledger/payouts/{provider}", get_payout)


async def _read(request: web.Request, fn: Callable[[Connection], Any]) -> Any:
    engine = request.app[READ_ENGINE]

    def run() -> Any:
        with read_connection(engine) as conn:
            return fn(conn)

    return await asyncio.to_thread(run)


def _int_arg(request: web.Request, name: str, default: int, low: int = 0, high: int | None = None):
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer", param=name) from None
    if value < low or (high is not None and value > high):
        raise ApiError(400, f"{name} must be in {low}..{high if high is not None else ''}",
                       param=name)  # fmt: skip
    return value


def _epoch_arg(request: web.Request) -> int:
    try:
        return int(request.match_info["epoch"])
    except ValueError:
        raise ApiError(400, "the epoch must be an integer", param="epoch") from None


def _address_arg(text: str | None, name: str = "address") -> str:
    if not text:
        raise ApiError(400, f"give {name}", param=name)
    try:
        return Address(text).to_str(is_user_friendly=False)
    except Exception:  # noqa: BLE001 - pytoniq raises bare errors
        raise ApiError(400, f"{name} is not a TON address", param=name) from None


def _kind_arg(request: web.Request) -> str:
    kind = request.query.get("kind")
    if kind not in ("escrow", "provider"):
        raise ApiError(400, "kind must be escrow or provider", param="kind")
    return kind


def _epoch_json(row) -> dict:
    return {
        "epoch": row.epoch,
        "vault": row.vault,
        "root": row.root,
        "charged": str(row.charged),
        "paid": str(row.paid),
        "fees": str(row.fees),
        "leaves": row.leaves,
        "epoch_charged": str(row.epoch_charged),
        "epoch_earned": str(row.epoch_earned),
        "epoch_fees": str(int(row.epoch_charged) - int(row.epoch_earned)),
        "state": row.state,
        "tx_hash": row.tx_hash,
        "commit": {"boc": row.commit_boc, "signature": row.commit_signature},
    }


def _leaf(row) -> EscrowLeaf | ProviderLeaf:
    cls = EscrowLeaf if row.kind == "escrow" else ProviderLeaf
    return cls(row.address, row.epoch, int(row.amount), int(row.cumulative),
               bytes.fromhex(row.sub_root))  # fmt: skip


def _leaf_json(row) -> dict:
    return {"index": row.idx, **_leaf(row).to_json()}


def _committed(conn: Connection, epoch: int):
    row = conn.execute(
        select(EPOCHS).where(EPOCHS.c.epoch == epoch, EPOCHS.c.state == "committed")
    ).first()
    if row is None:
        raise ApiError(404, f"epoch {epoch} is not committed", code="epoch_not_found")
    return row


def _all_leaves(conn: Connection, epoch: int) -> list:
    return conn.execute(select(LEAVES).where(LEAVES.c.epoch == epoch).order_by(LEAVES.c.idx)).all()


async def list_epochs(request: web.Request) -> web.Response:
    start = _int_arg(request, "from", 1)
    limit = _int_arg(request, "limit", 100, 1, MAX_PAGE)
    rows = await _read(
        request,
        lambda c: c.execute(
            select(EPOCHS)
            .where(EPOCHS.c.state == "committed", EPOCHS.c.epoch >= start)
            .order_by(EPOCHS.c.epoch)
            .limit(limit + 1)
        ).all(),
    )
    more = len(rows) > limit
    return web.json_response(
        {
            "epochs": [_epoch_json(r) for r in rows[:limit]],
            "next_from": rows[limit].epoch if more else None,
        }
    )


async def get_epoch(request: web.Request) -> web.Response:
    epoch = _epoch_arg(request)
    row = await _read(request, lambda c: _committed(c, epoch))
    return web.json_response(_epoch_json(row))


async def get_leaves(request: web.Request) -> web.Response:
    epoch = _epoch_arg(request)
    offset = _int_arg(request, "offset", 0)
    limit = _int_arg(request, "limit", MAX_PAGE, 1, MAX_PAGE)

    def read(conn: Connection):
        head = _committed(conn, epoch)
        rows = conn.execute(
            select(LEAVES)
            .where(LEAVES.c.epoch == epoch, LEAVES.c.idx >= offset)
            .order_by(LEAVES.c.idx)
            .limit(limit)
        ).all()
        return head, rows

    head, rows = await _read(request, read)
    following = offset + len(rows)
    return web.json_response(
        {
            "epoch": epoch,
            "root": head.root,
            "total": head.leaves,
            "leaves": [_leaf_json(r) for r in rows],
            "next_offset": following if following < head.leaves else None,
        }
    )


def _proof_of(conn: Connection, epoch: int, kind: str, address: str):
    head = _committed(conn, epoch)
    rows = _all_leaves(conn, epoch)
    index = next((r.idx for r in rows if r.kind == kind and r.address == address), None)
    if index is None:
        raise ApiError(404, f"epoch {epoch} has no {kind} leaf for {address}",
                       code="leaf_not_found")  # fmt: skip
    hashes = [_leaf(r).hash() for r in rows]
    return head, rows[index], [s.to_json() for s in merkle_proof(hashes, index)]


async def get_proof(request: web.Request) -> web.Response:
    epoch = _epoch_arg(request)
    kind = _kind_arg(request)
    address = _address_arg(request.query.get("address"))
    head, leaf, proof = await _read(request, lambda c: _proof_of(c, epoch, kind, address))
    return web.json_response(
        {"epoch": epoch, "root": head.root, "index": leaf.idx, "leaf": _leaf_json(leaf),
         "proof": proof}
    )  # fmt: skip


async def get_payout(request: web.Request) -> web.Response:
    provider = _address_arg(request.match_info["provider"], "provider")
    row = await _read(
        request,
        lambda c: c.execute(
            select(PAYOUTS, EPOCHS.c.vault)
            .join(EPOCHS, EPOCHS.c.epoch == PAYOUTS.c.epoch)
            .where(PAYOUTS.c.provider == provider, EPOCHS.c.state == "committed")
            .order_by(PAYOUTS.c.epoch.desc())
            .limit(1)
        ).first(),
    )
    if row is None:
        raise ApiError(404, f"no committed payout for {provider}", code="payout_not_found")
    return web.json_response(
        {
            "provider": provider,
            "vault": row.vault,
            "epoch": row.epoch,
            "cumulative": str(row.cumulative),
            "voucher": row.voucher_boc,
            "signature": row.signature,
        }
    )


# --- a party's own records ----------------------------------------------------------------


def _party_keys(conn: Connection, kind: str, address: str) -> set[str]:
    """The keys that may read ``address``'s records: an escrow's spend key, the node
    keys of a provider's nodes."""
    if kind == "escrow":
        rows = conn.execute(select(VOUCHERS.c.spend_public).where(VOUCHERS.c.escrow == address))
    else:
        rows = conn.execute(select(NODES.c.node_id).where(NODES.c.provider == address))
    return {r[0].lower() for r in rows}


def _check_party(request: web.Request, kind: str, address: str, epoch: int, keys: set[str]):
    denied = ApiError(403, "these records are only for their own party",
                      type="permission_error", code="records_forbidden")  # fmt: skip
    try:
        key = request.headers["Imago-Party-Key"].lower()
        when = int(request.headers["Imago-Party-Time"])
        signature = bytes.fromhex(request.headers["Imago-Party-Signature"])
        public = bytes.fromhex(key)
    except (KeyError, ValueError):
        raise denied from None
    if abs(time.time() - when) > RECORDS_AUTH_WINDOW_S or key not in keys:
        raise denied
    if not signature_valid(signature, records_auth_message(kind, address, epoch, when), public):
        raise denied


def _records_of(conn: Connection, epoch: int, kind: str, address: str) -> dict:
    head, leaf, proof = _proof_of(conn, epoch, kind, address)
    mine = JOBS.c.escrow == address if kind == "escrow" else JOBS.c.provider == address
    jobs = conn.execute(
        select(JOBS).where(JOBS.c.epoch == epoch, JOBS.c.salt.is_not(None), mine)
    ).all()
    records = sorted(
        (job_record(j, j.provider, bytes.fromhex(j.salt)) for j in jobs),
        key=lambda r: r.job_id,
    )
    hashes = [r.hash() for r in records]
    return {
        "epoch": epoch,
        "root": head.root,
        "index": leaf.idx,
        "leaf": _leaf_json(leaf),
        "proof": proof,
        "records": [
            {"record": r.to_json(), "proof": [s.to_json() for s in merkle_proof(hashes, i)]}
            for i, r in enumerate(records)
        ],
    }


async def get_records(request: web.Request) -> web.Response:
    epoch = _epoch_arg(request)
    kind = _kind_arg(request)
    address = _address_arg(request.query.get("address"))
    keys = await _read(request, lambda c: _party_keys(c, kind, address))
    _check_party(request, kind, address, epoch, keys)
    return web.json_response(await _read(request, lambda c: _records_of(c, epoch, kind, address)))
