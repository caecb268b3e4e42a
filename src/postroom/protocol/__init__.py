"""Sans-IO protocol cores: bytes in, events out; replies and commands in, bytes out.

Nothing in this package imports asyncio, socket, ssl or time: the server layer
owns I/O and clocks, so the same cores serve the server, the relay client and
the tests, which can feed bytes one at a time.
"""
