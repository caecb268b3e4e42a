"""The asyncio shell: listeners, TLS, sessions and workers between sockets and protocol cores."""
