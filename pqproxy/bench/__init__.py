"""Load testing and benchmarks: ``pqproxy bench handshake`` and ``pqproxy bench request``.

- ``handshake``: TLS 1.3 handshakes/s and latency against any TLS 1.3 server, groups compared
  in the same run (``run_handshake_bench``).
- ``request``: end to end through a proxy to an upstream, direct vs via the proxy with each
  group (``run_request_bench``).
- ``report``: the JSON document (every field documented in ``HANDSHAKE_FIELDS`` /
  ``REQUEST_FIELDS``), the text table and the PNG plot.
- ``procs``: servers as subprocesses, and their CPU and memory read from ``/proc``.

The client is pyOpenSSL on cryptography's bundled OpenSSL (which speaks X25519MLKEM768): an
implementation independent of the server it measures. pqproxy itself never imports it; this
package is the one exception (tests/test_architecture.py).
"""
