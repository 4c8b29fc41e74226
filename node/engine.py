"""The inference engine behind a node: one narrow interface, one HTTP implementation.

``EngineBackend`` is what the job path needs from an engine. ``OpenAIHttpBackend``
implements it against any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server)
over one shared keep-alive ``aiohttp.ClientSession``; the node either attaches to a
running server (``--upstream``) or supervises vLLM itself (node.supervisor) and points
this backend at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, Protocol

import aiohttp

from protocol.errors import error_body

__all__ = [
    "EngineBackend",
    "EngineError",
    "OpenAIHttpBackend",
    "UsageUnavailable",
    "engine_error",
]

Endpoint = Literal["chat/completions", "completions"]
JSON_HEADERS = {"Content-Type": "application/json"}


def engine_error(status: int, message: str, type_: str, code: str | int | None = None) -> dict:
    return error_body(message, type_, code or status)


class EngineError(Exception):
    """The engine refused or failed a request; ``body`` is OpenAI-style error JSON."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"engine error {status}: {body.get('error', {}).get('message')}")
        self.status = status
        self.body = body


class UsageUnavailable(Exception):
    """The engine gave no usage and cannot count tokens (no ``/tokenize``)."""


class EngineBackend(Protocol):
    """What a node needs from an inference engine."""

    async def models(self) -> list[dict]:
        """OpenAI model objects the engine serves (``id``, maybe ``max_model_len``)."""

    async def complete(self, endpoint: Endpoint, body: dict) -> dict:
        """One non-streaming response object. Raises EngineError."""

    def stream(self, endpoint: Endpoint, body: dict) -> Any:
        """An async context manager yielding an async iterator of OpenAI chunk dicts.

        Raises EngineError on entry (HTTP error) or while iterating (an error event).
        Leaving the context early cancels the request in the engine.
        """

    async def count_prompt(self, endpoint: Endpoint, body: dict) -> int:
        """Prompt tokens of a request. Raises UsageUnavailable."""

    async def count_text(self, model: str, texts: list[str]) -> int:
        """Tokens of generated texts (no special tokens). Raises UsageUnavailable."""

    async def health(self) -> bool: ...

    def describe(self) -> str: ...


def _normalize_error(status: int, raw: bytes) -> dict:
    """Engines disagree on error JSON; give the OpenAI shape ``{"error": {...}}``."""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if isinstance(doc.get("error"), dict):
            err = doc["error"]
        elif "message" in doc:  # older vLLM: {"object": "error", "message", "type", "code"}
            err = doc
        elif isinstance(doc.get("error"), str):
            err = {"message": doc["error"], "type": doc.get("type", "EngineError")}
        elif "detail" in doc:  # FastAPI validation errors
            err = {"message": json.dumps(doc["detail"])[:2000], "type": "BadRequestError"}
        else:
            err = {"message": raw[:2000].decode(errors="replace"), "type": "EngineError"}
    else:
        err = {
            "message": raw[:2000].decode(errors="replace") or f"HTTP {status}",
            "type": "EngineError",
        }
    return {
        "error": {
            "message": str(err.get("message", f"HTTP {status}")),
            "type": str(err.get("type") or "EngineError"),
            "param": err.get("param"),
            "code": err.get("code", status),
        }
    }


def _unreachable(e: BaseException) -> EngineError:
    return EngineError(
        502,
        engine_error(502, f"the engine is unreachable: {type(e).__name__}", "EngineUnavailable"),
    )


class OpenAIHttpBackend:
    """Any OpenAI-compatible HTTP server at ``base_url`` (without the ``/v1``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        label: str = "openai-compatible",
        api_key: str | None = None,
        continuous_usage: bool = True,
    ) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.label = label
        self.continuous_usage = continuous_usage
        self._headers = dict(JSON_HEADERS)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.version: str | None = None

    def describe(self) -> str:
        version = f" {self.version}" if self.version else ""
        return f"{self.label}{version} at {self.base_url}"

    async def models(self) -> list[dict]:
        async with self._session.get(f"{self.base_url}/v1/models", headers=self._headers) as r:
            raw = await r.read()
            if r.status != 200:
                raise EngineError(r.status, _normalize_error(r.status, raw))
            data = json.loads(raw).get("data", [])
        if self.version is None:
            self.version = await self._version()
        return data

    async def _version(self) -> str | None:
        try:
            async with self._session.get(f"{self.base_url}/version") as r:
                if r.status == 200:
                    return str((await r.json()).get("version")) or None
        except (aiohttp.ClientError, ValueError, TimeoutError):
            pass
        return None

    async def health(self) -> bool:
        try:
            async with self._session.get(
                f"{self.base_url}/health", timeout=aiohttp.ClientTimeout(total=5)
            ) as r:
                if r.status == 200:
                    return True
                if r.status != 404:
                    return False
            # No /health (some servers): the model list answering is health enough.
            async with self._session.get(
                f"{self.base_url}/v1/models",
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=5),
            ) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def complete(self, endpoint: Endpoint, body: dict) -> dict:
        try:
            status, raw = await self._post(f"/v1/{endpoint}", body)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _unreachable(e) from e
        if status != 200:
            raise EngineError(status, _normalize_error(status, raw))
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise EngineError(
                502, engine_error(502, "the engine answered invalid JSON", "EngineError")
            ) from e
        if isinstance(doc, dict) and "error" in doc and "choices" not in doc:
            raise EngineError(502, _normalize_error(502, raw))
        return doc

    def with_stream_usage(self, body: dict) -> dict:
        """The body with streaming usage requested (running usage where supported).

        vLLM's running usage is per choice (and per prompt) when a request has several
        (``n > 1``, a list of prompts): node.jobs sums it into the job's running count.
        """
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        if self.continuous_usage:
            options["continuous_usage_stats"] = True
        return {**body, "stream": True, "stream_options": options}

    @asynccontextmanager
    async def stream(self, endpoint: Endpoint, body: dict) -> AsyncIterator[AsyncIterator[dict]]:
        try:
            response = await self._session.post(
                f"{self.base_url}/v1/{endpoint}",
                data=json.dumps(self.with_stream_usage(body)),
                headers=self._headers,
            )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _unreachable(e) from e
        try:
            if response.status != 200:
                raise EngineError(
                    response.status, _normalize_error(response.status, await response.read())
                )
            yield _sse_events(response)
            if not response.content.at_eof():
                # After [DONE] only the chunked-encoding trailer is left: read it so the
                # keep-alive connection goes back to the pool instead of being dropped.
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await asyncio.wait_for(response.content.read(), 1.0)
        finally:
            # Closing (not releasing) drops the connection mid-stream, which makes the
            # engine abort the request; after a full stream it is returned to the pool.
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    async def _post(self, path: str, payload: dict) -> tuple[int, bytes]:
        async with self._session.post(
            f"{self.base_url}{path}", data=json.dumps(payload), headers=self._headers
        ) as r:
            return r.status, await r.read()

    async def _tokenize(self, payload: dict) -> int:
        try:
            status, raw = await self._post("/tokenize", payload)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise UsageUnavailable(f"/tokenize unreachable: {type(e).__name__}") from e
        if status != 200:
            raise UsageUnavailable(f"/tokenize answered HTTP {status}")
        try:
            doc = json.loads(raw)
            if "count" in doc:
                return int(doc["count"])
            return len(doc["tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise UsageUnavailable("/tokenize answered an unknown format") from e

    async def count_prompt(self, endpoint: Endpoint, body: dict) -> int:
        model = body.get("model")
        if endpoint == "chat/completions":
            return await self._tokenize(
                {
                    "model": model,
                    "messages": body.get("messages", []),
                    "add_generation_prompt": True,
                }
            )
        prompt = body.get("prompt", "")
        if isinstance(prompt, str):
            return await self._tokenize({"model": model, "prompt": prompt})
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return len(prompt)  # already token ids
        if isinstance(prompt, list):
            total = 0
            for item in prompt:
                if isinstance(item, str):
                    total += await self._tokenize({"model": model, "prompt": item})
                elif isinstance(item, list):
                    total += len(item)
            return total
        raise UsageUnavailable("cannot count an unrecognized prompt")

    async def count_text(self, model: str, texts: list[str]) -> int:
        total = 0
        for text in texts:
            if text:
                total += await self._tokenize(
                    {"model": model, "prompt": text, "add_special_tokens": False}
                )
        return total


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """Parse ``data:`` lines of a server-sent event stream into JSON objects."""
    buffer = b""
    async for piece in response.content.iter_any():
        buffer += piece
        while True:
            cut = buffer.find(b"\n")
            if cut < 0:
                break
            line, buffer = buffer[:cut].rstrip(b"\r"), buffer[cut + 1 :]
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            try:
                event = json.loads(payload)
            except ValueError as e:
                raise EngineError(
                    502, engine_error(502, "the engine streamed invalid JSON", "EngineError")
                ) from e
            if isinstance(event, dict) and "error" in event and "choices" not in event:
                err = _normalize_error(500, payload)
                code = err["error"].get("code")
                status = code if isinstance(code, int) and 400 <= code < 600 else 500
                raise EngineError(status, err)
            yield event
