"""The demo upstream over real sockets: http.client for the wire format, and the ``openai``
client for what matters to a user, that its parser accepts every answer.

Each server runs on its own event loop in a thread, so the blocking clients can talk to it."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import math
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import openai
import pytest

from pqproxy.demo_upstream import EMBEDDING_DIMS, MAX_BODY, embedding_vector, serve_demo_upstream

# Upper bound for any single wait; far above what a healthy run needs.
WAIT = 10.0
TOKENS = 6


class DemoServer:
    """``serve_demo_upstream`` on a private loop in a daemon thread."""

    def __init__(self, tokens: int, token_interval: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(
            serve_demo_upstream("127.0.0.1", 0, tokens=tokens, token_interval=token_interval),
            self.loop,
        )
        self.server = future.result(WAIT)
        self.port: int = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            await self.server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoServer]:
    server = DemoServer(tokens=TOKENS, token_interval=0.0)
    yield server
    server.close()


@pytest.fixture(scope="module")
def slow_demo() -> Iterator[DemoServer]:
    server = DemoServer(tokens=4, token_interval=0.2)
    yield server
    server.close()


def connect(server: DemoServer) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)


def request(
    conn: http.client.HTTPConnection, method: str, path: str, body: object = None
) -> tuple[http.client.HTTPResponse, bytes]:
    payload = json.dumps(body) if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, payload, headers)
    response = conn.getresponse()
    return response, response.read()


def sse_events(raw: bytes) -> list[bytes]:
    """The data of each event; every event must be exactly ``data: ...\\n\\n``."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), raw
    return [e[len(b"data: ") :] for e in events]


def test_health_and_models_with_reason_phrases(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        response, body = request(conn, "GET", "/health")
        assert (response.status, response.reason) == (200, "OK")
        assert body == b'{"status":"ok"}'
        # Same connection: keep-alive.
        response, body = request(conn, "GET", "/v1/models")
        assert (response.status, response.reason) == (200, "OK")
        assert response.getheader("content-type") == "application/json"
        models = json.loads(body)
        assert models["object"] == "list"
        assert [(m["id"], m["object"]) for m in models["data"]] == [("pqproxy-demo", "model")]
    finally:
        conn.close()


def test_unknown_path_and_wrong_method(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        response, body = request(conn, "GET", "/v2/nothing")
        assert (response.status, response.reason) == (404, "Not Found")
        error = json.loads(body)["error"]
        assert "/v2/nothing" in error["message"] and error["type"] == "invalid_request_error"
        response, body = request(conn, "GET", "/v1/chat/completions")
        assert (response.status, response.reason) == (405, "Method Not Allowed")
        assert response.getheader("allow") == "POST"
        # Errors of a well-framed request keep the connection.
        response, _ = request(conn, "GET", "/health")
        assert response.status == 200
    finally:
        conn.close()


def test_chat_completion_whole(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        messages = [{"role": "user", "content": "three words here"}]
        response, body = request(
            conn, "POST", "/v1/chat/completions", {"model": "m1", "messages": messages}
        )
    finally:
        conn.close()
    assert response.status == 200
    completion = json.loads(body)
    assert completion["object"] == "chat.completion"
    assert completion["id"].startswith("chatcmpl-")
    assert completion["model"] == "m1"
    choice = completion["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == TOKENS
    assert choice["finish_reason"] == "stop"
    assert completion["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": TOKENS,
        "total_tokens": 3 + TOKENS,
    }


def test_chat_completion_stream(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        response, body = request(
            conn, "POST", "/v1/chat/completions", {"stream": True, "messages": []}
        )
    finally:
        conn.close()
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream"
    assert response.getheader("transfer-encoding") == "chunked"
    events = sse_events(body)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == TOKENS
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (TOKENS - 1) + ["stop"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert len(text.split()) == TOKENS


def test_max_tokens_overrides_and_usage_chunk(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        body = {
            "stream": True,
            "max_tokens": 3,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}],
        }
        _, raw = request(conn, "POST", "/v1/chat/completions", body)
        events = sse_events(raw)
        _, whole = request(conn, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
    finally:
        conn.close()
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 3 + 1
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
    assert len(json.loads(whole)["choices"][0]["text"].split()) == 2


def test_zero_tokens_still_ends_the_stream(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        _, raw = request(conn, "POST", "/v1/completions", {"stream": True, "max_tokens": 0})
    finally:
        conn.close()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    (chunk,) = [json.loads(e) for e in events[:-1]]
    assert chunk["choices"][0] == {
        "index": 0,
        "finish_reason": "stop",
        "logprobs": None,
        "text": "",
    }


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {"stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/embeddings", {"input": 5}, "input"),
        ("/v1/embeddings", {"input": "x", "dimensions": 0}, "dimensions"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_bad_requests_are_400_and_keep_the_connection(
    demo: DemoServer, path: str, body: dict[str, Any], param: str
) -> None:
    conn = connect(demo)
    try:
        response, raw = request(conn, "POST", path, body)
        assert (response.status, response.reason) == (400, "Bad Request")
        error = json.loads(raw)["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"
        response, _ = request(conn, "GET", "/health")
        assert response.status == 200
    finally:
        conn.close()


def test_body_not_json_is_400(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        conn.request("POST", "/v1/completions", b"{nope", {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 400
        assert "not JSON" in json.loads(response.read())["error"]["message"]
    finally:
        conn.close()


def test_announced_body_too_large_is_413_and_closes(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Length", str(MAX_BODY + 1))
        conn.endheaders()
        response = conn.getresponse()
        assert (response.status, response.reason) == (413, HTTPStatus(413).phrase)
        assert response.getheader("connection") == "close"
        response.read()
    finally:
        conn.close()


def test_text_completion_whole_and_stream(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        _, whole = request(conn, "POST", "/v1/completions", {"prompt": "once upon"})
        _, streamed = request(conn, "POST", "/v1/completions", {"prompt": ["a"], "stream": True})
    finally:
        conn.close()
    completion = json.loads(whole)
    assert completion["object"] == "text_completion"
    assert completion["id"].startswith("cmpl-")
    assert len(completion["choices"][0]["text"].split()) == TOKENS
    assert completion["usage"]["prompt_tokens"] == 2
    events = sse_events(streamed)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == b"[DONE]" and len(chunks) == TOKENS
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == completion["choices"][0]["text"]


def test_embeddings_are_deterministic_unit_vectors(demo: DemoServer) -> None:
    conn = connect(demo)
    try:
        _, one = request(conn, "POST", "/v1/embeddings", {"input": "hello world"})
        _, many = request(conn, "POST", "/v1/embeddings", {"input": ["hello world", "other"]})
        _, packed = request(
            conn,
            "POST",
            "/v1/embeddings",
            {"input": "hello world", "encoding_format": "base64", "dimensions": 8},
        )
    finally:
        conn.close()
    single = json.loads(one)
    assert single["object"] == "list"
    assert single["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    (entry,) = single["data"]
    vector = entry["embedding"]
    assert entry["object"] == "embedding" and entry["index"] == 0
    assert len(vector) == EMBEDDING_DIMS
    assert math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-9)
    assert vector == embedding_vector("hello world")

    pair = json.loads(many)["data"]
    assert [d["index"] for d in pair] == [0, 1]
    assert pair[0]["embedding"] == vector  # the same text, the same vector
    assert pair[1]["embedding"] != vector

    (packed_entry,) = json.loads(packed)["data"]
    floats = struct.unpack("<8f", base64.b64decode(packed_entry["embedding"]))
    expected = embedding_vector("hello world", 8)
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(floats, expected, strict=True))


def test_stream_events_leave_one_by_one(slow_demo: DemoServer) -> None:
    """The first event arrives while the rest are still being produced: each event is written
    and flushed by itself, not buffered to the end."""
    body = b'{"stream": true}'
    with socket.create_connection(("127.0.0.1", slow_demo.port), timeout=WAIT) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(65536)
            assert chunk, f"closed before the first event: {received!r}"
            received += chunk
        first_at = time.monotonic()
        while chunk:
            chunk = sock.recv(65536)
            received += chunk
        done_at = time.monotonic()
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.count(b"data: ") == 4 + 1
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    # Three intervals of 0.2 s separate the first token from the last.
    assert done_at - first_at >= 3 * 0.2 * 0.9


def openai_client(server: DemoServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1",
        api_key="test-key",
        max_retries=0,
        timeout=WAIT,
    )


def test_openai_client_parses_every_endpoint(demo: DemoServer) -> None:
    client = openai_client(demo)
    try:
        assert [m.id for m in client.models.list()] == ["pqproxy-demo"]

        chat = client.chat.completions.create(
            model="pqproxy-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content is not None
        assert len(chat.choices[0].message.content.split()) == 4
        assert chat.usage is not None and chat.usage.completion_tokens == 4

        stream = client.chat.completions.create(
            model="pqproxy-demo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == chat_text(TOKENS)

        text = client.completions.create(model="pqproxy-demo", prompt="hi", max_tokens=2)
        assert text.choices[0].text == chat_text(2)
        text_stream = client.completions.create(
            model="pqproxy-demo", prompt="hi", max_tokens=3, stream=True
        )
        assert "".join(c.choices[0].text for c in text_stream) == chat_text(3)

        # The client asks for base64 unless told otherwise, and decodes it itself.
        embedding = client.embeddings.create(model="pqproxy-demo", input=["a", "b"])
        assert [d.index for d in embedding.data] == [0, 1]
        assert all(len(d.embedding) == EMBEDDING_DIMS for d in embedding.data)
        expected = embedding_vector("a")
        assert all(
            math.isclose(x, y, rel_tol=1e-6)
            for x, y in zip(embedding.data[0].embedding, expected, strict=True)
        )
    finally:
        client.close()


def chat_text(tokens: int) -> str:
    words = ("post", "quantum", "hello", "from", "the", "pqproxy", "demo", "upstream")
    return " ".join(words[i % len(words)] for i in range(tokens))
