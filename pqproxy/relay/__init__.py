"""What the proxy forwards: the HTTP/1.1 rules over h11 and TLS events.

Pure functions and small classes only: sockets, asyncio and timers live in `pqproxy/io/`,
which drives these rules. Modules, lowest first (each imports only those above it):

- `fields`: header-list types, head end, transfer-coding lists, hop-by-hop fields;
- `errors`: `HttpError`, the JSON error responses, `CLOSING_STATUSES`, `classify_h11_error`;
- `request`: the request head (`RequestHeadReader`, `HeaderLimits`, `check_request`);
- `body`: request body size (`body_too_large`, `ChunkedBodyGuard`);
- `identity`: the client certificate's identity as headers and log text;
- `forwarding`: the headers the proxy owns upstream (`upstream_request_headers`);
- `response`: the upstream's response (`UpstreamResponseParser`,
  `downstream_response_headers`).

The asyncio driver holds client bytes in a `RequestHeadReader` until a request head is
complete (→ 400, 414, 431, 501 for a Transfer-Encoding h11 could not read), feeds the head
into an h11 SERVER connection made by `HeaderLimits.server_connection()` and, for each
request, calls:

1. `classify_h11_error` when h11 raises `RemoteProtocolError` (→ 400 or 431);
2. `HeaderLimits.check_head` and `check_request` on the `h11.Request` (→ 400, 405, 414, 431, 501,
   505); `check_request` returns the `RequestTarget` to send upstream;
3. `body_too_large` before reading a body (→ 413 at once, even under `Expect: 100-continue`);
4. `upstream_request_headers` to build the request it sends to the model server, and
   `downstream_response_headers` for the response it relays back;
5. `error_response` (or `HttpError.response`) for every answer the proxy writes itself.

The upstream's response is read by an `UpstreamResponseParser` (an h11 CLIENT that also reads
the framings h11 refuses: a Transfer-Encoding without final chunked, a 204 or 304 with a body).
"""
