"""Sealed jobs through the node against the fixture upstream."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.app import STATE
from node.keys import NodeKeys
from node.seen import SeenJobs
from node.usage import Tally
from protocol import envelope
from protocol.envelope import FRAMES_CONTENT_TYPE
from protocol.tickets import TICKET_HEADER
from tests.node.conftest import (
    check_receipt,
    post_job,
    read_job,
    running_counts,
    seal_job,
    sign_ticket,
)
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


# What vLLM 0.32 streamed for a chat with n=2, max_tokens=5 and continuous usage stats
# (each chunk: its choice index and usage), as it came from the real engine.
VLLM_CHAT_N2 = [
    (0, 34, 0), (1, 34, 0), (0, 34, 1), (0, 34, 2), (1, 34, 1), (0, 34, 3), (1, 34, 2),
    (0, 34, 4), (1, 34, 3), (0, 34, 5), (1, 34, 4), (1, 34, 5), (None, 34, 10),
]  # fmt: skip
# And for completions of two prompts (5 and 3 tokens), max_tokens=4, n=1.
VLLM_COMPLETIONS_2_PROMPTS = [
    (0, 5, 1), (0, 5, 2), (1, 3, 1), (1, 3, 2), (0, 5, 3), (0, 5, 4), (1, 3, 3), (1, 3, 4),
    (None, 8, 8),
]  # fmt: skip


@pytest.mark.parametrize(
    ("chunks", "n", "expected"),
    [
        (VLLM_CHAT_N2, 2, [(34, c) for c in (0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10)]),
        (
            VLLM_COMPLETIONS_2_PROMPTS,
            1,
            [(5, 1), (5, 2), (8, 3), (8, 4), (8, 5), (8, 6), (8, 7), (8, 8), (8, 8)],
        ),
    ],
)
def test_tally_of_vllm_usage_per_choice(chunks, n, expected):
    tally = Tally()
    counts = []
    for index, prompt, completion in chunks:
        choices = [] if index is None else [{"index": index, "text": "x"}]
        tally.add_engine_usage({"choices": choices}, (prompt, completion), n)
        counts.append((tally.prompt, tally.completion))
    assert counts == expected


@pytest.mark.parametrize(
    ("endpoint", "body", "prompt_tokens", "completion_tokens"),
    [
        ("chat/completions", {"messages": MESSAGES, "n": 2}, PROMPT_TOKENS, 6 + 5),
        ("completions", {"prompt": ["The capital of France is", "One two three"]}, 8, 6 + 5),
        (
            "completions",
            {"prompt": ["The capital of France is", "One two three"], "n": 2},
            8,
            6 + 5 + 4 + 3,
        ),
    ],
    ids=["chat-n2", "completions-2-prompts", "completions-2-prompts-n2"],
)
async def test_streams_of_several_choices_count_up_and_bill_the_engine_totals(
    node, endpoint, body, prompt_tokens, completion_tokens
):
    r = await node.job({"model": MODEL, **body, "stream": True}, endpoint=endpoint)
    assert r.status == 200, r.body
    engine = [f["chunk"]["usage"]["completion_tokens"] for f in r.data]
    assert any(b < a for a, b in zip(engine, engine[1:], strict=False))  # per choice, as vLLM
    counts = running_counts(r)  # the node's count never goes down
    # Each chunk of text is one token here: the running count is exact after each one.
    n, prompts = body.get("n", 1), [5, 3]
    seen: set[int] = set()
    texts = 0
    for frame, (prompt, completion) in zip(r.data[:-1], counts, strict=False):
        for choice in frame["chunk"]["choices"]:
            seen.add(choice["index"])
            texts += bool(choice.get("text") or choice.get("delta", {}).get("content"))
        assert completion == texts
        if endpoint == "completions":
            assert prompt == sum(prompts[p] for p in {i // n for i in seen})
        else:
            assert prompt == prompt_tokens
    assert r.data[-1]["chunk"]["choices"] == []
    assert r.data[-1]["chunk"]["usage"]["completion_tokens"] == completion_tokens
    assert counts[-1] == (prompt_tokens, completion_tokens)
    receipt = check_receipt(r, node.keys.ed25519_public, MODEL, PRICES)
    assert (receipt.prompt_tokens, receipt.completion_tokens) == (prompt_tokens, completion_tokens)


async def test_a_running_count_never_goes_down_even_if_the_engine_totals_do(node, monkeypatch):
    real = Tally.add_engine_usage

    def low_totals(self, chunk, usage, n):  # FAKE: an engine whose totals undercount
        if not chunk.get("choices"):
            usage = (usage[0], usage[1] - 1)
        real(self, chunk, usage, n)

    monkeypatch.setattr(Tally, "add_engine_usage", low_totals)
    r = await node.job({"model": MODEL, "messages": MESSAGES, "stream": True})
    counts = running_counts(r)
    assert counts[-1] == (PROMPT_TOKENS, ANSWER_TOKENS)
    receipt = check_receipt(r, node.keys.ed25519_public, MODEL, PRICES)
    assert receipt.completion_tokens == ANSWER_TOKENS - 1  # the engine's totals are billed


@pytest.mark.parametrize("stream", [False, True])
async def test_headers_leave_when_the_job_is_accepted_before_the_engine_answers(
    make_node, upstream, stream
):
    opts, _ = upstream
    opts.release = asyncio.Event()  # FIXTURE: an engine that works until released
    node = await make_node()
    body = {"model": MODEL, "messages": MESSAGES, "stream": stream}
    job_id, key, sealed = seal_job(node.keys.x25519_public, body)
    headers = {"X-Imago-Job": job_id.hex(), TICKET_HEADER: node.ticket(job_id, sealed)}
    try:
        r = await asyncio.wait_for(
            node.session.post(node.url + "/v1/jobs", data=sealed, headers=headers), 5
        )
    except TimeoutError:
        opts.release.set()
        pytest.fail("no response headers while the engine works on the job")
    async with r:
        assert r.status == 200
        assert r.headers["Content-Type"] == FRAMES_CONTENT_TYPE
        for _ in range(100):  # the engine gets the job, and cannot answer until released
            if opts.requests:
                break
            await asyncio.sleep(0.01)
        assert len(opts.requests) == 1 and not r.content.is_eof()
        opts.release.set()
        result = await read_job(r, job_id, key, sealed)
    assert result.text == ANSWER and result.order[-1] == "END"
    check_receipt(result, node.keys.ed25519_public, MODEL, PRICES)


async def test_replayed_job_id_refused(node):
    job_id, key, sealed = seal_job(node.keys.x25519_public, {"model": MODEL, "messages": MESSAGES})
    first = await node.post(job_id, key, sealed)
    assert first.status == 200 and first.receipt is not None
    again = await node.post(job_id, key, sealed)
    assert again.status == 409
    assert again.body["error"]["code"] == "job_replayed"


async def test_replay_refused_after_restart(make_node, tmp_path):
    state = tmp_path / "persist"
    a = await make_node(state_dir=state)
    job_id, key, sealed = seal_job(a.keys.x25519_public, {"model": MODEL, "messages": MESSAGES})
    assert (await a.post(job_id, key, sealed)).status == 200
    await a.server.close()
    b = await make_node(state_dir=state)  # same keystore, same job log
    assert b.keys.node_id == a.keys.node_id
    assert (await b.post(job_id, key, sealed)).status == 409


async def test_tampered_ciphertext_refused(node, upstream):
    opts, _ = upstream
    job_id, key, sealed = seal_job(node.keys.x25519_public, {"model": MODEL, "messages": MESSAGES})
    tampered = bytearray(sealed)
    tampered[-5] ^= 0x01
    r = await node.post(job_id, key, bytes(tampered))
    assert r.status == 400
    assert r.body["error"]["code"] == "sealed_request_invalid"
    assert not opts.requests  # nothing reached the engine
    # Sealed for another job id: does not open either.
    r = await node.post(envelope.new_job_id(), key, sealed)
    assert r.status == 400
    # The genuine request still works: a tampered copy does not burn the job id.
    r = await node.post(job_id, key, sealed)
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
    headers = {"X-Imago-Job": job_id.hex(), TICKET_HEADER: node.ticket(job_id, sealed)}
    async with node.session.post(node.url + "/v1/jobs", data=sealed, headers=headers) as r:
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


# -- matcher tickets ------------------------------------------------------------------


async def test_a_job_without_a_ticket_is_refused(node, upstream):
    opts, _ = upstream
    job_id, key, sealed = seal_job(node.keys.x25519_public, {"model": MODEL, "messages": MESSAGES})
    r = await post_job(node.session, node.url, job_id, key, sealed, ticket=None)
    assert r.status == 403 and r.body["error"]["code"] == "ticket_missing"
    assert not opts.requests
    assert (await node.post(job_id, key, sealed)).status == 200  # the id was not burned


async def test_a_ticket_binds_the_matcher_key_node_job_and_request(node, upstream):
    opts, _ = upstream
    job_id, key, sealed = seal_job(node.keys.x25519_public, {"model": MODEL, "messages": MESSAGES})
    other_node = NodeKeys.generate().ed25519_public
    other_job, _, other_sealed = seal_job(
        node.keys.x25519_public, {"model": MODEL, "messages": MESSAGES}
    )
    public = node.keys.ed25519_public
    forged = {
        "another key": sign_ticket(public, job_id, sealed, Ed25519PrivateKey.generate()),
        "another node": sign_ticket(other_node, job_id, sealed),
        "another job id": sign_ticket(public, other_job, sealed),
        "another body": sign_ticket(public, job_id, other_sealed),
        "not hex": "zz" * 64,
        "truncated": sign_ticket(public, job_id, sealed)[:-2],
    }
    for what, ticket in forged.items():
        r = await post_job(node.session, node.url, job_id, key, sealed, ticket=ticket)
        assert r.status == 403, what
        assert r.body["error"]["code"] == "ticket_invalid", what
    assert not opts.requests
    r = await post_job(
        node.session, node.url, job_id, key, sealed, ticket=sign_ticket(public, job_id, sealed)
    )
    assert r.status == 200
    check_receipt(r, public, MODEL, PRICES)


async def test_a_node_refuses_jobs_until_it_knows_a_matcher_key(make_node):
    node = await make_node(matcher_key=None)  # no pinned key and no matcher to ask
    r = await node.job({"model": MODEL, "messages": MESSAGES})
    assert r.status == 503 and r.body["error"]["code"] == "matcher_unknown"


# -- job id window and replay memory --------------------------------------------------


async def test_job_ids_outside_their_window_are_refused(node, upstream):
    opts, _ = upstream
    now = time.time()
    for created, code in (
        (now - envelope.JOB_ID_MAX_AGE_S - 5, "job_id_expired"),
        (now + envelope.JOB_ID_MAX_SKEW_S + 5, "job_id_from_future"),
    ):
        job_id, key, sealed = seal_job(
            node.keys.x25519_public,
            {"model": MODEL, "messages": MESSAGES},
            job_id=envelope.new_job_id(created),
        )
        r = await node.post(job_id, key, sealed)
        assert r.status == 400 and r.body["error"]["code"] == code
    assert not opts.requests
    for created in (now - envelope.JOB_ID_MAX_AGE_S + 30, now + envelope.JOB_ID_MAX_SKEW_S - 30):
        r = await node.job(
            {"model": MODEL, "messages": MESSAGES}, job_id=envelope.new_job_id(created)
        )
        assert r.status == 200


def _ids_at(created: float, n: int) -> list[bytes]:
    return [envelope.new_job_id(created) for _ in range(n)]


def test_seen_jobs_forget_expired_ids_and_compact_their_file(tmp_path):
    path = tmp_path / "jobs.seen"
    start = 1_800_000_000.0
    seen = SeenJobs(path, now=start)
    old, recent = _ids_at(start, 50), _ids_at(start + 400, 5)
    for job_id in old:
        seen.add(job_id, start)
    for job_id in recent:
        seen.add(job_id, start + 400)
    assert len(seen) == 55 and all(j in seen for j in old + recent)
    size = path.stat().st_size
    assert size == 32 * 56  # the header and every id

    later = start + envelope.JOB_ID_MAX_AGE_S + 120  # the old ids expired, the recent not
    fresh = envelope.new_job_id(later)
    seen.add(fresh, later)
    assert len(seen) == 6
    assert not any(j in seen for j in old)
    assert all(j in seen for j in [*recent, fresh])
    assert seen.floor > start  # the old ids are refused even if the clock steps back
    with pytest.raises(envelope.JobIdRefused):
        envelope.check_job_id_time(old[0], start + 1, not_before=seen.floor)
    assert path.stat().st_size == 32 * 7 < size  # compacted
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    seen.close()

    # A restart keeps refusing the ids inside the window, and the floor.
    again = SeenJobs(path, now=later + 1)
    assert len(again) == 6 and all(j in again for j in [*recent, fresh])
    assert again.floor == seen.floor
    again.close()


def test_seen_jobs_drop_a_torn_write_and_read_a_file_without_header(tmp_path):
    path = tmp_path / "jobs.seen"
    now = time.time()
    legacy = _ids_at(now, 3)  # the first format: bare ids, no header
    path.write_bytes(b"".join(legacy) + b"\x01" * 7)  # and a torn last write
    seen = SeenJobs(path, now=now)
    assert len(seen) == 3 and all(j in seen for j in legacy)
    assert path.stat().st_size == 32 * 4  # rewritten: header and ids
    seen.close()


async def test_one_fdatasync_serves_every_id_waiting_for_it(tmp_path, monkeypatch):
    calls: list[int] = []
    real = os.fdatasync

    def counting_fdatasync(fd: int) -> None:  # a spy: the real sync, counted
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    now = time.time()
    seen = SeenJobs(tmp_path / "jobs.seen", now=now)
    await seen.sync()
    assert calls == []  # nothing added since the start's fsynced rewrite
    for job_id in _ids_at(now, 3):
        seen.add(job_id, now)
    await asyncio.gather(seen.sync(), seen.sync(), seen.sync())
    assert len(calls) == 1
    seen.add(envelope.new_job_id(now), now)
    await seen.sync()
    await seen.sync()
    assert len(calls) == 2
    seen.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_no_receipt_for_a_job_id_the_node_could_not_put_on_disk(node, monkeypatch, stream):
    def failing_fdatasync(fd: int) -> None:  # FAKE: a disk that fails
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    r = await node.job({"model": MODEL, "messages": MESSAGES, "stream": stream})
    assert r.status == 200, r.body
    assert r.order[-2:] == ["ERROR", "END"]
    assert r.errors[-1]["error"]["code"] == "node_storage_failed"
    assert r.end["receipt"] is None and r.end["completion_tokens"] == 0
