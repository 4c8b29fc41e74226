"""Benchmark fixture: an OpenAI-compatible upstream that answers instantly.

It stands in for the engine only to measure what Imago itself adds (the issue allows
this, named as such); it is never part of the product. It answers every chat or text
completion with a fixed short reply, streams it in a few chunks, reports usage like
vLLM (including ``continuous_usage_stats``) and serves ``/tokenize`` and ``/health``.

    python scripts/bench_upstream.py --port 9000
"""

from __future__ import annotations

import argparse
import json
import time

from aiohttp import web

MODEL = "bench-instant"
REPLY_TOKENS = ["The", " capital", " of", " France", " is", " Paris", "."]
PROMPT_TOKENS = 12


def _usage(completion_tokens: int) -> dict:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    if delta:
        return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
    }


async def completions(request: web.Request) -> web.StreamResponse:
    chat = request.path.endswith("/chat/completions")
    body = await request.json()
    if body.get("model") != MODEL:
        return web.json_response(
            {"error": {"message": f"model {body.get('model')!r} does not exist",
                       "type": "NotFoundError", "param": None, "code": 404}},
            status=404,
        )  # fmt: skip
    kind = "chat.completion" if chat else "text_completion"
    base = {"id": "bench-1", "created": int(time.time()), "model": MODEL}
    if not body.get("stream"):
        text = "".join(REPLY_TOKENS)
        return web.json_response(
            {**base, "object": kind, "choices": [_choice(chat, text, "stop", delta=False)],
             "usage": _usage(len(REPLY_TOKENS))}
        )  # fmt: skip
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    options = body.get("stream_options") or {}
    continuous = options.get("continuous_usage_stats", False)
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    for i, token in enumerate(REPLY_TOKENS, 1):
        finish = "stop" if i == len(REPLY_TOKENS) else None
        chunk = {**base, "object": chunk_kind, "choices": [_choice(chat, token, finish, True)]}
        if continuous:
            chunk["usage"] = _usage(i)
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    if options.get("include_usage"):
        final = {**base, "object": chunk_kind, "choices": [], "usage": _usage(len(REPLY_TOKENS))}
        await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def tokenize(request: web.Request) -> web.Response:
    body = await request.json()
    text = body.get("prompt") or json.dumps(body.get("messages", ""))
    tokens = list(range(max(1, len(text) // 4)))
    return web.json_response({"count": len(tokens), "tokens": tokens, "max_model_len": 2048})


async def models(_: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 2048}]}
    )


async def health(_: web.Request) -> web.Response:
    return web.Response()


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    web.run_app(create_app(), host=args.host, port=args.port, print=None, access_log=None)
