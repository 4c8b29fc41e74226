"""Sealed jobs through the node against the fixture upstream."""

from __future__ import annotations

import asyncio

from contracts.protocol import envelope
from node.app import STATE
from tests.node.conftest import check_receipt, post_job, seal_job
from tests.node.fixture_upstream import ANSWER, chat_prompt_tokens

PRICES = (20_000_000, 60_000_000)
MODEL = "fixture-model"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT_TOKENS = chat_prompt_tokens(MESSAGES)
ANSWER_TOKENS = len(ANSWER.split())


async def test_chat_non_streaming(node):
    r = await node.job({"model": MODEL, "messages": MESSAGES})
    assert r.status == 200, r.body
    assert r.order == ["DATA", "END"]
    assert r.text == ANSWER
    assert r.data[0]["chunk"]["object"] == "chat.completion"
    assert r.data[0]["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": ANSWER_TOKENS,
    }
    receipt = check_receipt(r, node.keys.ed25519_public, MODEL, PRICES)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (PROMPT_TOKENS, ANSWER_TOKENS)


async def test_chat_streaming_requests_usage_and_counts_running(node, upstream):
    opts, _ = upstream
    r = await node.job({"model": MODEL, "messages": MESSAGES, "stream": True})
    assert r.status == 200, r.body
    sent = opts.requests[-1]
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert r.text == ANSWER
    assert r.order[-1] == "END" and r.order.count("DATA") == ANSWER_TOKENS + 2  # role + usage
    completions = [f["usage"]["completion_tokens"] for f in r.data]
    assert completions == sorted(completions) and completions[-1] == ANSWER_TOKENS
    assert r.data[-1]["chunk"]["choices"] == []
    receipt = check_receipt(r, node.keys.ed25519_public, MODEL, PRICES)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (PROMPT_TOKENS, ANSWER_TOKENS)
    assert not opts.tokenize_calls  # the engine gave usage: no counting needed


async def test_completions_both_modes(node):
    for stream in (False, True):
        r = await node.job(
            {"model": MODEL, "prompt": "The capital of France is", "stream": stream},
            endpoint="completions",
        )
        assert r.status == 200, r.body
        assert r.text == ANSWER
        receipt = check_receipt(r, node.keys.ed25519_public, MODEL, PRICES)
        assert receipt.prompt_tokens == 5 and receipt.completion_tokens == ANSWER_TOKENS


async def test_replayed_job_id_refused(node):
    job_id, key, sealed = seal_job(node.keys.x25519_public, {"model": MODEL, "messages": MESSAGES})
    first = await post_job(node.session, node.url, job_id, key, sealed)
    assert first.status == 200 and first.receipt is not None
    again = await post_job(node.session, node.url, job_id, key, sealed)
    assert again.status == 409
    assert again.body["error"]["code"] == "job_replayed"


async def test_replay_refused_after_restart(make_node, tmp_path):
    state = tmp_path / "persist"
    a = await make_node(state_dir=state)
    job_id, key, sealed = seal_job(a.keys.x25519_public, {"model": MODEL, "messages": MESSAGES})
    assert (await post_job(a.session, a.url, job_id, key, sealed)).status == 200
    await a.server.close()
    b = await make_node(state_dir=state)  # same keystore, same job log
    assert b.keys.node_id == a.keys.node_id
    assert (await post_job(b.session, b.url, job_id, key, sealed)).status == 409


async def test_tampered_ciphertext_refused(node, upstream):
    opts, _ = upstream
    job_id, key, sealed = seal_job(node.keys.x25519_public, {"model": MODEL, "messages": MESSAGES})
    tampered = bytearray(sealed)
    tampered[-5] ^= 0x01
    r = await post_job(node.session, node.url, job_id, key, bytes(tampered))
    assert r.status == 400
    assert r.body["error"]["code"] == "sealed_request_invalid"
    assert not opts.requests  # nothing reached the engine
    # Sealed for another job id: does not open either.
    r = await post_job(node.session, node.url, envelope.new_job_id(), key, sealed)
    assert r.status == 400
    # The genuine request still works: a tampered copy does not burn the job id.
    r = await post_job(node.session, node.url, job_id, key, sealed)
    assert r.status == 200


async def test_price_cap_refused(node, upstream):
    opts, _ = upstream
    r = await node.job({"model": MODEL, "messages": MESSAGES}, caps=(PRICES[0], PRICES[1] - 1))
    assert r.status == 402
    assert r.body["error"]["code"] == "price_cap_too_low"
    r = await node.job({"model": MODEL, "messages": MESSAGES}, caps=(PRICES[0] - 1, PRICES[1]))
    assert r.status == 402
    assert not opts.requests
    r = await node.job({"model": MODEL, "messages": MESSAGES}, caps=PRICES)  # equal is fine
    assert r.status == 200


async def test_model_not_offered_refused(node):
    r = await node.job({"model": "other-model", "messages": MESSAGES})
    assert r.status == 404 and r.body["error"]["code"] == "model_not_found"


async def test_engine_errors_are_sealed_error_frames(make_node):
    # The node offers a model its engine does not serve: the engine's own 404 comes back.
    node = await make_node(model_ids=["fixture-model", "ghost-model"])
    for stream in (False, True):
        r = await node.job({"model": "ghost-model", "messages": MESSAGES, "stream": stream})
        assert r.status == 200
        assert r.order == ["ERROR", "END"]
        assert r.errors[0]["status"] == 404
        assert r.errors[0]["error"]["type"] == "NotFoundError"
        assert r.end["receipt"] is None and r.end["completion_tokens"] == 0
        r = await node.job(
            {"model": MODEL, "messages": MESSAGES, "max_tokens": 5000, "stream": stream}
        )
        assert r.order == ["ERROR", "END"]
        assert r.errors[0]["status"] == 400
        assert "maximum context length" in r.errors[0]["error"]["message"]
        assert r.end["receipt"] is None


async def test_stream_without_usage_counts_through_tokenize(make_node, upstream):
    opts, _ = upstream
    opts.usage_in_streams = False
    node = await make_node()
    r = await node.job({"model": MODEL, "messages": MESSAGES, "stream": True})
    assert r.status == 200
    assert r.text == ANSWER
    receipt = check_receipt(r, node.keys.ed25519_public, MODEL, PRICES)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (PROMPT_TOKENS, ANSWER_TOKENS)
    assert any("messages" in call for call in opts.tokenize_calls)  # chat form for the prompt
    # Running counts never exceed the final ones.
    assert all(f["usage"]["completion_tokens"] <= ANSWER_TOKENS for f in r.data)


async def test_non_streaming_without_usage_counts_through_tokenize(make_node, upstream):
    opts, _ = upstream
    opts.usage_in_responses = False
    node = await make_node()
    r = await node.job({"model": MODEL, "messages": MESSAGES})
    receipt = check_receipt(r, node.keys.ed25519_public, MODEL, PRICES)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (PROMPT_TOKENS, ANSWER_TOKENS)


async def test_no_usage_and_no_tokenize_fails_the_job(make_node, upstream):
    opts, _ = upstream
    opts.usage_in_streams = False
    opts.usage_in_responses = False
    opts.tokenize = False
    node = await make_node()
    r = await node.job({"model": MODEL, "messages": MESSAGES, "stream": True})
    assert r.status == 200
    assert r.order[-2:] == ["ERROR", "END"]
    assert r.errors[-1]["status"] == 502
    assert r.errors[-1]["error"]["code"] == "usage_unavailable"
    assert r.end["receipt"] is None  # never a receipt with 0 tokens
    r = await node.job({"model": MODEL, "messages": MESSAGES})
    assert r.order == ["ERROR", "END"]  # non-streaming: nothing served at all
    assert r.end["receipt"] is None


async def test_busy_node_answers_429(make_node, upstream):
    opts, _ = upstream
    opts.chunk_delay = 0.2
    node = await make_node(max_concurrent=1)
    slow = asyncio.create_task(node.job({"model": MODEL, "messages": MESSAGES, "stream": True}))
    for _ in range(100):
        if node.app[STATE].jobs.active:
            break
        await asyncio.sleep(0.01)
    r = await node.job({"model": MODEL, "messages": MESSAGES})
    assert r.status == 429 and r.body["error"]["code"] == "node_busy"
    assert (await slow).status == 200


async def test_client_disconnect_cancels_upstream(make_node, upstream):
    opts, _ = upstream
    opts.chunk_delay = 0.3
    node = await make_node()
    job_id, key, sealed = seal_job(
        node.keys.x25519_public, {"model": MODEL, "messages": MESSAGES, "stream": True}
    )
    async with node.session.post(
        node.url + "/v1/jobs", data=sealed, headers={"X-Imago-Job": job_id.hex()}
    ) as r:
        await r.content.readany()  # the first frame
        r.close()
    for _ in range(50):
        if opts.cancelled:
            break
        await asyncio.sleep(0.05)
    assert opts.cancelled, "the upstream request was not cancelled"
    for _ in range(50):
        if node.app[STATE].jobs.active == 0:
            break
        await asyncio.sleep(0.05)
    assert node.app[STATE].jobs.active == 0
