"""What the proxy forwards: the HTTP/1.1 rules (`http1`) over h11 and TLS events.

Pure functions and small classes only: sockets, asyncio and timers live in `pqproxy/io/`,
which drives these rules.
"""
