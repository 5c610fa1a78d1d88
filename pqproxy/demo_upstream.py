"""A small OpenAI-compatible HTTP/1.1 server to put behind the proxy in demos and tests.

It stands in for a model server: keep-alive, the JSON shapes the ``openai`` client parses, and
SSE token streams at a fixed rate so streaming latency through the proxy can be seen.

    GET  /health               200 {"status": "ok"}
    GET  /v1/models            one model, "pqproxy-demo"
    POST /v1/chat/completions  a chat.completion; with "stream": true an SSE stream of
                               chat.completion.chunk events, ``token_interval`` seconds apart,
                               then ``data: [DONE]``
    POST /v1/completions       the same for text_completion (choices[0].text)
    POST /v1/embeddings        one deterministic unit vector per input (sha256 of the text)
    anything else              404 (405 for a known path with the wrong method)

A request's ``max_tokens`` (or ``max_completion_tokens``) overrides the configured number of
tokens. Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11

from .io.loop import ShutdownSignals

logger = logging.getLogger(__name__)

MODEL_ID = "pqproxy-demo"
# Request bodies above this are answered with 413 without being read.
MAX_BODY = 1 << 20
# h11 buffers an incomplete head up to this; beyond it the request is rejected (431).
MAX_HEAD = 16 * 1024
# A keep-alive connection with no new request for this long is closed.
KEEPALIVE_TIMEOUT = 30.0
# Bound on each read of a request in progress and on each write drain.
IO_TIMEOUT = 30.0
READ_SIZE = 65536
# How long shutdown waits for connections and the listening socket to close.
SHUTDOWN_TIMEOUT = 5.0
DEFAULT_TOKENS = 16
DEFAULT_TOKEN_INTERVAL = 0.02
# Upper bounds so a request cannot ask the demo to stream forever.
MAX_TOKENS = 100_000
# Embedding size unless the request asks for ``dimensions``; small, as the demo's vectors mean
# nothing, but large enough that two different texts never look alike.
EMBEDDING_DIMS = 64
MAX_EMBEDDING_DIMS = 4096
# Inputs per embeddings request (OpenAI's own limit).
MAX_EMBEDDING_INPUTS = 2048

_WORDS = ("post", "quantum", "hello", "from", "the", "pqproxy", "demo", "upstream")
_ROUTES: dict[str, tuple[str, ...]] = {
    "/health": ("GET",),
    "/v1/models": ("GET",),
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
    "/v1/embeddings": ("POST",),
}


@dataclass(frozen=True)
class DemoOptions:
    tokens: int = DEFAULT_TOKENS
    token_interval: float = DEFAULT_TOKEN_INTERVAL


class _Reject(Exception):
    """Ends a request with an error status, then the connection (the request itself could not
    be read, so nothing after it on the connection can be trusted)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _BadRequest(Exception):
    """A well-framed request the API refuses: answered, and the connection stays open."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def _token_text(i: int) -> str:
    return ("" if i == 0 else " ") + _WORDS[i % len(_WORDS)]


async def serve_demo_upstream(
    host: str,
    port: int,
    *,
    tokens: int = DEFAULT_TOKENS,
    token_interval: float = DEFAULT_TOKEN_INTERVAL,
    connections: set[asyncio.Task[None]] | None = None,
) -> asyncio.Server:
    """Start the demo server and return it (already serving). ``connections``, when given,
    holds the task of every open connection, for a shutdown that ends them cleanly."""
    if not 0 <= tokens <= MAX_TOKENS:
        raise ValueError(f"tokens must be between 0 and {MAX_TOKENS}")
    if token_interval < 0:
        raise ValueError("token_interval must not be negative")
    options = DemoOptions(tokens=tokens, token_interval=token_interval)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if connections is not None and task is not None:
            connections.add(task)
        try:
            await _serve_connection(reader, writer, options)
        finally:
            if connections is not None and task is not None:
                connections.discard(task)

    return await asyncio.start_server(handler, host, port, reuse_address=True)


async def run_demo_upstream(
    host: str,
    port: int,
    *,
    tokens: int = DEFAULT_TOKENS,
    token_interval: float = DEFAULT_TOKEN_INTERVAL,
    on_listening: Callable[[str, int], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (the ``demo-upstream`` subcommand)."""
    connections: set[asyncio.Task[None]] = set()
    with ShutdownSignals() as signals:
        server = await serve_demo_upstream(
            host, port, tokens=tokens, token_interval=token_interval, connections=connections
        )
        try:
            bound_port: int = server.sockets[0].getsockname()[1]
            if on_listening is not None:
                on_listening(host, bound_port)
            sig = await signals.wait()
            logger.info("received %s, stopping", sig.name)
        finally:
            await _close_server(server, connections)


async def _close_server(server: asyncio.Server, connections: set[asyncio.Task[None]]) -> None:
    server.close()
    # Keep-alive connections (a proxy's pool holds some) would otherwise still wait for a
    # request when the loop ends, and be destroyed mid-await.
    for task in list(connections):
        task.cancel()
    if connections:
        _done, pending = await asyncio.wait(connections, timeout=SHUTDOWN_TIMEOUT)
        if pending:
            logger.warning("demo upstream: %d connections still open at exit", len(pending))
    try:
        await asyncio.wait_for(server.wait_closed(), SHUTDOWN_TIMEOUT)
    except TimeoutError:
        logger.warning("demo upstream: listening socket not closed at exit")


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: DemoOptions
) -> None:
    peername = writer.get_extra_info("peername")
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    cancelled = False
    try:
        while True:
            try:
                keep_going = await _serve_one(conn, reader, writer, options)
            except _Reject as rej:
                logger.info("demo upstream peer=%s: %d %s", peername, rej.status, rej.message)
                await _send_error(conn, writer, rej.status, rej.message)
                return
            if not keep_going:
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    except (ConnectionError, TimeoutError) as exc:
        logger.debug("demo upstream peer=%s: %s", peername, exc or type(exc).__name__)
    except asyncio.CancelledError:
        # Shutdown: the connection just ends. Not re-raising finishes the task normally, so
        # asyncio's stream callback has no cancelled task to report as an error.
        logger.debug("demo upstream peer=%s: closed at shutdown", peername)
        cancelled = True
    except Exception as exc:
        logger.error("demo upstream peer=%s: %s: %s", peername, type(exc).__name__, exc)
    finally:
        if cancelled:
            writer.transport.abort()
        else:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT)
            except (ConnectionError, TimeoutError, asyncio.CancelledError):
                # Closed already; a shutdown cancelling this wait has nothing left to stop.
                pass


async def _next_event(
    conn: h11.Connection, reader: asyncio.StreamReader, timeout: float
) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            # h11's hint is already the right status (400, or 431 for an oversized head).
            raise _Reject(exc.error_status_hint, f"bad request: {exc}") from None
        if event is not h11.NEED_DATA:
            return event
        data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
        conn.receive_data(data)


async def _serve_one(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    options: DemoOptions,
) -> bool:
    """Serve one request; False when the connection should end."""
    try:
        event = await _next_event(conn, reader, KEEPALIVE_TIMEOUT)
    except TimeoutError:
        return False
    if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
        return False
    if not isinstance(event, h11.Request):
        raise _Reject(400, f"unexpected {type(event).__name__}")

    method = event.method.decode("ascii", "replace")
    target = event.target.decode("ascii", "replace")
    path = target.split("?", 1)[0]
    length = _content_length(event.headers)
    if length is not None and length > MAX_BODY:
        raise _Reject(413, f"body of {length} bytes exceeds {MAX_BODY}")
    body = await _read_body(conn, reader)

    try:
        await _route(conn, writer, method, path, body, options)
    except _BadRequest as exc:
        logger.info("demo upstream: %d %s %s: %s", exc.status, method, path, exc.message)
        await _send_json(conn, writer, exc.status, _error_body(exc.status, exc.message, exc.param))
    return True


async def _route(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    method: str,
    path: str,
    body: bytes,
    options: DemoOptions,
) -> None:
    allowed = _ROUTES.get(path)
    if allowed is None:
        raise _BadRequest(f"no route {method} {path}", status=404)
    if method not in allowed:
        message = f"{method} is not allowed on {path} (allowed: {', '.join(allowed)})"
        await _send_json(
            conn, writer, 405, _error_body(405, message), extra=[("allow", ", ".join(allowed))]
        )
        return
    if path == "/health":
        await _send_json(conn, writer, 200, {"status": "ok"})
    elif path == "/v1/models":
        await _send_json(conn, writer, 200, _models())
    elif path == "/v1/embeddings":
        await _send_json(conn, writer, 200, _embeddings(_parse_json(body)))
    else:
        chat = path == "/v1/chat/completions"
        request = _parse_json(body)
        completion = _Completion.from_request(request, options, chat=chat)
        if completion.stream:
            await _stream_completion(conn, writer, completion, options)
        else:
            await _send_json(conn, writer, 200, completion.whole())


def _content_length(headers: Any) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, reader, IO_TIMEOUT)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY:
                raise _Reject(413, f"body exceeds {MAX_BODY} bytes")
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:
            raise _Reject(400, f"unexpected {type(event).__name__} in body")


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _BadRequest("body is not a JSON object")
    return value


def _error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _models() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "pqproxy"}],
    }


def _word_count(value: object) -> int:
    """A stand-in for a tokenizer: whitespace-separated words of every string in ``value``."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_word_count(item) for item in value)
    if isinstance(value, dict):
        return sum(_word_count(item) for item in value.values())
    return 0


def _token_limit(request: dict[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = request.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
            raise _BadRequest(f"{key} must be a whole number from 0 to {MAX_TOKENS}", key)
        return value
    return default


def _model(request: dict[str, Any]) -> str:
    model = request.get("model")
    if model is None:
        return MODEL_ID
    if not isinstance(model, str) or not model:
        raise _BadRequest("model must be a non-empty string", "model")
    return model


@dataclass(frozen=True)
class _Completion:
    """One chat or text completion being answered: its ids and how many tokens it gets."""

    chat: bool
    stream: bool
    include_usage: bool
    model: str
    tokens: int
    prompt_tokens: int
    id: str
    created: int

    @classmethod
    def from_request(
        cls, request: dict[str, Any], options: DemoOptions, *, chat: bool
    ) -> _Completion:
        stream = request.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest("stream must be true or false", "stream")
        if chat:
            messages = request.get("messages", [])
            if not isinstance(messages, list):
                raise _BadRequest("messages must be a list", "messages")
            # What the model reads: the contents, not the roles.
            prompt: object = [m.get("content") for m in messages if isinstance(m, dict)]
        else:
            prompt = request.get("prompt", "")
            if not isinstance(prompt, str | list):
                raise _BadRequest("prompt must be a string or a list", "prompt")
        stream_options = request.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _BadRequest("stream_options must be an object", "stream_options")
        return cls(
            chat=chat,
            stream=stream,
            include_usage=stream_options.get("include_usage") is True,
            model=_model(request),
            tokens=_token_limit(request, options.tokens),
            prompt_tokens=_word_count(prompt),
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            created=int(time.time()),
        )

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens,
        }

    def whole(self) -> dict[str, Any]:
        text = "".join(_token_text(i) for i in range(self.tokens))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        }

    def chunk(self, index: int) -> dict[str, Any]:
        """The event for token ``index``; the last one carries finish_reason. With no tokens at
        all, one event with empty text ends the completion."""
        last = index >= self.tokens - 1
        text = _token_text(index) if index < self.tokens else ""
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "stop" if last else None,
            "logprobs": None,
        }
        if self.chat:
            delta: dict[str, str] = {"content": text}
            if index == 0:
                delta["role"] = "assistant"
            choice["delta"] = delta
        else:
            choice["text"] = text
        event: dict[str, Any] = {
            # OpenAI streams text completions with the same object name as the whole one.
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            event["usage"] = None
        return event

    def usage_chunk(self) -> dict[str, Any]:
        """With stream_options.include_usage: a last event with no choices and the usage."""
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(),
        }


async def _stream_completion(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    completion: _Completion,
    options: DemoOptions,
) -> None:
    headers = [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("transfer-encoding", "chunked"),
    ]
    await _send(conn, writer, _response(200, headers))
    for i in range(max(completion.tokens, 1)):
        if i and options.token_interval:
            # The pacing is the point: it makes per-token latency through the proxy visible.
            await asyncio.sleep(options.token_interval)
        # One event per write and drain: each token leaves as soon as it is "generated".
        await _send(conn, writer, h11.Data(data=_sse(completion.chunk(i))))
    if completion.include_usage:
        await _send(conn, writer, h11.Data(data=_sse(completion.usage_chunk())))
    await _send(conn, writer, h11.Data(data=b"data: [DONE]\n\n"))
    await _send(conn, writer, h11.EndOfMessage())


def _embeddings(request: dict[str, Any]) -> dict[str, Any]:
    raw = request.get("input")
    inputs: list[object]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        inputs = [raw]  # one input given as token ids
    elif isinstance(raw, list) and raw:
        inputs = list(raw)
    else:
        raise _BadRequest("input must be a string or a non-empty list", "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise _BadRequest(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", "input")
    for item in inputs:
        valid_tokens = isinstance(item, list) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in item
        )
        if not isinstance(item, str) and not valid_tokens:
            raise _BadRequest("each input must be a string or a list of token ids", "input")
    dims = request.get("dimensions", EMBEDDING_DIMS)
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= MAX_EMBEDDING_DIMS:
        raise _BadRequest(
            f"dimensions must be a whole number from 1 to {MAX_EMBEDDING_DIMS}", "dimensions"
        )
    encoding = request.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _BadRequest("encoding_format must be 'float' or 'base64'", "encoding_format")
    model = _model(request)
    data = []
    for index, item in enumerate(inputs):
        vector = embedding_vector(item if isinstance(item, str) else json.dumps(item), dims)
        encoded: list[float] | str = vector
        if encoding == "base64":
            # OpenAI's base64 form: little-endian float32, what the openai client asks for.
            encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    # Token ids count one each; text counts its words.
    prompt_tokens = sum(len(x) if isinstance(x, list) else _word_count(x) for x in inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def embedding_vector(text: str, dims: int = EMBEDDING_DIMS) -> list[float]:
    """A unit vector derived from sha256 of ``text``: the same text always gets the same
    vector, different texts almost surely different ones."""
    raw = bytearray()
    counter = 0
    while len(raw) < 2 * dims:
        raw += hashlib.sha256(counter.to_bytes(4, "big") + text.encode("utf-8")).digest()
        counter += 1
    # Each 16-bit word to [-1, 1]; never all zero (sha256 output is not), so it normalises.
    values = [
        (int.from_bytes(raw[2 * i : 2 * i + 2], "big") - 32767.5) / 32767.5 for i in range(dims)
    ]
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _response(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    # h11 sends an empty reason phrase unless given one; some clients show it.
    return h11.Response(
        status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode("ascii")
    )


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)


async def _send_json(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    payload: dict[str, Any],
    *,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    headers.extend(extra or [])
    await _send(conn, writer, _response(status, headers))
    await _send(conn, writer, h11.Data(data=body))
    await _send(conn, writer, h11.EndOfMessage())


async def _send_error(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, message: str
) -> None:
    if conn.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
        return
    body = json.dumps(_error_body(status, message)).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    try:
        await _send(conn, writer, _response(status, headers))
        await _send(conn, writer, h11.Data(data=body))
        await _send(conn, writer, h11.EndOfMessage())
    except h11.LocalProtocolError as exc:
        logger.debug("demo upstream: could not send %d: %s", status, exc)
