"""The I/O layer: the only place with sockets, asyncio, timers and signals."""
