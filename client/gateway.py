"""The local OpenAI-compatible gateway (`imago gateway`).

Any app using the official ``openai`` package points its ``base_url`` here
(``http://127.0.0.1:8900/v1``). The gateway validates the request, hands it to the
ImagoClient (which seals it, relays it through the matcher, opens the answer and checks
the receipt) and answers in OpenAI's format, with ``usage`` extended by
``cost_nanoton`` and ``imago_receipt``.

Price caps default to the client's; a request may only lower them with the extra body
fields ``imago_max_price_prompt`` / ``imago_max_price_completion`` (nanoTON per million
tokens; ``extra_body=`` in the openai package): above the gateway's it gets a 400.

Whoever reaches the gateway spends from the escrow, so it answers only local apps, not
web pages: a request with an ``Origin`` header (which browsers add to cross-origin
requests; the openai package and curl do not) is refused unless that origin was allowed
(``--allow-origin``), a POST body must be ``application/json`` (what a page can send
without a CORS preflight is not), and a gateway on loopback refuses a ``Host`` that is
not a loopback name, so a DNS-rebound name cannot reach it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from client.sdk import (
    CompletionStream,
    Endpoint,
    ImagoClient,
    ImagoError,
    PriceCaps,
)
from protocol.errors import ApiError, error_middleware

__all__ = [
    "API_KEY",
    "CLIENT",
    "ChatCompletionRequest",
    "CompletionRequest",
    "create_app",
    "is_loopback_name",
    "normalize_origin",
]

log = logging.getLogger("imago.gateway")

CLIENT = web.AppKey("imago_client", ImagoClient)
API_KEY = web.AppKey("imago_api_key", str)  # empty: no key required
ALLOWED_ORIGINS = web.AppKey("imago_allowed_origins", frozenset)  # empty: no browser page
LOOPBACK_HOSTS_ONLY = web.AppKey("imago_loopback_hosts_only", bool)

CAP_PROMPT_FIELD = "imago_max_price_prompt"
CAP_COMPLETION_FIELD = "imago_max_price_completion"
_DUMPS: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":")).encode


# -- request models (validation at the edge; the raw body is what gets forwarded) ------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class ChatMessage(_Open):
    role: str = Field(min_length=1)
    content: str | list[Any] | None = None


class _CommonRequest(_Open):
    model: str = Field(min_length=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    imago_max_price_prompt: int | None = Field(default=None, ge=0)
    imago_max_price_completion: int | None = Field(default=None, ge=0)


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


_REQUEST_MODELS: dict[str, type[_CommonRequest]] = {
    "chat/completions": ChatCompletionRequest,
    "completions": CompletionRequest,
}


# -- middlewares (errors: protocol.errors.error_middleware) ----------------------------


@web.middleware
async def _auth(
    request: web.Request, handler: Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]
) -> web.StreamResponse:
    expected = request.app[API_KEY]
    if expected:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), expected.encode()
        ):
            raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
    return await handler(request)


def _forbidden(message: str, code: str) -> ApiError:
    return ApiError(403, message, "invalid_request_error", code)


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]
) -> web.StreamResponse:
    """Keep web pages out: every route, before the API key is even looked at."""
    host = request.headers.get(hdrs.HOST)
    if request.app[LOOPBACK_HOSTS_ONLY] and host is not None and not _loopback_host(host):
        # A page whose DNS name was rebound to 127.0.0.1 still sends its own name here.
        raise _forbidden(
            f"the gateway listens on loopback and answers only a loopback Host "
            f"(127.0.0.1, localhost, [::1]), not {host!r}",
            "host_not_allowed",
        )
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None:
        if not _allowed_origin(request, origin):
            raise _forbidden(
                f"requests from web pages (Origin {origin!r}) are refused: whoever reaches "
                "the gateway spends from its escrow; start it with --allow-origin to allow one",
                "origin_not_allowed",
            )
        if (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        ):
            return _preflight(request)
    elif request.headers.get("Sec-Fetch-Site", "none") not in ("none", "same-origin"):
        # A browser's no-cors request from another site (an <img>, a <form>) has no Origin.
        raise _forbidden(
            "requests from web pages are refused: whoever reaches the gateway spends from "
            "its escrow",
            "origin_not_allowed",
        )
    if request.method == hdrs.METH_POST and request.content_type != "application/json":
        raise ApiError(
            415,
            "Unsupported Media Type: only 'application/json' is allowed, not "
            f"{request.headers.get(hdrs.CONTENT_TYPE, 'no Content-Type')!r}",
            "invalid_request_error",
            "unsupported_media_type",
        )
    return await handler(request)


def _loopback_host(host: str) -> bool:
    """Whether a Host header names loopback: ``localhost`` or a loopback address, with or
    without a port. A rebound page sends its own DNS name, never one of these."""
    host = host.strip()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return False
    else:
        name, colon, port = host.partition(":")
        if colon and not port.isdigit():
            return False
    return is_loopback_name(name)


def is_loopback_name(name: str) -> bool:
    """``localhost`` or a loopback address (no port, no brackets)."""
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return name.lower() == "localhost"


def _preflight(request: web.Request) -> web.Response:
    """A CORS preflight from an allowed origin (its CORS headers come from _cors)."""
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET, POST",
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: request.headers.get(
                hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "Authorization, Content-Type"
            ),
            hdrs.ACCESS_CONTROL_MAX_AGE: "600",
        },
    )


def _allowed_origin(request: web.Request, origin: str) -> bool:
    return origin.rstrip("/").lower() in request.app[ALLOWED_ORIGINS]


async def _cors(request: web.Request, response: web.StreamResponse) -> None:
    """CORS headers on every answer (errors and streams too) to an allowed origin only."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and _allowed_origin(request, origin):
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.VARY] = hdrs.ORIGIN


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` as a browser sends it; ValueError for anything else."""
    text = origin.strip().rstrip("/").lower()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise ValueError(
            f"an origin is scheme://host[:port], like http://localhost:3000: {origin!r}"
        )
    return text


# -- handlers --------------------------------------------------------------------------


async def _read_body(request: web.Request, endpoint: str) -> tuple[dict[str, Any], PriceCaps]:
    try:
        body = await request.json(loads=json.loads)
    except ValueError as e:
        raise ApiError.bad_request(
            f"the request body is not valid JSON: {e}", "invalid_json"
        ) from e
    if not isinstance(body, dict):
        raise ApiError.bad_request("the request body must be a JSON object", "invalid_body")
    try:
        parsed = _REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as e:
        raise ApiError.invalid_body(e) from None
    if parsed.stream_options is not None and not parsed.stream:
        raise ApiError.bad_request(
            "Stream options can only be defined when `stream=True`.", param="stream_options"
        )
    caps = request.app[CLIENT].caps
    for field, asked, ceiling in (
        (CAP_PROMPT_FIELD, parsed.imago_max_price_prompt, caps.prompt),
        (CAP_COMPLETION_FIELD, parsed.imago_max_price_completion, caps.completion),
    ):
        if asked is not None and asked > ceiling:
            raise ApiError.bad_request(
                f"{field} {asked} is above the gateway's own cap of {ceiling} nanoTON per "
                "million tokens: a request may only lower it",
                "price_cap_above_gateway",
                param=field,
            )
    if parsed.imago_max_price_prompt is not None or parsed.imago_max_price_completion is not None:
        caps = PriceCaps(
            prompt=_or(parsed.imago_max_price_prompt, caps.prompt),
            completion=_or(parsed.imago_max_price_completion, caps.completion),
        )
    body.pop(CAP_PROMPT_FIELD, None)
    body.pop(CAP_COMPLETION_FIELD, None)
    return body, caps


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


async def _serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    body, caps = await _read_body(request, endpoint)
    client = request.app[CLIENT]
    if not body.get("stream"):
        completion = await client.complete(endpoint, body, caps)
        return web.json_response(completion.response, dumps=_DUMPS)
    stream = client.stream(endpoint, body, caps)
    try:
        # The first chunk before the headers: a routing error (404, 402, 503) keeps
        # its HTTP status instead of turning into an SSE error event.
        first = await _first(stream)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        try:
            if first is not None:
                await response.write(_sse(first))
                async for chunk in stream:
                    await response.write(_sse(chunk))
        except ImagoError as e:
            log.warning("stream %s failed: %s", stream.job_id, e.message)
            await response.write(_sse(e.body))
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    finally:
        await stream.aclose()  # a client disconnect cancels the upstream relay here


async def _first(stream: CompletionStream) -> dict[str, Any] | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _DUMPS(obj).encode() + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat/completions")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completions")


async def models(request: web.Request) -> web.Response:
    return web.json_response(await request.app[CLIENT].models(), dumps=_DUMPS)


async def model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    for entry in (await request.app[CLIENT].models()).get("data", []):
        if entry.get("id") == model_id:
            return web.json_response(entry, dumps=_DUMPS)
    raise ApiError(
        404,
        f"The model `{model_id}` does not exist.",
        "not_found_error",
        "model_not_found",
        param="model",
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# -- the app ---------------------------------------------------------------------------


def create_app(
    client: ImagoClient,
    *,
    api_key: str | None = None,
    allow_origins: Iterable[str] = (),
    loopback_hosts_only: bool = True,
) -> web.Application:
    """The gateway app. It starts ``client`` with the app and closes it (flushing
    outstanding vouchers) at shutdown.

    ``allow_origins``: the web origins (``scheme://host[:port]``) whose pages may call
    it, with CORS; none by default. ``loopback_hosts_only``: refuse a Host header that
    is not loopback (leave it on whenever the gateway listens on loopback)."""
    app = web.Application(
        middlewares=[error_middleware(log), _guard, _auth], client_max_size=16 * 1024 * 1024
    )
    app[CLIENT] = client
    app[API_KEY] = api_key or ""
    app[ALLOWED_ORIGINS] = frozenset(normalize_origin(o) for o in allow_origins)
    app[LOOPBACK_HOSTS_ONLY] = loopback_hosts_only
    app.on_response_prepare.append(_cors)

    async def client_lifetime(app: web.Application) -> AsyncIterator[None]:
        await app[CLIENT].start()
        yield
        await app[CLIENT].close()

    app.cleanup_ctx.append(client_lifetime)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
    app.router.add_get("/health", health)
    return app
