"""RFC 9110/9112 conformance of the http mode, one regression per item of issue 13 (9-16, 18).

Every test goes through a real ``TLSListener`` in http mode (stdlib ``ssl`` client writing raw
request bytes) to a raw origin: an asyncio server that records every byte it received on each
connection and answers with raw bytes the test wrote, so a malformed response (a 204 with a
body, ``Transfer-Encoding: gzip``) reaches the proxy exactly as written. The origin parses what
it received with h11 only to find where a request ends.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import pytest_asyncio

from pqproxy.config import ConfigError, parse_config
from pqproxy.io.http_proxy import HttpSettings
from pqproxy.io.supervisor import http_settings
from pqproxy.relay.request import HeaderLimits
from tests.unit import test_http_proxy as base
from tests.unit.test_http_proxy import (
    LAST_CHUNK,
    WAIT,
    Client,
    Connect,
    ProxyFactory,
    assert_json_error,
    chunk,
    http_request,
    within,
)

# The proxy, client and loop-error fixtures of the http-mode suite, shared by name.
certified = base.certified
client_ctx = base.client_ctx
connect = base.connect
loop_errors = base.loop_errors
make_proxy = base.make_proxy

pytestmark = pytest.mark.asyncio


# -- the raw origin ----------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the origin received it: the exact head bytes, and the parsed request."""

    conn_id: int
    head: bytes
    request: h11.Request
    body: bytes = b""

    @property
    def target(self) -> bytes:
        return self.request.target

    def values(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [value for field_name, value in self.request.headers if field_name == key]


# What the origin answers: raw response bytes, and whether to close after them.
Answer = Callable[[Seen], Awaitable[tuple[bytes, bool]]]


def raw_response(
    status: int = 200, body: bytes = b"ok", *headers: tuple[str, str], length: bool = True
) -> bytes:
    lines = [f"HTTP/1.1 {status} X"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def answer_ok(seen: Seen) -> tuple[bytes, bool]:
    return raw_response(200, b"ok:" + seen.body), False


class RawOrigin:
    def __init__(self, answer: Answer = answer_ok, interim: bytes = b"") -> None:
        self.answer = answer
        # Sent as soon as a request head arrives, before its body is read (a 100 Continue).
        self.interim = interim
        self.raw: list[bytearray] = []
        self.requests: list[Seen] = []
        self.head_seen: asyncio.Queue[Seen] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    @property
    def connections(self) -> int:
        return len(self.raw)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._spawn, "127.0.0.1", 0)

    def _spawn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = bytearray()
        self.raw.append(raw)
        conn_id = len(self.raw)
        parser = h11.Connection(h11.SERVER)
        seen: Seen | None = None
        consumed = 0
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    raw += data
                    parser.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    unparsed = len(parser.trailing_data[0])
                    head_end = len(raw) - unparsed
                    seen = Seen(conn_id, bytes(raw[consumed:head_end]), event)
                    self.requests.append(seen)
                    self.head_seen.put_nowait(seen)
                    if self.interim:
                        writer.write(self.interim)
                elif isinstance(event, h11.Data):
                    assert seen is not None
                    seen.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    assert seen is not None
                    response, close = await self.answer(seen)
                    writer.write(response)
                    await writer.drain()
                    if close:
                        return
                    # The origin answers with raw bytes, so its h11 never reaches DONE: a
                    # fresh parser takes the bytes after this request.
                    leftover = parser.trailing_data[0]
                    parser = h11.Connection(h11.SERVER)
                    if leftover:  # b"" would mean EOF to h11
                        parser.receive_data(leftover)
                    consumed = len(raw) - len(leftover)
                    seen = None
                else:
                    return
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=WAIT)
        if self.server is not None:
            await within(self.server.wait_closed())


OriginFactory = Callable[..., Awaitable[RawOrigin]]


@pytest_asyncio.fixture
async def make_origin() -> AsyncIterator[OriginFactory]:
    started: list[RawOrigin] = []

    async def make(answer: Answer = answer_ok, interim: bytes = b"") -> RawOrigin:
        origin = RawOrigin(answer, interim)
        await origin.start()
        started.append(origin)
        return origin

    yield make
    for origin in started:
        await origin.close()


@dataclass
class Setup:
    origin: RawOrigin
    port: int
    connect: Connect
    settings: HttpSettings = field(default_factory=HttpSettings)

    async def client(self) -> Client:
        return await self.connect(self.port)

    async def one(self, data: bytes) -> tuple[int, Client, Any]:
        client = await self.client()
        response = await client.request(data)
        return response.status, client, response


@pytest_asyncio.fixture
async def setup(make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect) -> Setup:
    origin = await make_origin()
    proxy = await make_proxy(origin.port)
    return Setup(origin, proxy.port, connect)


async def refused(setup: Setup, data: bytes, status: int) -> Any:
    """The proxy answers ``status`` itself, closes, and the origin never hears of it."""
    client = await setup.client()
    response = await client.request(data)
    assert_json_error(response, status)
    assert await client.read_until_closed() == b""
    assert setup.origin.requests == []
    return response


def request_line(line: str, *headers: str, body: bytes = b"") -> bytes:
    """A raw request: ``line`` (method, target, version) and header lines, exactly as given."""
    return ("\r\n".join([line, *headers]) + "\r\n\r\n").encode("latin-1") + body


# -- item 9: Host ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host_lines",
    [
        ["Host: a b/c"],
        ["Host: a.test, b.test"],
        ["Host: a.test,b.test"],
        ["Host:"],
        ["Host: user:pw@x"],
        ["Host: a.test:65536"],
        ["Host: a.test:8x"],
        ["Host: [::1"],
        ["Host: [not-ipv6]"],
        ["Host: a.test", "Host: a.test"],
        ["Host: a.test", "Host: b.test"],
    ],
    ids=lambda lines: "|".join(lines),
)
async def test_item9_invalid_host_is_400(setup: Setup, host_lines: list[str]) -> None:
    await refused(setup, request_line("GET /v1/models HTTP/1.1", *host_lines), 400)


@pytest.mark.parametrize(
    "host", ["api.test", "API.test:8443", "127.0.0.1", "[::1]:443", "a.test:", "x%41.test"]
)
async def test_item9_valid_host_is_forwarded(setup: Setup, host: str) -> None:
    status, _, _ = await setup.one(request_line("GET / HTTP/1.1", f"Host: {host}"))
    assert status == 200
    (seen,) = setup.origin.requests
    assert seen.values("host") == [host.encode()]
    assert seen.values("x-forwarded-host") == [host.encode()]


# -- item 10: HTTP/1.0 without Host ------------------------------------------------------------


async def test_item10_http10_without_host_is_forwarded_with_the_sni(setup: Setup) -> None:
    client = await setup.client()
    await client.send(b"GET /v1/models HTTP/1.0\r\n\r\n")
    response = await client.response()
    assert response.status == 200 and response.body == b"ok:"
    (seen,) = setup.origin.requests
    # The client connected with SNI "localhost": that is the authority it asked for.
    assert seen.values("host") == [b"localhost"]
    assert seen.values("x-forwarded-host") == []


async def test_item10_http10_without_host_or_sni_gets_the_upstream_authority(
    setup: Setup, client_ctx: ssl.SSLContext
) -> None:
    client_ctx.check_hostname = False
    reader, writer = await within(asyncio.open_connection("127.0.0.1", setup.port, ssl=client_ctx))
    client = Client(reader, writer)
    try:
        response = await client.request(b"GET / HTTP/1.0\r\n\r\n")
        assert response.status == 200
    finally:
        await client.close()
    (seen,) = setup.origin.requests
    assert seen.values("host") == [f"127.0.0.1:{setup.origin.port}".encode()]


# -- item 11: absolute-form --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "forwarded", "host"),
    [
        ("http://other.test/abs?q=1", b"/abs?q=1", b"other.test"),
        ("HTTPS://Other.Test:8443", b"/", b"Other.Test:8443"),
        ("http://[::1]:80/x", b"/x", b"[::1]:80"),
        ("http://other.test?q", b"/?q", b"other.test"),
    ],
)
async def test_item11_absolute_form_is_rewritten_to_origin_form(
    setup: Setup, target: str, forwarded: bytes, host: bytes
) -> None:
    status, _, _ = await setup.one(request_line(f"GET {target} HTTP/1.1", "Host: api.test"))
    assert status == 200
    (seen,) = setup.origin.requests
    assert seen.target == forwarded
    # RFC 9112 §3.2.2: Host is replaced by the target's authority, never the client's kept.
    assert seen.values("host") == [host]
    assert seen.values("x-forwarded-host") == [host]
    assert b"api.test" not in seen.head


@pytest.mark.parametrize(
    "target",
    [
        "http://user:pw@other.test/abs",
        "http://@other.test/",
        "ftp://other.test/x",
        "http:/other.test/x",
        "http:///x",
        "http://a b/",
        "http://other.test:99999/",
    ],
)
async def test_item11_bad_absolute_form_is_400(setup: Setup, target: str) -> None:
    response = await refused(setup, request_line(f"GET {target} HTTP/1.1", "Host: api.test"), 400)
    # The userinfo is never echoed back.
    assert b"pw" not in response.body


# -- item 12: target forms per method, dot segments --------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "*",
        "other.test:443",
        "foo/bar",
        "/a/../../etc/passwd",
        "/..",
        "/a/%2e%2e/%2E%2E/etc/passwd",
        "/a/.%2E/..;/etc",
        "/a//../../etc",
        "/a/..%2f..%2fetc",
        "/a/..\\..\\etc",
        "/a/b/../../../?x=/",
    ],
)
async def test_item12_bad_target_is_400(setup: Setup, target: str) -> None:
    await refused(setup, request_line(f"GET {target} HTTP/1.1", "Host: api.test"), 400)


async def test_item12_connect_is_405_with_allow(setup: Setup) -> None:
    response = await refused(
        setup, request_line("CONNECT other.test:443 HTTP/1.1", "Host: other.test:443"), 405
    )
    (allow,) = response.values("allow")
    methods = {m.strip() for m in allow.split(b",")}
    assert {b"GET", b"POST", b"OPTIONS"} <= methods and b"CONNECT" not in methods


@pytest.mark.parametrize(
    ("line", "forwarded"),
    [
        ("OPTIONS * HTTP/1.1", b"*"),
        # The original target is forwarded, dot segments and all (see relay/request.py, check_path).
        ("GET /a/./b/../c?p=../../x HTTP/1.1", b"/a/./b/../c?p=../../x"),
        ("GET /a/b/.. HTTP/1.1", b"/a/b/.."),
        ("GET /%2e%2e.txt HTTP/1.1", b"/%2e%2e.txt"),
    ],
)
async def test_item12_valid_targets_are_forwarded_verbatim(
    setup: Setup, line: str, forwarded: bytes
) -> None:
    status, _, _ = await setup.one(request_line(line, "Host: api.test"))
    assert status == 200
    assert [seen.target for seen in setup.origin.requests] == [forwarded]


# -- item 13: HTTP/1.0 and 1xx, 100 Continue after a short wait --------------------------------

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def test_item13_http10_gets_no_1xx_and_expect_is_not_forwarded(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    origin = await make_origin(interim=CONTINUE + b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n")
    proxy = await make_proxy(origin.port)
    client = await connect(proxy.port)
    await client.send(
        request_line(
            "POST /up HTTP/1.0",
            "Host: api.test",
            "Expect: 100-continue",
            "Content-Length: 5",
            body=b"hello",
        )
    )
    wire = await client.read_until_closed()
    assert wire.startswith(b"HTTP/1.1 200 "), wire[:40]
    assert b" 100 " not in wire and b" 103 " not in wire
    (seen,) = origin.requests
    assert seen.values("expect") == [] and seen.body == b"hello"


async def test_item13_proxy_sends_100_continue_when_the_origin_does_not(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    origin = await make_origin()
    proxy = await make_proxy(origin.port, http=HttpSettings(expect_continue_wait=0.2))
    client = await connect(proxy.port)
    await client.send(
        request_line(
            "POST /up HTTP/1.1", "Host: api.test", "Expect: 100-continue", "Content-Length: 5"
        )
    )
    seen = await within(origin.head_seen.get())
    assert seen.values("expect") == [b"100-continue"]
    interim = await client.next_event()
    assert isinstance(interim, h11.InformationalResponse) and interim.status_code == 100
    await client.send(b"hello")
    response = await client.response()
    assert response.status == 200 and response.body == b"ok:hello"


async def test_item13_origin_100_is_relayed_once(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    origin = await make_origin(interim=CONTINUE + CONTINUE)
    proxy = await make_proxy(origin.port)
    client = await connect(proxy.port)
    await client.send(
        request_line(
            "POST /up HTTP/1.1", "Host: api.test", "Expect: 100-continue", "Content-Length: 5"
        )
    )
    interim = await client.next_event()
    assert isinstance(interim, h11.InformationalResponse) and interim.status_code == 100
    await client.send(b"hello")
    final = await client.next_event()
    # The second 100 answers nothing the client still waits for: not relayed.
    assert isinstance(final, h11.Response) and final.status_code == 200


# -- item 14: control characters ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["a\x01b", "a\x1fb", "a\x7fb", "\x08", "a\x1b[31mred"])
async def test_item14_control_characters_in_values_are_400(setup: Setup, value: str) -> None:
    await refused(setup, request_line("GET / HTTP/1.1", "Host: api.test", f"X-V: {value}"), 400)


async def test_item14_htab_and_obs_text_are_forwarded(setup: Setup) -> None:
    status, _, _ = await setup.one(
        request_line("GET / HTTP/1.1", "Host: api.test", "X-V: a\tb \xe9")
    )
    assert status == 200
    assert setup.origin.requests[0].values("x-v") == [b"a\tb \xe9"]


# -- item 15: status codes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("coding", "status"),
    [
        ("foo, chunked", 501),
        ("foo", 501),
        ("gzip, chunked", 501),
        ("chunked;ext=1", 501),
        # Smuggling safety first: chunked not final, or twice, stays 400 (RFC 9112 §6.3).
        ("chunked, gzip", 400),
        ("gzip", 400),
        ("chunked, chunked", 400),
        (",", 400),
    ],
)
async def test_item15_transfer_coding_status(setup: Setup, coding: str, status: int) -> None:
    data = request_line(
        "POST / HTTP/1.1", "Host: api.test", f"Transfer-Encoding: {coding}", body=LAST_CHUNK
    )
    await refused(setup, data, status)


@pytest.mark.parametrize(
    "te_lines",
    [
        ["Transfer-Encoding: chunked, ,"],
        ["Transfer-Encoding: , chunked"],
        ["Transfer-Encoding: ,,CHUNKED ,"],
        ["Transfer-Encoding:", "Transfer-Encoding: chunked"],
    ],
)
async def test_item15_empty_transfer_coding_elements_are_ignored(
    setup: Setup, te_lines: list[str]
) -> None:
    data = request_line("POST /c HTTP/1.1", "Host: api.test", *te_lines, body=chunk(b"abc"))
    client = await setup.client()
    await client.send(data + LAST_CHUNK + http_request("GET", "/next"))
    first = await client.response()
    second = await client.response()
    assert (first.status, first.body) == (200, b"ok:abc")
    assert second.status == 200
    seen = setup.origin.requests
    assert [s.target for s in seen] == [b"/c", b"/next"]
    assert seen[0].values("transfer-encoding") == [b"chunked"] and seen[0].body == b"abc"


async def test_item15_chunked_with_content_length_stays_400(setup: Setup) -> None:
    data = request_line(
        "POST / HTTP/1.1",
        "Host: api.test",
        "Transfer-Encoding: chunked, ,",
        "Content-Length: 5",
        body=LAST_CHUNK,
    )
    await refused(setup, data, 400)


async def test_item15_http_1_2_is_handled_as_1_1(setup: Setup) -> None:
    client = await setup.client()
    await client.send(request_line("GET /v HTTP/1.2", "Host: api.test") + http_request("GET", "/w"))
    assert (await client.response()).status == 200
    assert (await client.response()).status == 200  # kept alive, like 1.1
    assert [s.target for s in setup.origin.requests] == [b"/v", b"/w"]
    assert setup.origin.requests[0].values("via") == [b"1.1 pqproxy"]


async def test_item15_http_1_2_without_host_is_400(setup: Setup) -> None:
    await refused(setup, request_line("GET / HTTP/1.2"), 400)


@pytest.mark.parametrize("split", [False, True])
async def test_item15_long_target_is_414(setup: Setup, split: bool) -> None:
    target = "/" + "a" * (HeaderLimits().max_target_bytes + (200 if split else 1))
    data = request_line(f"GET {target} HTTP/1.1", "Host: api.test")
    if split:
        # The request line alone is past the limit before the head is complete: 414 at once.
        client = await setup.client()
        await client.send(data[: len(target) + 4])
        response = await client.response()
        assert_json_error(response, 414)
        assert setup.origin.requests == []
    else:
        await refused(setup, data, 414)


async def test_item15_target_over_the_head_cap_is_414_not_431(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    origin = await make_origin()
    proxy = await make_proxy(origin.port, http=HttpSettings(max_header_bytes=1024))
    client = await connect(proxy.port)
    await client.send(b"GET /" + b"a" * 2000)
    assert_json_error(await client.response(), 414)


async def test_item15_header_count_cap_is_configurable(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    origin = await make_origin()
    proxy = await make_proxy(origin.port, http=HttpSettings(max_header_count=4))
    client = await connect(proxy.port)
    ok = await client.request(request_line("GET / HTTP/1.1", "Host: a", "A: 1", "B: 2", "C: 3"))
    assert ok.status == 200
    too_many = await client.request(
        request_line("GET / HTTP/1.1", "Host: a", "A: 1", "B: 2", "C: 3", "D: 4")
    )
    assert_json_error(too_many, 431)
    assert len(origin.requests) == 1


def listener_config(limits: dict[str, Any] | None = None) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": "api",
        "listen": "127.0.0.1:8443",
        "upstream": "default",
        "tls": {"certificates": [{"cert": "c.pem", "key": "k.pem"}]},
    }
    if limits is not None:
        listener["limits"] = limits
    return {
        "listeners": [listener],
        "upstreams": {"default": {"servers": ["http://127.0.0.1:8000"]}},
    }


async def test_item15_item18_limits_config_keys(tmp_path: Path) -> None:
    data = listener_config({"max_header_count": 50, "request_buffering": "64KiB"})
    config = parse_config(data, tmp_path, "test.yaml", check_files=False)
    listener = config.listeners[0]
    assert listener.limits.max_header_count == 50
    assert listener.limits.request_buffering == 64 * 1024
    settings = http_settings(listener, config.upstream("default"))
    assert settings.max_header_count == 50 and settings.request_buffering == 64 * 1024

    defaults = parse_config(listener_config(), tmp_path, "t.yaml", check_files=False).listeners[0]
    assert defaults.limits.max_header_count == 100
    assert defaults.limits.request_buffering == 0

    for key, value, message in [
        ("max_header_count", 0, "0 is too small (minimum 1)"),
        ("request_buffering", "1XB", "'1XB' is not a size"),
        ("request_buffering", "200MiB", "larger than max_body_bytes"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(listener_config({key: value}), tmp_path, "t.yaml", check_files=False)
        assert f"listeners[0].limits.{key}" in str(info.value), str(info.value)
        assert message in str(info.value), str(info.value)


# -- item 16: response side --------------------------------------------------------------------


async def test_item16_204_content_length_and_body_are_dropped(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    async def answer(seen: Seen) -> tuple[bytes, bool]:
        if seen.target == b"/204":
            # A body that, were the connection reused, would be read as the next response.
            bogus = raw_response(200, b"SMUGGLED")
            return raw_response(204, bogus, ("X-A", "1")), False
        return raw_response(200, b"real"), False

    origin = await make_origin(answer)
    proxy = await make_proxy(origin.port)
    client = await connect(proxy.port)
    first = await client.request(http_request("GET", "/204"))
    assert first.status == 204 and first.body == b""
    # RFC 9110 §8.6: a server MUST NOT send Content-Length in a 204.
    assert first.values("content-length") == [] and first.values("x-a") == [b"1"]
    second = await client.request(http_request("GET", "/next"))
    assert (second.status, second.body) == (200, b"real")
    # The connection that carried the stray body was not reused.
    assert origin.connections == 2


async def test_item16_304_keeps_its_content_length_and_drops_a_body(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    async def answer(seen: Seen) -> tuple[bytes, bool]:
        if seen.target == b"/304":
            head = b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nTransfer-Encoding: chunked\r\n'
            return head + b"Content-Length: 1234\r\n\r\n5\r\nhello\r\n0\r\n\r\n", False
        return raw_response(200, b"real"), False

    origin = await make_origin(answer)
    proxy = await make_proxy(origin.port)
    client = await connect(proxy.port)
    first = await client.request(http_request("GET", "/304"))
    assert first.status == 304 and first.body == b""
    # RFC 9110 §8.6 lets a 304 say how long the 200 would have been; its framing is dropped.
    assert first.values("content-length") == [b"1234"]
    assert first.values("transfer-encoding") == []
    second = await client.request(http_request("GET", "/next"))
    assert (second.status, second.body) == (200, b"real")
    assert origin.connections == 2


BODY = b"The quick brown fox jumps over the lazy dog. " * 200


@pytest.mark.parametrize(
    ("coding", "payload", "framing"),
    [
        ("gzip", gzip.compress(BODY), "close"),
        ("x-gzip", gzip.compress(BODY), "close"),
        ("deflate", zlib.compress(BODY), "close"),
        ("gzip, chunked", gzip.compress(BODY), "chunked"),
        ("gzip", gzip.compress(BODY[:100]) + gzip.compress(BODY[100:]), "close"),
    ],
    ids=["gzip", "x-gzip", "deflate", "gzip-chunked", "gzip-two-members"],
)
@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_item16_transfer_coded_response_is_decoded_and_relayed(
    make_proxy: ProxyFactory,
    make_origin: OriginFactory,
    connect: Connect,
    coding: str,
    payload: bytes,
    framing: str,
    version: str,
) -> None:
    async def answer(seen: Seen) -> tuple[bytes, bool]:
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: {coding}\r\n"
        if framing == "close":
            # RFC 9112 §6.3 (4): no final chunked, so the body ends when the connection does.
            return head.encode() + b"Content-Length: 3\r\n\r\n" + payload, True
        body = b"".join(chunk(payload[i : i + 500]) for i in range(0, len(payload), 500))
        return head.encode() + b"\r\n" + body + LAST_CHUNK, False

    origin = await make_origin(answer)
    proxy = await make_proxy(origin.port)
    client = await connect(proxy.port)
    await client.send(request_line(f"GET /z HTTP/{version}", "Host: api.test"))
    wire = await client.read_until_closed() if version == "1.0" else b""
    if version == "1.1":
        response = await client.response()
        assert response.status == 200 and response.body == BODY
        assert response.values("transfer-encoding") == [b"chunked"]
        assert response.values("content-length") == []
        assert (await client.request(http_request("GET", "/again"))).status == 200
    else:
        head, _, body = wire.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
        assert body == BODY


@pytest.mark.parametrize(
    "coding", ["compress", "br, chunked", "chunked, gzip", "gzip, gzip", "chunked, chunked"]
)
async def test_item16_undecodable_transfer_coding_is_502(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect, coding: str
) -> None:
    async def answer(seen: Seen) -> tuple[bytes, bool]:
        head = f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n"
        return head.encode() + b"0\r\n\r\n", True

    origin = await make_origin(answer)
    proxy = await make_proxy(origin.port)
    client = await connect(proxy.port)
    assert_json_error(await client.request(http_request("GET", "/z")), 502)


async def test_item16_corrupt_gzip_cuts_the_stream(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    async def answer(seen: Seen) -> tuple[bytes, bool]:
        payload = gzip.compress(BODY)[:-20]  # truncated: the gzip trailer never arrives
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + payload, True

    origin = await make_origin(answer)
    proxy = await make_proxy(origin.port)
    client = await connect(proxy.port)
    await client.send(http_request("GET", "/z"))
    head = await client.next_event()
    assert isinstance(head, h11.Response) and head.status_code == 200
    with pytest.raises(h11.RemoteProtocolError):
        while True:
            event = await client.next_event()
            assert not isinstance(event, h11.EndOfMessage), "a truncated body looked complete"


# -- item 18: request buffering ----------------------------------------------------------------

BAD_CHUNKED = b"5\r\nhello\r\nZZ\r\nbad\r\n0\r\n\r\n"


async def test_item18_without_buffering_the_origin_sees_a_malformed_body_start(
    setup: Setup,
) -> None:
    """The baseline the option exists for: streaming sends the head before the body is read."""
    client = await setup.client()
    await client.send(
        request_line("POST /m HTTP/1.1", "Host: api.test", "Transfer-Encoding: chunked")
        + BAD_CHUNKED
    )
    response = await client.response()
    assert_json_error(response, 400)
    assert [s.target for s in setup.origin.requests] == [b"/m"]


async def test_item18_buffered_malformed_body_never_reaches_the_origin(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    origin = await make_origin()
    proxy = await make_proxy(origin.port, http=HttpSettings(request_buffering=1024))
    client = await connect(proxy.port)
    await client.send(
        request_line("POST /m HTTP/1.1", "Host: api.test", "Transfer-Encoding: chunked")
        + BAD_CHUNKED
    )
    assert_json_error(await client.response(), 400)
    assert origin.connections == 0

    # A well-formed body within the budget is forwarded whole; so is one with 100-continue,
    # which the proxy now answers itself (it is the one reading the body).
    client = await connect(proxy.port)
    ok = await client.request(
        request_line("POST /ok HTTP/1.1", "Host: api.test", "Transfer-Encoding: chunked")
        + chunk(b"abc")
        + LAST_CHUNK
    )
    assert (ok.status, ok.body) == (200, b"ok:abc")
    await client.send(
        request_line(
            "POST /e HTTP/1.1", "Host: api.test", "Expect: 100-continue", "Content-Length: 2"
        )
    )
    interim = await client.next_event()
    assert isinstance(interim, h11.InformationalResponse) and interim.status_code == 100
    await client.send(b"hi")
    assert (await client.response()).body == b"ok:hi"
    assert [s.target for s in origin.requests] == [b"/ok", b"/e"]
    assert origin.requests[1].values("expect") == []


async def test_item18_body_over_the_budget_streams(
    make_proxy: ProxyFactory, make_origin: OriginFactory, connect: Connect
) -> None:
    origin = await make_origin()
    proxy = await make_proxy(origin.port, http=HttpSettings(request_buffering=1024))
    client = await connect(proxy.port)
    first, rest = b"a" * 3000, b"b" * 3000
    await client.send(
        request_line("POST /big HTTP/1.1", "Host: api.test", "Content-Length: 6000") + first
    )
    # Past the budget the head goes upstream while the client is still sending.
    seen = await within(origin.head_seen.get())
    assert seen.target == b"/big"
    await client.send(rest)
    response = await client.response()
    assert response.status == 200 and response.body == b"ok:" + first + rest
