"""The gateway through the official openai package, against fake nodes and matcher."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import openai
import pytest

from protocol.signed import DEVNET_GLOBAL_ID, Receipt, cost_nanoton
from tests.client.conftest import ESCROW, Stack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "Paris is the capital of France ."


def expected_cost(stack: Stack, prompt: int, completion: int, node: int = 0) -> int:
    offer = stack.nodes[node].offer
    return cost_nanoton(prompt, completion, offer.price_prompt, offer.price_completion)


async def test_chat_non_streaming(stack: Stack) -> None:
    response = await stack.openai.chat.completions.create(model="fake-model", messages=QUESTION)
    assert response.choices[0].message.content == ANSWER
    usage = response.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (6, 7)
    assert usage.total_tokens == 13
    extra = usage.model_extra or {}
    assert extra["cost_nanoton"] == expected_cost(stack, 6, 7)
    receipt_info = extra["imago_receipt"]
    assert receipt_info["node"] == stack.nodes[0].node_id  # the cheaper node
    receipt = Receipt.from_boc(base64.b64decode(receipt_info["boc"]))
    signature = bytes.fromhex(receipt_info["signature"])
    assert receipt.verify(signature, stack.nodes[0].ed25519_public, global_id=DEVNET_GLOBAL_ID)
    await stack.client.flush_vouchers()
    assert stack.matcher.latest[ESCROW] == extra["cost_nanoton"]


async def test_chat_streaming_with_usage(stack: Stack) -> None:
    stream = await stack.openai.chat.completions.create(
        model="fake-model",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage_chunks = "", []
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        else:
            usage_chunks.append(chunk)
    assert text == ANSWER
    assert len(usage_chunks) == 1
    usage = usage_chunks[0].usage
    assert usage is not None and usage.completion_tokens == 7
    assert (usage.model_extra or {})["cost_nanoton"] == expected_cost(stack, 6, 7)
    assert (usage.model_extra or {})["imago_receipt"]["node"] == stack.nodes[0].node_id


async def test_chat_streaming_without_usage(stack: Stack) -> None:
    stream = await stack.openai.chat.completions.create(
        model="fake-model", messages=QUESTION, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    await stack.client.flush_vouchers()
    assert stack.matcher.latest[ESCROW] == expected_cost(stack, 6, 7)


async def test_continuous_engine_usage_is_normalized(stack: Stack) -> None:
    for node in stack.nodes:
        node.fault = "continuous_usage"
    for include in (False, True):
        raw = []
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{stack.gateway_url}/v1/chat/completions",
                json={
                    "model": "fake-model",
                    "messages": QUESTION,
                    "stream": True,
                    "stream_options": {"include_usage": include},
                },
            ) as resp,
        ):
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    raw.append(json.loads(line[6:]))
        content = [c for c in raw if c["choices"]]
        assert len(content) == 7
        if include:
            assert all(c["usage"] is None for c in content)
            assert raw[-1]["choices"] == [] and raw[-1]["usage"]["cost_nanoton"] > 0
        else:
            assert all("usage" not in c for c in raw)


async def test_completions_both_modes(stack: Stack) -> None:
    response = await stack.openai.completions.create(
        model="fake-model", prompt="The capital of France is", max_tokens=3
    )
    assert response.choices[0].text == "Paris is the"
    assert response.usage is not None and response.usage.completion_tokens == 3
    stream = await stack.openai.completions.create(
        model="fake-model",
        prompt="The capital of France is",
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == "Paris is the"
    assert usage is not None and (usage.model_extra or {})["cost_nanoton"] == expected_cost(
        stack, 5, 3
    )


async def test_models_from_matcher(stack: Stack) -> None:
    models = await stack.openai.models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    assert (models.data[0].model_extra or {})["imago_nodes"] == 2
    assert (await stack.openai.models.retrieve("fake-model")).id == "fake-model"
    with pytest.raises(openai.NotFoundError):
        await stack.openai.models.retrieve("no-such-model")


async def test_malformed_requests_are_400(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError):
        await stack.openai.chat.completions.create(model="fake-model", messages=[])
    with pytest.raises(openai.BadRequestError):
        await stack.openai.chat.completions.create(
            model="fake-model", messages=QUESTION, max_tokens=0
        )
    async with aiohttp.ClientSession() as session:
        for data in (
            b"{not json",
            b"[1, 2]",
            b'{"messages": []}',
            b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}],'
            b' "stream": "yes"}',
            b'{"model": "fake-model", "messages": [{"content": "x"}]}',
        ):
            async with session.post(
                f"{stack.gateway_url}/v1/chat/completions",
                data=data,
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 400
                body = await resp.json()
                assert body["error"]["type"] == "invalid_request_error"
    assert stack.matcher.relay_calls == 0


async def test_unknown_model_is_404(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await stack.openai.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # streaming keeps the status too
        await stack.openai.chat.completions.create(
            model="no-such-model", messages=QUESTION, stream=True
        )


async def test_price_cap_below_every_node_is_402(stack: Stack) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        await stack.openai.chat.completions.create(
            model="fake-model", messages=QUESTION, extra_body={"imago_max_price_completion": 1}
        )
    assert info.value.status_code == 402
    assert info.value.code == "price_cap_too_low"
    assert stack.matcher.relay_calls == 0
    assert stack.client.cumulative_spend == 0


async def test_every_node_busy_is_a_429_the_openai_package_retries(stack: Stack) -> None:
    stack.matcher.all_busy = True
    with pytest.raises(openai.RateLimitError) as info:
        await stack.openai.chat.completions.create(model="fake-model", messages=QUESTION)
    assert info.value.code == "nodes_busy"
    with pytest.raises(openai.RateLimitError):  # streaming keeps the status too
        await stack.openai.chat.completions.create(
            model="fake-model", messages=QUESTION, stream=True
        )
    assert stack.client.cumulative_spend == 0


async def test_engine_error_passes_through(stack: Stack) -> None:
    for node in stack.nodes:
        node.fault = "engine_error"
    with pytest.raises(openai.BadRequestError) as info:
        await stack.openai.chat.completions.create(model="fake-model", messages=QUESTION)
    assert "max_tokens is too large" in info.value.message
    assert stack.client.cumulative_spend == 0


async def test_api_key_is_checked(stack: Stack) -> None:
    from aiohttp.test_utils import TestServer

    from client.gateway import create_app
    from tests.client.conftest import make_client

    client = make_client(stack.matcher_url, stack.state_path.with_name("k.json"), stack.spend_key)
    server = TestServer(create_app(client, api_key="s3cret"))
    await server.start_server()
    try:
        url = str(server.make_url("/v1"))
        wrong = openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        right = openai.AsyncOpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert (await right.models.list()).data[0].id == "fake-model"
        await wrong.close()
        await right.close()
    finally:
        await server.close()


async def test_relay_error_mid_stream(stack: Stack) -> None:
    stack.matcher.relay_error_after = 3  # three chunks reach the client, then the node "dies"
    stream = await stack.openai.chat.completions.create(
        model="fake-model", messages=QUESTION, stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Paris", " is", " the"]
    assert "mid-stream" in info.value.message
    await stack.client.flush_vouchers()
    # paid for what arrived: the last usage opened (6 prompt, 3 completion) at the offer
    assert stack.matcher.latest[ESCROW] == expected_cost(stack, 6, 3)


async def test_tampered_ciphertext(stack: Stack) -> None:
    stack.matcher.tamper_frame = 0
    with pytest.raises(openai.APIStatusError) as info:
        await stack.openai.chat.completions.create(model="fake-model", messages=QUESTION)
    assert info.value.status_code == 502
    assert info.value.code == "response_tampered"
    stack.matcher.tamper_frame = 2
    stream = await stack.openai.chat.completions.create(
        model="fake-model", messages=QUESTION, stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as info2:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Paris", " is"]
    assert "does not open" in info2.value.message
    assert stack.client.cumulative_spend == 0
    assert stack.matcher.vouchers == []


async def test_client_disconnect_cancels_upstream(stack: Stack) -> None:
    for node in stack.nodes:
        node.delay = 0.05
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{stack.gateway_url}/v1/chat/completions",
            json={"model": "fake-model", "messages": QUESTION, "stream": True},
        ) as resp,
    ):
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
    await asyncio.sleep(0.4)
    node = stack.nodes[0]
    assert node.finished_jobs == 0
    assert node.frames_sent < 7
    # the tokens that were delivered are paid for, at the offer
    assert 0 < stack.client.cumulative_spend < expected_cost(stack, 6, 7)


BODY = {"model": "fake-model", "messages": QUESTION}


async def _post(url: str, data: bytes, **headers: str) -> tuple[int, dict, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=data, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json()


async def test_web_pages_cannot_spend_from_the_escrow(stack: Stack) -> None:
    """What a page can make a browser send (a text/plain "simple request", an Origin, a
    DNS-rebound Host, a no-cors request) is refused before anything is relayed."""
    port = stack.gateway_url.rsplit(":", 1)[1]
    chat = f"{stack.gateway_url}/v1/chat/completions"
    body = json.dumps(BODY).encode()
    # the request of the review, as curl would send it
    status, headers, error = await _post(
        chat,
        body,
        Host=f"evil.example:{port}",
        Origin="http://evil.example",
        **{"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert status == 403 and error["error"]["code"] == "host_not_allowed"
    assert "Access-Control-Allow-Origin" not in headers
    # each defence alone
    status, _, error = await _post(chat, body, **{"Content-Type": "text/plain;charset=UTF-8"})
    assert status == 415 and error["error"]["code"] == "unsupported_media_type"
    assert "application/json" in error["error"]["message"]
    assert error["error"]["type"] == "invalid_request_error"
    status, _, error = await _post(
        chat, body, **{"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 415
    status, headers, error = await _post(
        chat, body, Origin="http://evil.example", **{"Content-Type": "application/json"}
    )
    assert status == 403 and error["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in headers
    status, _, error = await _post(
        chat, body, Host=f"evil.example:{port}", **{"Content-Type": "application/json"}
    )
    assert status == 403 and error["error"]["code"] == "host_not_allowed"
    status, _, error = await _post(  # a no-cors request from another site has no Origin
        chat, body, **{"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}
    )
    assert status == 403 and error["error"]["code"] == "origin_not_allowed"
    async with aiohttp.ClientSession() as session:
        for headers in (
            {"Origin": "http://evil.example"},
            {"Host": f"evil.example:{port}"},
            {"Host": "127.0.0.1.evil.example"},
            {"Host": "localhost.evil.example:80"},
        ):
            async with session.get(f"{stack.gateway_url}/v1/models", headers=headers) as resp:
                assert resp.status == 403, headers
                assert (await resp.json())["error"]["code"] in (
                    "origin_not_allowed",
                    "host_not_allowed",
                )
                assert "Access-Control-Allow-Origin" not in resp.headers
        preflight = {
            "Origin": "http://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }
        async with session.options(chat, headers=preflight) as resp:
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
        # loopback names, with or without the port, are what local apps send
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST", "[::1]"):
            async with session.get(
                f"{stack.gateway_url}/v1/models", headers={"Host": host}
            ) as resp:
                assert resp.status == 200, host
    assert stack.matcher.relay_calls == 0
    assert stack.client.cumulative_spend == 0
    # the openai package is none of the above
    response = await stack.openai.chat.completions.create(model="fake-model", messages=QUESTION)
    assert response.choices[0].message.content == ANSWER


async def test_an_allowed_origin_gets_cors(stack: Stack) -> None:
    from aiohttp.test_utils import TestServer

    from client.gateway import create_app
    from tests.client.conftest import make_client

    client = make_client(stack.matcher_url, stack.state_path.with_name("o.json"), stack.spend_key)
    app = create_app(client, allow_origins=["http://localhost:3000/"], loopback_hosts_only=False)
    server = TestServer(app)
    await server.start_server()
    chat = str(server.make_url("/v1/chat/completions"))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.options(
                chat,
                headers={
                    "Origin": "http://localhost:3000",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            ) as resp:
                assert resp.status == 204
                assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
                assert "POST" in resp.headers["Access-Control-Allow-Methods"]
                assert resp.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
            async with session.post(
                chat, json=BODY, headers={"Origin": "http://localhost:3000"}
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
                assert (await resp.json())["choices"][0]["message"]["content"] == ANSWER
            async with session.post(  # errors carry it too, so the page can read them
                chat, data=b"{}", headers={"Origin": "http://localhost:3000"}
            ) as resp:
                assert resp.status == 415
                assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
            async with session.post(
                chat, json=BODY, headers={"Origin": "http://localhost:3001"}
            ) as resp:
                assert resp.status == 403
                assert "Access-Control-Allow-Origin" not in resp.headers
            # off loopback (with an API key, which commands.py requires) any Host is fine
            async with session.get(
                str(server.make_url("/v1/models")), headers={"Host": "gateway.lan:8900"}
            ) as resp:
                assert resp.status == 200
    finally:
        await server.close()


async def test_stream_options_need_stream(stack: Stack) -> None:
    for stream in (None, False):
        extra = {} if stream is None else {"stream": stream}
        with pytest.raises(openai.BadRequestError) as info:
            await stack.openai.chat.completions.create(
                model="fake-model",
                messages=QUESTION,
                stream_options={"include_usage": True},
                **extra,
            )
        assert info.value.param == "stream_options"
        assert "Stream options can only be defined when `stream=True`" in info.value.message
    with pytest.raises(openai.BadRequestError):
        await stack.openai.completions.create(
            model="fake-model", prompt="Hi", stream_options={"include_usage": False}
        )
    assert stack.matcher.relay_calls == 0


async def test_a_request_may_only_lower_the_gateways_caps(stack: Stack) -> None:
    caps = stack.client.caps
    for field, value in (
        ("imago_max_price_prompt", caps.prompt + 1),
        ("imago_max_price_completion", caps.completion * 10),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            await stack.openai.chat.completions.create(
                model="fake-model", messages=QUESTION, extra_body={field: value}
            )
        assert info.value.code == "price_cap_above_gateway"
        assert info.value.param == field
    assert stack.matcher.relay_calls == 0
    # at or below the gateway's caps, it is the request's own
    response = await stack.openai.chat.completions.create(
        model="fake-model",
        messages=QUESTION,
        extra_body={
            "imago_max_price_prompt": caps.prompt,
            "imago_max_price_completion": stack.nodes[0].offer.price_completion,
        },
    )
    assert response.choices[0].message.content == ANSWER
