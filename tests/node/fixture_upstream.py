"""FIXTURE: a tiny OpenAI-compatible upstream for the node's tests (not a model).

It answers a fixed text word by word, counts a "token" per whitespace-separated word,
and can be told to omit usage in streams and/or to have no ``/tokenize``, so the tests
can check that the node counts tokens itself or fails the job rather than bill 0. It
mimics vLLM's errors (404 unknown model, 400 max_tokens above the context).
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


def _prompt_tokens(endpoint: str, body: dict) -> int:
    if endpoint == "chat":
        return chat_prompt_tokens(body.get("messages", []))
    return words(str(body.get("prompt", "")))


async def _generate(request: web.Request, endpoint: str) -> web.StreamResponse:
    opts = request.app[FIXTURE]
    body = await request.json()
    opts.requests.append(body)
    if body.get("model") != opts.model:
        return _error(
            404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model"
        )
    prompt = _prompt_tokens(endpoint, body)
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    if prompt + max_tokens > opts.max_model_len:
        return _error(
            400,
            f"This model's maximum context length is {opts.max_model_len} tokens. However, you "
            f"requested {prompt + max_tokens} tokens.",
            "BadRequestError",
        )
    pieces = [w + " " for w in opts.answer.split()][:max_tokens]
    pieces[-1] = pieces[-1].rstrip()
    created = int(time.time())
    rid = f"fixture-{len(opts.requests)}"
    obj = "chat.completion" if endpoint == "chat" else "text_completion"

    if not body.get("stream"):
        text = "".join(pieces)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if endpoint == "chat"
            else {"index": 0, "text": text, "finish_reason": "stop"}
        )
        doc = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": opts.model,
            "choices": [choice],
        }
        if opts.usage_in_responses:
            doc["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": len(pieces),
                "total_tokens": prompt + len(pieces),
            }
        return web.json_response(doc)

    options = body.get("stream_options") or {}
    include = opts.usage_in_streams and options.get("include_usage")
    continuous = include and options.get("continuous_usage_stats")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)

    async def send(chunk: dict) -> None:
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    chunk_obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    try:
        if endpoint == "chat":
            first = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
            }
            chunk = {
                "id": rid,
                "object": chunk_obj,
                "created": created,
                "model": opts.model,
                "choices": [first],
            }
            if continuous:
                chunk["usage"] = {
                    "prompt_tokens": prompt,
                    "completion_tokens": 0,
                    "total_tokens": prompt,
                }
            await send(chunk)
        for n, piece in enumerate(pieces, 1):
            if opts.chunk_delay:
                await asyncio.sleep(opts.chunk_delay)
            last = n == len(pieces)
            choice = (
                {"index": 0, "delta": {"content": piece}, "finish_reason": "stop" if last else None}
                if endpoint == "chat"
                else {"index": 0, "text": piece, "finish_reason": "stop" if last else None}
            )
            chunk = {
                "id": rid,
                "object": chunk_obj,
                "created": created,
                "model": opts.model,
                "choices": [choice],
            }
            if continuous:
                chunk["usage"] = {
                    "prompt_tokens": prompt,
                    "completion_tokens": n,
                    "total_tokens": prompt + n,
                }
            await send(chunk)
        if include:
            await send(
                {
                    "id": rid,
                    "object": chunk_obj,
                    "created": created,
                    "model": opts.model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": len(pieces),
                        "total_tokens": prompt + len(pieces),
                    },
                }
            )
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
