"""Matcher overhead alone: a fake node served directly vs. through the matcher.

    python scripts/bench_matcher.py [--requests 2000] [--concurrency 32]

Three processes: the matcher (SQLite, durable metering), the test suite's fake node
(real HPKE and receipts, an instant echo "model") and this client. Prints JSON with
latency percentiles and requests/s at concurrency 1 and N, plus the CPU time the
matcher and the node spent per request (less sensitive to a busy machine than wall
time).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from protocol import envelope  # noqa: E402
from protocol.api import RelayRequest, SealedRequest  # noqa: E402

NODE_SCRIPT = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from tests.marketplace.fakes import FakeNode, MODEL
async def main():
    node = await FakeNode(chunks=1, models={MODEL: (100, 200)}).start()
    print(json.dumps({"url": node.url, "id": node.node_id, "x": node.x_public.hex()}), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(fn, total: int, concurrency: int) -> dict:
    latencies: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with semaphore:
            latencies.append(await fn())

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
        "rps": round(total / elapsed, 1),
    }


async def main(requests: int, concurrency: int) -> dict:
    from tests.marketplace.fakes import ESCROW, MODEL

    state = tempfile.mkdtemp(prefix="imago-bench-matcher-")
    port = free_port()
    matcher = subprocess.Popen(
        [sys.executable, "-m", "marketplace", "serve", "--devnet", "--port", str(port),
         "--state-dir", state, "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    node = subprocess.Popen(
        [sys.executable, "-c", NODE_SCRIPT, str(REPO)], stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        info = json.loads(node.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        x_public = bytes.fromhex(info["x"])
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for _ in range(200):
                try:
                    async with session.get(f"{url}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            registration = {"url": info["url"], "ed25519_public": info["id"]}
            async with session.post(f"{url}/v1/nodes", json=registration) as resp:
                assert resp.status == 200, await resp.text()

            def sealed_for(job_id: bytes) -> bytes:
                plaintext = (
                    SealedRequest(
                        endpoint="chat/completions",
                        body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                        response_key=os.urandom(32).hex(),
                        escrow=ESCROW.to_str(),
                        max_price_prompt=10**6,
                        max_price_completion=10**6,
                    )
                    .model_dump_json()
                    .encode()
                )
                return envelope.seal_request(x_public, job_id, plaintext)

            async def direct() -> float:
                job_id = envelope.new_job_id()
                sealed = sealed_for(job_id)
                started = time.perf_counter()
                async with session.post(
                    f"{info['url']}/v1/jobs", data=sealed, headers={"X-Imago-Job": job_id.hex()}
                ) as resp:
                    await resp.read()
                return time.perf_counter() - started

            async def relay() -> float:
                job_id = envelope.new_job_id()
                body = RelayRequest(
                    job_id=job_id.hex(),
                    model=MODEL,
                    escrow=ESCROW.to_str(),
                    sealed={info["id"]: base64.b64encode(sealed_for(job_id)).decode()},
                ).model_dump_json()
                started = time.perf_counter()
                async with session.post(f"{url}/v1/relay", data=body) as resp:
                    raw = await resp.read()
                if raw[:1] != b"\x01":
                    raise RuntimeError(f"relay failed: {raw[:200]!r}")
                return time.perf_counter() - started

            for fn in (direct, relay):
                await run(fn, 100, 4)  # warm up
            out: dict = {"requests": requests, "concurrency": concurrency}
            out["c1"] = {
                "direct": await run(direct, requests // 4, 1),
                "matcher": await run(relay, requests // 4, 1),
            }
            out["cN"] = {"direct": await run(direct, requests, concurrency)}
            matcher_cpu, node_cpu = cpu_seconds(matcher.pid), cpu_seconds(node.pid)
            out["cN"]["matcher"] = await run(relay, requests, concurrency)
            out["matcher_cpu_ms_per_request"] = round(
                (cpu_seconds(matcher.pid) - matcher_cpu) / requests * 1000, 3
            )
            out["node_cpu_ms_per_request"] = round(
                (cpu_seconds(node.pid) - node_cpu) / requests * 1000, 3
            )
            out["added_p50_ms_c1"] = round(
                out["c1"]["matcher"]["p50_ms"] - out["c1"]["direct"]["p50_ms"], 3
            )
            out["load_average"] = os.getloadavg()[0]
            return out
    finally:
        for proc in (matcher, node):
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.requests, args.concurrency))))
