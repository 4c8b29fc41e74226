"""FIXTURE: a tiny OpenAI-compatible upstream for the node's tests (not a model).

It answers a fixed text word by word, counts a "token" per whitespace-separated word,
and can be told to omit usage in streams and/or to have no ``/tokenize``, so the tests
can check that the node counts tokens itself or fails the job rather than bill 0. It
mimics vLLM's errors (404 unknown model, 400 max_tokens above the context).

Several choices (``n``) and, for completions, several prompts are answered as vLLM
0.32 does: choice ``i`` answers prompt ``i // n`` (here: the fixed text less its last
``i`` words, so that the choices differ in length); a stream carries one choice per
chunk, the choices interleaved, each a step behind the one before (chat first sends
every choice's role chunk); with ``continuous_usage_stats`` each chunk's usage is that
choice's own (the tokens of its prompt, its completion tokens so far), so the usage
goes up and down across chunks; the last chunk (``choices: []``) has the totals: every
prompt once, every choice's completion tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["FixtureOptions", "FIXTURE", "create_fixture_upstream", "chat_prompt_tokens"]

ANSWER = "The capital of France is Paris."


@dataclass
class FixtureOptions:
    model: str = "fixture-model"
    answer: str = ANSWER
    max_model_len: int = 2048
    usage_in_streams: bool = True
    usage_in_responses: bool = True
    tokenize: bool = True
    chunk_delay: float = 0.0
    # A slow engine: when set, generation requests wait for this event before answering.
    release: asyncio.Event | None = None
    requests: list[dict] = field(default_factory=list)
    tokenize_calls: list[dict] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


FIXTURE = web.AppKey("fixture_options", FixtureOptions)


def words(text: str) -> int:
    return len(text.split())


def chat_prompt_tokens(messages: list[dict]) -> int:
    """Fixture chat template: 4 tokens per message plus its words, plus 2."""
    return sum(4 + words(str(m.get("content", ""))) for m in messages) + 2


def _error(status: int, message: str, type_: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return web.json_response(body, status=status)


def _prompt_tokens(endpoint: str, body: dict) -> list[int]:
    """The tokens of each prompt of the request (chat has one)."""
    if endpoint == "chat":
        return [chat_prompt_tokens(body.get("messages", []))]
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return [len(prompt)]  # one prompt of token ids
    if isinstance(prompt, list):
        return [len(p) if isinstance(p, list) else words(str(p)) for p in prompt]
    return [words(str(prompt))]


async def _generate(request: web.Request, endpoint: str) -> web.StreamResponse:
    opts = request.app[FIXTURE]
    body = await request.json()
    opts.requests.append(body)
    if opts.release is not None:
        await opts.release.wait()
    if body.get("model") != opts.model:
        return _error(
            404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model"
        )
    prompts = _prompt_tokens(endpoint, body)
    n = body.get("n") or 1
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    if max(prompts) + max_tokens > opts.max_model_len:
        return _error(
            400,
            f"This model's maximum context length is {opts.max_model_len} tokens. However, you "
            f"requested {max(prompts) + max_tokens} tokens.",
            "BadRequestError",
        )
    answer = [w + " " for w in opts.answer.split()][:max_tokens]
    pieces = []  # per choice index
    for i in range(n * len(prompts)):
        mine = answer[: max(1, len(answer) - i)]
        pieces.append([*mine[:-1], mine[-1].rstrip()])
    prompt_total = sum(prompts)
    completion_total = sum(len(p) for p in pieces)
    created = int(time.time())
    rid = f"fixture-{len(opts.requests)}"
    obj = "chat.completion" if endpoint == "chat" else "text_completion"

    if not body.get("stream"):
        choices = [
            (
                {"index": i, "message": {"role": "assistant", "content": "".join(p)}}
                if endpoint == "chat"
                else {"index": i, "text": "".join(p)}
            )
            | {"finish_reason": "stop"}
            for i, p in enumerate(pieces)
        ]
        doc = {"id": rid, "object": obj, "created": created, "model": opts.model}
        doc["choices"] = choices
        if opts.usage_in_responses:
            doc["usage"] = {
                "prompt_tokens": prompt_total,
                "completion_tokens": completion_total,
                "total_tokens": prompt_total + completion_total,
            }
        return web.json_response(doc)

    options = body.get("stream_options") or {}
    include = opts.usage_in_streams and options.get("include_usage")
    continuous = include and options.get("continuous_usage_stats")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    chunk_obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"

    async def send(choices: list[dict], usage: tuple[int, int] | None) -> None:
        chunk = {
            "id": rid,
            "object": chunk_obj,
            "created": created,
            "model": opts.model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = {
                "prompt_tokens": usage[0],
                "completion_tokens": usage[1],
                "total_tokens": sum(usage),
            }
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    try:
        if endpoint == "chat":
            for i in range(n):
                first = {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                }
                await send([first], (prompts[0], 0) if continuous else None)
        # Choice i runs i steps behind choice 0, as vLLM's did here: 0:1, 0:2, 1:1, 0:3, 1:2…
        for tick in range(max(i + len(p) for i, p in enumerate(pieces))):
            for i, mine in enumerate(pieces):
                step = tick - i
                if not 0 <= step < len(mine):
                    continue
                if opts.chunk_delay:
                    await asyncio.sleep(opts.chunk_delay)
                finish = "stop" if step == len(mine) - 1 else None
                choice = (
                    {"index": i, "delta": {"content": mine[step]}, "finish_reason": finish}
                    if endpoint == "chat"
                    else {"index": i, "text": mine[step], "finish_reason": finish}
                )
                await send([choice], (prompts[i // n], step + 1) if continuous else None)
        if include:
            await send([], (prompt_total, completion_total))
        await response.write(b"data: [DONE]\n\n")
    except (asyncio.CancelledError, ConnectionResetError):
        opts.cancelled.append(rid)
        raise
    return response


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _tokenize(request: web.Request) -> web.Response:
    opts = request.app[FIXTURE]
    if not opts.tokenize:
        return web.json_response({"detail": "Not Found"}, status=404)
    body = await request.json()
    opts.tokenize_calls.append(body)
    if "messages" in body:
        count = chat_prompt_tokens(body["messages"])
    else:
        count = words(str(body.get("prompt", "")))
    return web.json_response(
        {"count": count, "max_model_len": opts.max_model_len, "tokens": list(range(count))}
    )


async def _models(request: web.Request) -> web.Response:
    opts = request.app[FIXTURE]
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": opts.model,
                    "object": "model",
                    "owned_by": "fixture",
                    "max_model_len": opts.max_model_len,
                }
            ],
        }
    )


async def _health(request: web.Request) -> web.Response:
    return web.Response(status=200)


def create_fixture_upstream(options: FixtureOptions | None = None) -> web.Application:
    app = web.Application()
    app[FIXTURE] = options or FixtureOptions()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    return app


if __name__ == "__main__":  # FIXTURE process: `python -m tests.node.fixture_upstream PORT`
    import sys

    web.run_app(
        create_fixture_upstream(),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        print=None,
        access_log=None,
    )
