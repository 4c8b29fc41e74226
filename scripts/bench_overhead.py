"""What Imago adds over calling an OpenAI-compatible upstream directly.

In one run it starts the benchmark fixture upstream (scripts/bench_upstream.py, which
answers instantly, so only our overhead is measured), and the full Imago path in front
of it as real processes: gateway → matcher → node → upstream, with HPKE seal and open,
receipt signing and verification, spend vouchers and durable metering. Then it sends
the same requests both ways, alternating batches so that noise hits both alike:

- latency: non-streaming, short prompt, at ``--concurrency`` (default 1);
- time to first token: streaming, at concurrency 1;
- throughput: non-streaming at ``--throughput-concurrency`` (default 32).

Prints one JSON object. Usage: ``python scripts/bench_overhead.py [--requests 400]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-instant"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 16,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        self.procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "IMAGO_HOME": str(self.workdir)},
            )
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as response:
                if response.status == 200 and (
                    not url.endswith("/v1/models") or (await response.json())["data"]
                ):
                    return
        except (aiohttp.ClientError, KeyError, ValueError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


async def one_request(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with session.post(url, json=BODY) as response:
        payload = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {payload[:300]!r}")
    return time.perf_counter() - started


async def first_token(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    body = {**BODY, "stream": True}
    elapsed = None
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        async for line in response.content:
            if elapsed is None and line.startswith(b"data: {") and b'"content"' in line:
                elapsed = time.perf_counter() - started
        if elapsed is None:
            raise RuntimeError(f"{url}: no content chunk in the stream")
    return elapsed


async def run_batch(session, url: str, requests: int, concurrency: int, op) -> dict:
    latencies: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            latencies.append(await op(session, url))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "seconds": time.perf_counter() - started}


def summarize(batches: list[dict]) -> dict:
    latencies = sorted(x for b in batches for x in b["latencies"])
    seconds = sum(b["seconds"] for b in batches)
    return {
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3),
        "rps": round(len(latencies) / seconds, 1),
    }


async def compare(session, direct: str, imago: str, requests: int, concurrency: int, op):
    """Alternate direct and Imago batches; return both summaries."""
    rounds = 4
    per_batch = max(concurrency, requests // rounds)
    for url in (direct, imago):  # warm connections and caches
        await run_batch(session, url, concurrency * 2, concurrency, op)
    results: dict[str, list[dict]] = {"direct": [], "imago": []}
    for _ in range(rounds):
        results["direct"].append(await run_batch(session, direct, per_batch, concurrency, op))
        results["imago"].append(await run_batch(session, imago, per_batch, concurrency, op))
    return summarize(results["direct"]), summarize(results["imago"])


async def main(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="imago-bench-"))
    ports = {name: free_port() for name in ("upstream", "matcher", "node", "gateway")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    procs = Processes(workdir)
    cli = ["-m", "client.cli"]
    try:
        procs.start("upstream", ["scripts/bench_upstream.py", "--port", str(ports["upstream"])])
        procs.start("matcher", [*cli, "matcher", "serve", "--devnet",
                                "--port", str(ports["matcher"]),
                                "--state-dir", str(workdir / "matcher")])  # fmt: skip
        procs.start("node", [*cli, "node", "serve", "--devnet", "--attestation", "dev",
                             "--port", str(ports["node"]), "--upstream", url["upstream"],
                             "--matcher", url["matcher"], "--public-url", url["node"],
                             "--max-concurrent", "256",
                             "--state-dir", str(workdir / "node")])  # fmt: skip
        procs.start("gateway", [*cli, "client", "serve", "--devnet",
                                "--port", str(ports["gateway"]), "--matcher", url["matcher"],
                                "--state-dir", str(workdir / "client")])  # fmt: skip
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, f"{url['upstream']}/health")
            await wait_ready(session, f"{url['matcher']}/v1/models")
            await wait_ready(session, f"{url['gateway']}/v1/models")
            direct_url = f"{url['upstream']}/v1/chat/completions"
            imago_url = f"{url['gateway']}/v1/chat/completions"
            direct, imago = await compare(
                session, direct_url, imago_url, args.requests, args.concurrency, one_request
            )
            ttft_direct, ttft_imago = await compare(
                session, direct_url, imago_url, args.requests // 2, 1, first_token
            )
            tp_direct, tp_imago = await compare(
                session, direct_url, imago_url, args.throughput_requests,
                args.throughput_concurrency, one_request,
            )  # fmt: skip
    finally:
        procs.stop()
    return {
        "concurrency": args.concurrency,
        "requests": args.requests,
        "direct": direct,
        "imago": imago,
        "added_p50_ms": round(imago["p50_ms"] - direct["p50_ms"], 3),
        "added_p99_ms": round(imago["p99_ms"] - direct["p99_ms"], 3),
        "ttft_added_p50_ms": round(ttft_imago["p50_ms"] - ttft_direct["p50_ms"], 3),
        "ttft": {"direct": ttft_direct, "imago": ttft_imago},
        "throughput": {
            "concurrency": args.throughput_concurrency,
            "requests": args.throughput_requests,
            "direct": tp_direct,
            "imago": tp_imago,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--throughput-requests", type=int, default=2000)
    parser.add_argument("--throughput-concurrency", type=int, default=32)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
