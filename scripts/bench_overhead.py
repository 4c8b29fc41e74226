"""What Imago adds over calling an OpenAI-compatible upstream directly.

In one run it starts the fixture upstream of the node's tests (tests/node/fixture_upstream.py,
which answers instantly, so only our overhead is measured), and the full Imago path in front
of it as real processes: matcher → node → upstream, plus the client gateway. Every
Imago request pays HPKE seal and open, receipt signing and verification, spend
vouchers and durable metering. Three ways of calling, alternating batches so that
noise hits all alike:

- ``direct``: the upstream itself, over HTTP from this process;
- ``imago``: the client SDK in this process (as an application embeds it) → matcher
  → node → upstream;
- ``imago_gateway``: HTTP to the local OpenAI-compatible gateway, which runs the SDK.

Measured: latency (non-streaming, short prompt, at ``--concurrency``, default 1); time
to first token (streaming, concurrency 1); throughput (non-streaming at
``--throughput-concurrency``, default 32). This process runs on uvloop, as the
services do. Prints one JSON object.

Usage: ``python scripts/bench_overhead.py [--requests 400]``
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
import uvloop
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pytoniq_core import Address

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from client.sdk.client import ImagoClient  # noqa: E402
from client.sdk.receipts import PriceCaps  # noqa: E402
from protocol.attestation import AttestationPolicy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fixture-model"  # what tests/node/fixture_upstream.py serves
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


async def run_batch(op, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            latencies.append(await op())

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


async def compare(ops: dict, requests: int, concurrency: int) -> dict[str, dict]:
    """Alternate batches of each way of calling; return a summary per way."""
    rounds = 4
    per_batch = max(concurrency, requests // rounds)
    for op in ops.values():  # warm connections and caches
        await run_batch(op, concurrency * 2, concurrency)
    results: dict[str, list[dict]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            results[name].append(await run_batch(op, per_batch, concurrency))
    return {name: summarize(batches) for name, batches in results.items()}


def sdk_client(matcher_url: str, workdir: Path) -> ImagoClient:
    """The client SDK in this process, as an application embeds it (devnet mode)."""
    spend_key = Ed25519PrivateKey.generate()
    return ImagoClient(
        matcher_url=matcher_url,
        escrow=Address("0:" + "11" * 32),
        vault=Address("0:" + "22" * 32),
        spend_key=spend_key,
        policy=AttestationPolicy(allow_dev=True),
        caps=PriceCaps(prompt=10**12, completion=10**12),
        state_path=workdir / "sdk-spend.json",
        devnet=True,
    )


async def sdk_request(client: ImagoClient) -> float:
    started = time.perf_counter()
    await client.complete("chat/completions", BODY)
    return time.perf_counter() - started


async def sdk_first_token(client: ImagoClient) -> float:
    started = time.perf_counter()
    stream = client.stream("chat/completions", {**BODY, "stream": True})
    elapsed = None
    async for chunk in stream:
        if elapsed is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            elapsed = time.perf_counter() - started
    if elapsed is None:
        raise RuntimeError("sdk: no content chunk in the stream")
    return elapsed


async def start_imago(
    procs: Processes, upstream_url: str, **extra_node_args: str
) -> dict[str, str]:
    """Start a matcher, a node attached to ``upstream_url`` and the gateway (devnet mode,
    dev attestation, state under the processes' workdir); return their URLs once the
    gateway routes to the node."""
    ports = {name: free_port() for name in ("matcher", "node", "gateway")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    state = procs.workdir
    node_flags = [arg for k, v in extra_node_args.items() for arg in (f"--{k}", v)]
    cli = ["-m", "imago.cli"]
    procs.start("matcher", [*cli, "matcher", "serve", "--devnet",
                            "--port", str(ports["matcher"]),
                            "--state-dir", str(state / "matcher")])  # fmt: skip
    procs.start("node", [*cli, "node", "serve", "--devnet", "--attestation", "dev",
                         "--port", str(ports["node"]), "--upstream", upstream_url,
                         "--matcher", url["matcher"], "--public-url", url["node"],
                         "--state-dir", str(state / "node"), *node_flags])  # fmt: skip
    procs.start("gateway", [*cli, "gateway", "--devnet",
                            "--port", str(ports["gateway"]), "--matcher", url["matcher"],
                            "--state-dir", str(state / "client")])  # fmt: skip
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, f"{url['matcher']}/v1/models")
        await wait_ready(session, f"{url['gateway']}/v1/models")
    return url


async def main(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="imago-bench-"))
    upstream = f"http://127.0.0.1:{free_port()}"
    procs = Processes(workdir)
    try:
        procs.start("upstream", ["-m", "tests.node.fixture_upstream", upstream.rsplit(":", 1)[1]])
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, f"{upstream}/health")
            url = await start_imago(procs, upstream, **{"max-concurrent": "256"})
            direct_url = f"{upstream}/v1/chat/completions"
            gateway_url = f"{url['gateway']}/v1/chat/completions"
            async with sdk_client(url["matcher"], workdir) as sdk:
                latency = await compare(
                    {
                        "direct": lambda: one_request(session, direct_url),
                        "imago": lambda: sdk_request(sdk),
                        "imago_gateway": lambda: one_request(session, gateway_url),
                    },
                    args.requests,
                    args.concurrency,
                )
                ttft = await compare(
                    {
                        "direct": lambda: first_token(session, direct_url),
                        "imago": lambda: sdk_first_token(sdk),
                        "imago_gateway": lambda: first_token(session, gateway_url),
                    },
                    args.requests // 2,
                    1,
                )
                throughput = await compare(
                    {
                        "direct": lambda: one_request(session, direct_url),
                        "imago": lambda: sdk_request(sdk),
                        "imago_gateway": lambda: one_request(session, gateway_url),
                    },
                    args.throughput_requests,
                    args.throughput_concurrency,
                )
    finally:
        procs.stop()
    direct, imago, gateway = latency["direct"], latency["imago"], latency["imago_gateway"]
    return {
        "concurrency": args.concurrency,
        "requests": args.requests,
        "direct": direct,
        "imago": imago,
        "added_p50_ms": round(imago["p50_ms"] - direct["p50_ms"], 3),
        "added_p99_ms": round(imago["p99_ms"] - direct["p99_ms"], 3),
        "ttft_added_p50_ms": round(ttft["imago"]["p50_ms"] - ttft["direct"]["p50_ms"], 3),
        "imago_gateway": gateway,
        "gateway_added_p50_ms": round(gateway["p50_ms"] - direct["p50_ms"], 3),
        "gateway_ttft_added_p50_ms": round(
            ttft["imago_gateway"]["p50_ms"] - ttft["direct"]["p50_ms"], 3
        ),
        "ttft": ttft,
        "throughput": {
            "concurrency": args.throughput_concurrency,
            "requests": args.throughput_requests,
            **throughput,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--throughput-requests", type=int, default=2000)
    parser.add_argument("--throughput-concurrency", type=int, default=32)
    uvloop.install()
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
