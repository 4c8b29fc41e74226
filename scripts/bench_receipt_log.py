#!/usr/bin/env python3
"""What the receipt log adds to a job's hot path (node/receipt_log.py).

Times, per receipt, on the event loop the way the node runs it:

* ``sign_us``: what the node already does at the end of each job without the log:
  build the Receipt, encode it, sign it, base64 it, JSON the END frame;
* ``append_us``: ``ReceiptLog.append`` (the JSON line and one ``write(2)``, plus
  scheduling the background ``fdatasync`` when none is in flight), interleaved with
  the loop's other work as jobs are (``await asyncio.sleep(0)`` between receipts);
* ``fdatasync_us``: one ``fdatasync`` of the log on this disk, for scale (it runs on a
  thread, never awaited by a job);
* ``syncs``: how many background syncs ran for ``n`` appends (they coalesce).

    python scripts/bench_receipt_log.py [--n 20000] [--dir PATH] [--uvloop]

``--dir`` should be on the disk the node's state directory lives on (default: a
temporary directory). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from pytoniq_core import Address  # noqa: E402

from node.receipt_log import ReceiptLog, read_receipt_log  # noqa: E402
from protocol.signed import DEVNET_GLOBAL_ID, Receipt, cost_nanoton  # noqa: E402

ESCROW = Address("0:" + "ab" * 32)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def end_frame(key: Ed25519PrivateKey, i: int) -> tuple[bytes, int, dict]:
    """What jobs.py's _end does for one receipt (minus the frame encoding)."""
    receipt = Receipt(
        global_id=DEVNET_GLOBAL_ID,
        escrow=ESCROW,
        job_id=(int(time.time()) << 224) | i,
        time=int(time.time()),
        model=12345,
        prompt_tokens=57,
        completion_tokens=180 + i % 50,
        price_prompt=20_000_000,
        price_completion=60_000_000,
        amount=cost_nanoton(57, 180 + i % 50, 20_000_000, 60_000_000),
        request_hash=os.urandom(32),
        response_hash=os.urandom(32),
    )
    boc, receipt_hash = receipt.encode()
    signature = key.sign(receipt_hash)
    end = {
        "receipt": base64.b64encode(boc).decode(),
        "signature": signature.hex(),
        "prompt_tokens": receipt.prompt_tokens,
        "completion_tokens": receipt.completion_tokens,
    }
    _dumps(end)
    return receipt.job_id.to_bytes(32, "big"), receipt.time, end


async def bench(n: int, directory: Path) -> dict:
    key = Ed25519PrivateKey.generate()
    ends = []
    t0 = time.perf_counter()
    for i in range(n):
        ends.append(end_frame(key, i))
    sign_s = time.perf_counter() - t0

    path = directory / "receipts.jsonl"
    path.unlink(missing_ok=True)
    log = ReceiptLog(path)
    syncs = 0
    original = log._start_sync

    def counting() -> None:
        nonlocal syncs
        syncs += 1
        original()

    log._start_sync = counting  # type: ignore[method-assign]
    # the loop's own cost of `await asyncio.sleep(0)`, to subtract
    t0 = time.perf_counter()
    for _ in range(n):
        await asyncio.sleep(0)
    idle_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for job_id, t, end in ends:
        log.append(job_id, t, end["receipt"], end["signature"])
        await asyncio.sleep(0)
    append_s = time.perf_counter() - t0 - idle_s
    while log._syncing:
        await asyncio.sleep(0.001)
    log.close()
    size = path.stat().st_size
    assert sum(1 for _ in read_receipt_log(path)) == n

    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        samples = []
        for _ in range(20):
            os.write(fd, b"\n")
            t0 = time.perf_counter()
            os.fdatasync(fd)
            samples.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    samples.sort()
    return {
        "n": n,
        "sign_us": round(sign_s / n * 1e6, 2),
        "append_us": round(append_s / n * 1e6, 2),
        "append_vs_sign": round(append_s / sign_s, 3),
        "fdatasync_us": round(samples[len(samples) // 2] * 1e6, 1),
        "syncs": syncs,
        "bytes_per_receipt": round(size / n, 1),
        "dir": str(directory),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--uvloop", action="store_true", help="the loop `imago node serve` runs")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(bench(args.n, args.dir))
    else:
        with tempfile.TemporaryDirectory() as d:
            result = asyncio.run(bench(args.n, Path(d)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
