"""What the server counts for its metrics endpoint: a recorder the sessions and the relay
call, which does nothing until `[metrics] listen` turns it on (server.prometheus).

Off, each call is one method call that returns at once, so the hot paths pay
nothing worth measuring. On, every process writes its counts to files of its
own under DATA/metrics (prometheus_client's multiprocess mode), and the
primary's endpoint adds them up across the processes; the folder is emptied
at each start, so counts begin at zero with the server.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path

from postroom.queue.result import DeliveryResult

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it at import
METRICS_FOLDER = "metrics"  # under the data folder


class Recorder:
    """The calls the server makes; this one, for metrics turned off, does nothing."""

    def connection(self, listener: str) -> None:
        """A connection was accepted on `listener`."""

    def session(self, listener: str, change: int) -> None:
        """A session began (+1) or ended (-1) on `listener`."""

    def tls(self, listener: str, version: str, cipher: str) -> None:
        """A TLS handshake completed (STARTTLS, STLS or implicit TLS)."""

    def auth(self, listener: str, succeeded: bool) -> None:
        """A login (SMTP AUTH, POP3 USER/PASS, AUTH or APOP) was checked."""

    def received(self, listener: str, seconds: float, mailboxes: int) -> None:
        """A message was accepted (its 250 sent `seconds` after the end of its data),
        filed into `mailboxes` local mailboxes."""

    def relay_attempt(self, outcomes: dict[str, int], remote_seconds: float | None) -> None:
        """One delivery attempt from the queue: recipients by outcome ("delivered",
        "relayed", "deferred", "bounced"); the remote part's duration, if any."""

    def pop3_login(self, listener: str) -> None:
        """A POP3 user logged in and has the maildrop."""

    def pop3_retrieved(self, listener: str) -> None:
        """A POP3 RETR was answered with the message."""


recorder = Recorder()


def enable(data_dir: Path) -> Path:
    """Count for real from now on, in this process and the ones it forks: call before
    the fork, and before anything imports prometheus_client. Returns the folder."""
    global recorder
    folder = Path(data_dir) / METRICS_FOLDER
    if type(recorder) is not Recorder:
        return folder  # already on (a second start in one process: the tests)
    shutil.rmtree(folder, ignore_errors=True)  # the last run's counts
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    from postroom.server.prometheus import PrometheusRecorder

    recorder = PrometheusRecorder()
    return folder


def worker_gone(pid: int) -> None:
    """A worker process ended: its gauges (sessions in progress) no longer count."""
    if type(recorder) is not Recorder:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def outcome_counts(results: Sequence[DeliveryResult], remote: Collection[int]) -> dict[str, int]:
    """Recipients of one attempt by what became of them: "delivered" (here), "relayed"
    (accepted by another host: the indexes in `remote`), "deferred" (a temporary
    failure: tried again later), "bounced" (a permanent failure: returned to the sender)."""
    counts: dict[str, int] = {}
    for index, result in enumerate(results):
        if result.outcome == "delivered":
            word = "relayed" if index in remote else "delivered"
        else:
            word = "deferred" if result.outcome == "temporary" else "bounced"
        counts[word] = counts.get(word, 0) + 1
    return counts
