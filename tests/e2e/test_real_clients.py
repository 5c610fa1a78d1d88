"""Real inference clients through pqproxy in http mode, in front of the real demo upstream.

- the official ``openai`` Python client, over classical TLS from the stdlib ``ssl`` (x25519):
  a streamed chat completion, a plain one, and the model list;
- Node.js with OpenSSL 3.5 over X25519MLKEM768: the same token stream, each SSE event stamped
  with its arrival time, to see that the tokens come through one by one.

The listener runs in process, on its own event loop in a background thread (the pattern of
tests/interop/conftest.py), so blocking clients and subprocesses can talk to it; what the server
saw arrives on a thread-safe queue. (A ``pqproxy serve --config`` process is the next step, once
the CLI takes a config file.)
"""

from __future__ import annotations

import json
import queue
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from pqproxy.demo_upstream import MODEL_ID
from pqproxy.devcert import DevCertPaths
from pqproxy.tls.enums import NamedGroup
from pqproxy.tls.events import HandshakeComplete
from tests.inprocess import http_proxy_in_thread

pytestmark = [pytest.mark.interop, pytest.mark.e2e]

WAIT = 20.0
TOKENS = 8
TOKEN_INTERVAL = 0.02
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello over a post-quantum channel."}]


@dataclass
class RunningProxy:
    port: int = 0
    handshakes: queue.Queue[HandshakeComplete] = field(default_factory=queue.Queue)

    def seen_groups(self) -> list[int]:
        """The key-exchange group of every handshake so far."""
        groups = []
        while True:
            try:
                groups.append(self.handshakes.get_nowait().group)
            except queue.Empty:
                return groups


@pytest.fixture
def http_proxy(dev_certs: DevCertPaths) -> Iterator[RunningProxy]:
    """pqproxy (http mode, a one-server pool) in front of the demo upstream streaming TOKENS
    tokens TOKEN_INTERVAL apart."""
    proxy = RunningProxy()
    with http_proxy_in_thread(
        dev_certs, proxy.handshakes.put, tokens=TOKENS, token_interval=TOKEN_INTERVAL
    ) as port:
        proxy.port = port
        yield proxy


def openai_client(port: int, ca: Path) -> openai.OpenAI:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # DefaultHttpxClient: the HTTP client class the installed openai is built on, with its
    # defaults, and our trust anchor.
    return openai.OpenAI(
        base_url=f"https://localhost:{port}/v1",
        api_key="test",
        max_retries=0,
        timeout=WAIT,
        http_client=openai.DefaultHttpxClient(verify=ctx, timeout=WAIT),
    )


def test_openai_client_streams_through_classical_tls(
    http_proxy: RunningProxy, dev_certs: DevCertPaths
) -> None:
    with openai_client(http_proxy.port, dev_certs.ca) as client:
        models = [model.id for model in client.models.list()]
        assert models == [MODEL_ID]

        completion = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
        answer = completion.choices[0].message.content
        assert answer and len(answer.split()) == TOKENS
        assert completion.choices[0].finish_reason == "stop"

        stream = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, stream=True)
        deltas: list[str] = []
        finish_reasons: list[str | None] = []
        with stream:
            for chunk in stream:
                assert chunk.object == "chat.completion.chunk"
                choice = chunk.choices[0]
                if choice.delta.content:
                    deltas.append(choice.delta.content)
                finish_reasons.append(choice.finish_reason)

    assert len(deltas) >= 2
    assert len(deltas) == TOKENS
    assert "".join(deltas) == answer
    assert finish_reasons[-1] == "stop"
    groups = http_proxy.seen_groups()
    # One keep-alive connection (or a few): the stdlib's OpenSSL 3.0 speaks classical x25519.
    assert groups and set(groups) == {NamedGroup.x25519}


NODE_SSE_CLIENT = r"""
const https = require('https');
const fs = require('fs');
const [port, caPath, curve, model] = process.argv.slice(1);
const started = process.hrtime.bigint();
const now = () => Number(process.hrtime.bigint() - started) / 1e6;
const out = (record) => console.log(JSON.stringify(record));
const body = JSON.stringify({
  model, stream: true, messages: [{ role: 'user', content: 'hello' }],
});
const req = https.request({
  host: '127.0.0.1', port: Number(port), servername: 'localhost', agent: false,
  method: 'POST', path: '/v1/chat/completions',
  ca: fs.readFileSync(caPath), ecdhCurve: curve,
  headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
}, (res) => {
  const socket = res.socket;
  out({
    kind: 'response', status: res.statusCode, headers: res.headers,
    openssl: process.versions.openssl, protocol: socket.getProtocol(),
    group: socket.getEphemeralKeyInfo(), authorized: socket.authorized,
  });
  let pending = '';
  res.setEncoding('utf8');
  res.on('data', (chunk) => {
    const t = now();
    pending += chunk;
    let end;
    while ((end = pending.indexOf('\n\n')) >= 0) {
      const event = pending.slice(0, end);
      pending = pending.slice(end + 2);
      for (const line of event.split('\n')) {
        if (line.startsWith('data: ')) out({ kind: 'data', t, data: line.slice(6) });
      }
    }
  });
  res.on('end', () => { out({ kind: 'end', t: now(), pending }); process.exit(0); });
});
req.on('error', (err) => { out({ kind: 'error', error: err.message }); process.exit(1); });
req.end(body);
setTimeout(() => { out({ kind: 'error', error: 'timeout' }); process.exit(2); }, 15000).unref();
"""


def test_node_streams_over_x25519mlkem768(
    http_proxy: RunningProxy, dev_certs: DevCertPaths, node_binary: Path
) -> None:
    # The whole answer, for comparison, from a plain (non-streamed) request.
    with openai_client(http_proxy.port, dev_certs.ca) as client:
        answer = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    expected_text = answer.choices[0].message.content
    assert expected_text
    http_proxy.seen_groups()  # that handshake was classical; only Node's counts below

    result = subprocess.run(
        [
            str(node_binary),
            "-e",
            NODE_SSE_CLIENT,
            str(http_proxy.port),
            str(dev_certs.ca),
            "X25519MLKEM768",
            MODEL_ID,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    head, *events, end = records
    assert head["kind"] == "response" and end["kind"] == "end", records
    assert end["pending"] == ""
    assert head["openssl"].startswith("3.5")
    assert head["protocol"] == "TLSv1.3" and head["authorized"] is True
    assert head["group"] == {"type": "TLSGroup", "name": "X25519MLKEM768"}
    assert head["status"] == 200
    assert head["headers"]["content-type"] == "text/event-stream"
    assert head["headers"]["transfer-encoding"] == "chunked"
    assert http_proxy.seen_groups() == [NamedGroup.X25519MLKEM768]

    assert all(event["kind"] == "data" for event in events)
    assert len(events) == TOKENS + 1
    assert events[-1]["data"] == "[DONE]"
    chunks = [json.loads(event["data"]) for event in events[:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected_text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    # The tokens left the upstream TOKEN_INTERVAL apart; through the proxy they still arrive
    # one by one, not as one burst at the end. Generous margins: half the span, and most
    # tokens (not all) at their own moment.
    times = [event["t"] for event in events[:TOKENS]]
    span_ms = times[-1] - times[0]
    assert span_ms >= (TOKENS - 1) * TOKEN_INTERVAL * 1000 / 2, times
    assert len(set(times)) >= TOKENS // 2, times
