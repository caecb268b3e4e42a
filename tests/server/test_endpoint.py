"""/health names what is down: a listener that stopped listening, a store that does not
answer; /metrics and /health over HTTP from a server started in this process."""

from __future__ import annotations

import asyncio
import sqlite3
import urllib.request
from pathlib import Path

from postroom.config import load_config
from postroom.server.endpoint import health
from postroom.server.main import start


def test_health_reports_each_part(tmp_path: Path) -> None:
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n[listen]\n'
        'smtp = "127.0.0.1:0"\npop3 = "127.0.0.1:0"\n[metrics]\nlisten = "127.0.0.1:0"\n')
    config = load_config(tmp_path)

    async def scenario() -> None:
        running = await start(config)
        try:
            assert running.endpoint is not None
            host, port = running.endpoint.sockets[0].getsockname()[:2]

            def get(path: str) -> tuple[int, str]:
                try:
                    with urllib.request.urlopen(f"http://{host}:{port}{path}",
                                                timeout=10) as answer:
                        return answer.status, answer.read().decode()
                except urllib.error.HTTPError as refused:
                    return refused.code, refused.read().decode()

            status, text = await asyncio.to_thread(get, "/health")
            assert status == 200 and "listeners: ok (smtp, pop3)" in text, text
            assert "queue: ok (0 messages)" in text and "store: ok" in text
            status, text = await asyncio.to_thread(get, "/metrics")
            assert status == 200 and "postroom_queue_messages" in text
            assert (await asyncio.to_thread(get, "/nothing"))[0] == 404

            running.servers["pop3"].close()  # the listener stops listening

            def broken() -> list[str]:
                raise sqlite3.OperationalError("disk I/O error")

            running.store.users.list_domains = broken  # type: ignore[method-assign]
            ok, lines = await health(running)
            assert not ok
            assert lines[0].startswith("listeners: down: pop3")
            assert lines[2].startswith("store: down: the user directory does not answer")
            status, _text = await asyncio.to_thread(get, "/health")
            assert status == 503
        finally:
            running.servers.pop("pop3")
            await running.stop(grace=2)

    asyncio.run(scenario())
