"""The resolver answers a repeated question from memory until the answer's TTL runs out."""

from __future__ import annotations

import asyncio
import time

from dnszone import serve_dns

from postroom import resolver as dns_resolver
from postroom.config.values import Endpoint


def test_repeated_lookups_ask_the_server_once_and_expire() -> None:
    with serve_dns({("a.test", "TXT"): ["one"], ("b.test", "A"): ["192.0.2.1"]}) as server:
        async def go() -> None:
            r = dns_resolver.make_resolver([Endpoint("127.0.0.1", server.port)], lifetime=5.0)
            first = await dns_resolver.lookup(r, "a.test.", "TXT")
            first.clear()  # callers get their own list
            for _ in range(5):
                again = await dns_resolver.lookup(r, "a.test.", "TXT")
                assert [b"".join(x.strings) for x in again] == [b"one"]
            assert server.queries.count(("a.test", "TXT")) == 1
            assert await dns_resolver.lookup(r, "b.test.", "TXT") == []  # no data, remembered
            assert await dns_resolver.lookup(r, "b.test.", "TXT") == []
            assert server.queries.count(("b.test", "TXT")) == 1
            # Past its expiry the answer is asked for again.
            cache = r.cache
            assert isinstance(cache, dns_resolver._CappedCache)
            cache.memo = {k: (time.time() - 1, v) for k, (_e, v) in cache.memo.items()}
            cache.flush()
            server.records[("a.test", "TXT")] = ["two"]
            changed = await dns_resolver.lookup(r, "a.test.", "TXT")
            assert [b"".join(x.strings) for x in changed] == [b"two"]
        asyncio.run(go())
