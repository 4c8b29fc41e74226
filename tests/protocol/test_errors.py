"""protocol.errors: the one error model, its middleware, and reading a body back."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel, ValidationError

from protocol.api import ErrorResponse
from protocol.errors import ApiError, default_type, error_body, error_middleware, read_error

SECRET = "postgresql://admin:hunter2@db"


class Body(BaseModel):
    model: str


async def refuse(request: web.Request) -> web.Response:
    raise ApiError(429, "node busy", "rate_limit_error", "node_busy", headers={"Retry-After": "1"})


async def validate(request: web.Request) -> web.Response:
    try:
        Body.model_validate_json(await request.read())
    except ValidationError as e:
        raise ApiError.invalid_body(e) from None
    return web.json_response({"ok": True})


async def crash(request: web.Request) -> web.Response:
    raise RuntimeError(f"cannot reach {SECRET}")


async def small(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"ok": True})


async def crash_mid_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"some frames")
    raise RuntimeError("the stream broke")


@pytest.fixture
async def client():
    app = web.Application(middlewares=[error_middleware()], client_max_size=64)
    app.router.add_post("/refuse", refuse)
    app.router.add_post("/validate", validate)
    app.router.add_get("/crash", crash)
    app.router.add_post("/small", small)
    app.router.add_get("/stream", crash_mid_stream)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def error_of(resp: aiohttp.ClientResponse) -> dict:
    assert resp.content_type == "application/json"
    body = await resp.json()
    ErrorResponse.model_validate(body)  # the one shape, on every error
    return body["error"]


def test_the_body_and_default_types():
    error = ApiError(402, "price cap too low", code="price_cap_too_low", param="model")
    assert error.body == error_body(error.message, "invalid_request_error", error.code, "model")
    assert error.body == {
        "error": {
            "message": "price cap too low",
            "type": "invalid_request_error",
            "param": "model",
            "code": "price_cap_too_low",
        }
    }
    assert ApiError(503, "down").type == "server_error"
    assert ApiError.forbidden("no", "bad_signature").type == "permission_error"
    assert ApiError.unavailable("later", "engine_not_ready").status == 503
    assert [default_type(s) for s in (401, 404, 429, 400, 502)] == [
        "authentication_error",
        "not_found_error",
        "rate_limit_error",
        "invalid_request_error",
        "server_error",
    ]


def test_reading_a_body_back():
    nested = read_error(404, {"error": {"message": "no", "code": "model_not_found"}}, "x")
    assert (nested.status, nested.message, nested.type, nested.code) == (
        404,
        "no",
        "not_found_error",
        "model_not_found",
    )
    flat = read_error(502, {"status": 502, "message": "cut", "type": "relay_error"}, "x")
    assert (flat.message, flat.type, flat.code) == ("cut", "relay_error", None)
    for garbage in (None, [1], {"error": "boom"}, {"error": {"code": {"a": 1}}}):
        error = read_error(500, garbage, "the default")
        assert error.type == "server_error" and error.code is None
        assert error.message in ("the default", "boom")


async def test_an_api_error_keeps_its_status_code_and_headers(client):
    async with client.post("/refuse") as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        error = await error_of(resp)
    assert (error["type"], error["code"]) == ("rate_limit_error", "node_busy")


async def test_an_invalid_body_names_where(client):
    async with client.post("/validate", data=b'{"model": 3}') as resp:
        assert resp.status == 400
        error = await error_of(resp)
    assert error["code"] == "invalid_body" and error["param"] == "model"
    async with client.post("/validate", data=b"{not json") as resp:
        assert resp.status == 400 and (await error_of(resp))["code"] == "invalid_body"


async def test_aiohttp_errors_answer_the_same_shape(client):
    async with client.get("/nowhere") as resp:
        assert resp.status == 404
        assert (await error_of(resp))["code"] == "not_found"
    async with client.get("/refuse") as resp:
        assert resp.status == 405 and "POST" in resp.headers["Allow"]
        assert (await error_of(resp))["code"] == "method_not_allowed"
    async with client.post("/small", data=b"x" * 1000) as resp:
        assert resp.status == 413
        error = await error_of(resp)
    assert error["code"] == "request_entity_too_large" and "64" in error["message"]


async def test_an_unexpected_error_is_a_bare_500_logged_once(client, caplog):
    with caplog.at_level(logging.ERROR):
        async with client.get("/crash") as resp:
            assert resp.status == 500
            error = await error_of(resp)
    assert error == {
        "message": "internal error",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and SECRET in str(logged[0].exc_info[1])


async def test_an_error_after_the_stream_began_closes_the_connection(client):
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get("/stream") as resp:
            assert resp.status == 200
            await resp.read()
