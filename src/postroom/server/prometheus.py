"""The metrics themselves, in prometheus_client's multiprocess mode (see server.metrics).

Imported only once PROMETHEUS_MULTIPROC_DIR names the folder, so that every
value lives in a per-process file the endpoint adds up.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from postroom.server.metrics import Recorder

# End of DATA to the 250 is one group commit (a sync per batch): milliseconds to
# a second on a busy disk. A relay attempt is a whole SMTP session elsewhere.
DATA_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class PrometheusRecorder(Recorder):
    """Counts into prometheus_client metrics (names in README.md, "Metrics")."""

    def __init__(self) -> None:
        self.connections = Counter("postroom_connections", "Connections accepted",
                                   ["listener"])
        self.sessions = Gauge("postroom_sessions", "Sessions in progress", ["listener"],
                              multiprocess_mode="livesum")
        self.tls_handshakes = Counter("postroom_tls_handshakes", "TLS handshakes completed",
                                      ["listener", "version", "cipher"])
        self.auths = Counter("postroom_auth", "Logins checked (SMTP AUTH, POP3)",
                             ["listener", "result"])
        self.messages = Counter("postroom_messages_received", "Messages accepted (250)",
                                ["listener"])
        self.data_seconds = Histogram("postroom_data_to_reply_seconds",
                                      "End of a message's data to its 250", ["listener"],
                                      buckets=DATA_BUCKETS)
        self.delivered = Counter("postroom_messages_delivered",
                                 "Copies filed into local mailboxes")
        self.relay = Counter("postroom_relay_recipients",
                             "Recipients of delivery attempts from the queue, by outcome",
                             ["outcome"])
        self.relay_seconds = Histogram("postroom_relay_seconds",
                                       "Duration of one attempt to relay to another host",
                                       buckets=RELAY_BUCKETS)
        self.pop3_logins = Counter("postroom_pop3_logins", "POP3 logins", ["listener"])
        self.pop3_retrievals = Counter("postroom_pop3_retrievals", "POP3 RETR answered",
                                       ["listener"])

    def connection(self, listener: str) -> None:
        self.connections.labels(listener).inc()

    def session(self, listener: str, change: int) -> None:
        self.sessions.labels(listener).inc(change)

    def tls(self, listener: str, version: str, cipher: str) -> None:
        self.tls_handshakes.labels(listener, version, cipher).inc()

    def auth(self, listener: str, succeeded: bool) -> None:
        self.auths.labels(listener, "success" if succeeded else "failure").inc()

    def received(self, listener: str, seconds: float, mailboxes: int) -> None:
        self.messages.labels(listener).inc()
        self.data_seconds.labels(listener).observe(seconds)
        if mailboxes:
            self.delivered.inc(mailboxes)

    def relay_attempt(self, outcomes: dict[str, int], remote_seconds: float | None) -> None:
        for outcome, count in outcomes.items():
            if outcome == "delivered":
                self.delivered.inc(count)
            else:
                self.relay.labels(outcome).inc(count)
        if remote_seconds is not None:
            self.relay_seconds.observe(remote_seconds)

    def pop3_login(self, listener: str) -> None:
        self.pop3_logins.labels(listener).inc()

    def pop3_retrieved(self, listener: str) -> None:
        self.pop3_retrievals.labels(listener).inc()
