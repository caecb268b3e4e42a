"""The filters of one SMTP session: each step handed to each filter in turn, verdicts combined.

An SMTP session (server.smtp) calls one method per step: `connect` (once, before
the first HELO or MAIL), `helo`, `mail`, `rcpt`, `message` (at the end of the
content, before the 250), `abort` and `close`. Each answers None (go on) or the
`Reply` the client gets. Semantics follow Postfix's milter client:

- "accept" at connect or HELO leaves the filter out for the session, at a later
  step for the message; "discard" drops the message after a 250; "reject" and
  "tempfail" answer the step (at connect and HELO: every MAIL of the session).
- A filter that is down, times out or breaks the protocol gets its default
  action: "tempfail" refuses with 451 4.7.1 (at the end of the message: the
  message is not kept, so the client retries and nothing is lost) and every
  later transaction of the session too; "accept" goes on without the filter.
  Either way one log line names the filter and the fault.
- At the end of the message the filters see it one after the other, each the
  message as the ones before it changed it; the session applies the envelope
  changes and files the result (`MessageOutcome`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

from postroom.milter.connection import MilterConnection, MilterFailure, MilterSpec
from postroom.milter.content import NewBody, Section, blocks, edit_fields, rewrite
from postroom.milter.content import parse_section as parse_section
from postroom.protocol import milter_client as core
from postroom.protocol import milter_wire as w
from postroom.protocol.milter_client import (
    AddRecipient,
    ChangeSender,
    DeleteRecipient,
    Modification,
    Quarantine,
    ReplaceBody,
    Verdict,
)
from postroom.protocol.replies import Reply
from postroom.store.api import Incoming

log = logging.getLogger("postroom.milter")

# What a filter that failed under default action "tempfail" makes the client hear:
# Postfix's words for milter_default_action = tempfail.
UNAVAILABLE = Reply(451, "4.7.1", "Service unavailable - try again later")


@dataclass
class SessionInfo:
    """What the session knows of its client, for the connect step and its macros."""

    service: str  # the listener: {daemon_name}
    hostname: str  # ours: j
    client_ip: str
    client_port: int
    daemon_addr: str = ""
    daemon_port: int = 0


@dataclass
class MessageOutcome:
    """What the filters decided at the end of a message."""

    refusal: Reply | None = None  # answer this, keep nothing
    discard: bool = False  # answer 250, keep nothing
    message: Incoming | None = None  # the message to file instead of the received one
    sender: str | None = None  # the new envelope sender
    added: list[tuple[str, str | None]] = field(default_factory=list)  # (address, parameters)
    deleted: list[str] = field(default_factory=list)
    quarantine: str | None = None  # file local copies in Junk, for this reason


class _Filter:
    """One filter's state in the session."""

    def __init__(self, spec: MilterSpec) -> None:
        self.spec = spec
        self.conn: MilterConnection | None = None
        self.off = False  # out for the session: accepted at connect/HELO, or failed
        self.done = False  # out for this message: accepted or discarded


class MilterChain:
    """The filters of one session (see the module docstring)."""

    def __init__(self, specs: tuple[MilterSpec, ...], info: SessionInfo,
                 receive: Callable[[bytes], Incoming]) -> None:
        self.filters = [_Filter(spec) for spec in specs]
        self.info = info
        self.receive = receive  # a new Incoming with that head: Mailboxes.receive
        self.refusal: Reply | None = None  # for every MAIL of the session
        self.connected = False
        self.queue_id = ""
        self.tls: dict[str, str] = {}
        self.auth: dict[str, str] = {}
        self.discard = False  # a filter said discard: keep nothing of this message
        self.discard_all = False  # ... said at connect or HELO: of any message
        self._section = Section([], b"", 0)  # of the message the last filter saw

    # -- the steps ----------------------------------------------------------------

    async def connect(self) -> Reply | None:
        """Open every filter and tell it who connected."""
        if self.connected:
            return self.refusal
        self.connected = True
        info = self.info
        macros = {
            "j": info.hostname, "{daemon_name}": info.service, "v": "postroom",
            "{daemon_addr}": info.daemon_addr, "{daemon_port}": str(info.daemon_port),
            "_": f"unknown [{info.client_ip}]", "{client_addr}": info.client_ip,
            "{client_port}": str(info.client_port), "{client_name}": "unknown",
            "{client_ptr}": "unknown",
        }
        for f in self.filters:
            try:
                f.conn = await MilterConnection.open(f.spec)
            except MilterFailure as exc:
                if self._failed(f, "connect", exc) is not None:
                    break
                continue
            conn = f.conn

            step = partial(conn.core.connect, f"[{info.client_ip}]", info.client_ip,
                           info.client_port, macros)
            if await self._step(f, "connect", step, session=True) is not None:
                break  # refused for the session: the other filters need not see it
        return self.refusal

    async def helo(self, name: str) -> Reply | None:
        """HELO/EHLO: a filter's refusal answers it; a refusal for the session (at
        connect, or a failed filter) waits for MAIL, so the client hears it on a
        transaction it will retry."""
        if await self.connect() is not None:
            return None
        self._abort_all()
        macros = dict(self.tls)
        for f in self._active():
            conn = f.conn
            assert conn is not None
            reply = await self._step(f, "helo", partial(conn.core.helo, name, macros),
                                     session=True)
            if self.refusal is not None:
                return None
            if reply is not None:
                return reply
        return None

    async def mail(self, sender: str, parameters: list[str], queue_id: str) -> Reply | None:
        await self.connect()
        self._abort_all()
        if self.refusal is not None:
            return self.refusal
        self.queue_id = queue_id
        self.discard = self.discard_all
        for f in self.filters:
            f.done = False
        macros = {"i": queue_id, **self.auth, "{mail_addr}": sender}
        for f in self._active():
            conn = f.conn
            assert conn is not None
            reply = await self._step(f, "mail", partial(conn.core.mail, sender, parameters, macros))
            if reply is not None:
                self._abort_all()
                return reply
        return None

    async def rcpt(self, recipient: str, parameters: list[str], local: bool) -> Reply | None:
        """A recipient the session accepted; a refusal takes it back."""
        if self.refusal is not None:  # a filter failed earlier in this transaction
            return self.refusal
        macros = {"i": self.queue_id, "{rcpt_addr}": recipient,
                  "{rcpt_mailer}": "local" if local else "smtp"}
        for f in self._active():
            conn = f.conn
            assert conn is not None
            reply = await self._step(f, "rcpt",
                                     partial(conn.core.rcpt, recipient, parameters, macros))
            if reply is not None:
                return reply
        return None

    async def message(self, message: Incoming, head: Callable[[str | None], bytes],
                      ) -> MessageOutcome:
        """The message is whole in `message`: each filter sees it, then decides.
        `head(new_sender)` is the head (Return-Path) of a rewritten copy."""
        outcome = MessageOutcome(refusal=self.refusal)
        if outcome.refusal is not None:  # a filter failed earlier in this transaction
            self._abort_all()
            return outcome
        if self.discard:  # said at MAIL or RCPT: the content goes nowhere
            self._abort_all()
            outcome.discard = True
            return outcome
        current = message
        for f in self._active():
            edits: list[Modification] = []
            reply = await self._content(f, current, edits)
            if reply is not None:
                outcome.refusal = reply
                break
            if self.discard:
                break
            current = await self._apply(f, current, edits, outcome, head)
            if outcome.refusal is not None:
                break
        if outcome.refusal is not None or self.discard:
            if current is not message:
                current.abort()
            outcome.discard = self.discard and outcome.refusal is None
            self._abort_all()
            return outcome
        outcome.message = current if current is not message else None
        return outcome

    def abort(self) -> None:
        """The message ends without its end (RSET, refusal, lost client)."""
        self._abort_all()

    def close(self) -> None:
        """The session is over: SMFIC_QUIT to each filter, then close."""
        for f in self.filters:
            if f.conn is not None:
                f.conn.quit()
                f.conn = None

    # -- the message --------------------------------------------------------------

    async def _content(self, f: _Filter, message: Incoming,
                       edits: list[Modification]) -> Reply | None:
        """DATA, the header fields, EOH, the body in pieces, the end: to one filter."""
        conn = f.conn
        assert conn is not None
        client = conn.core
        timeout = f.spec.content_timeout
        macros = {"i": self.queue_id}
        try:
            verdict = await conn.step(lambda: client.data(macros), timeout)
            if verdict.action != "continue":
                return self._verdict(f, "data", verdict, session=False)
            reader: AsyncGenerator[bytes, None] = blocks(message)
            data = b""
            section: Section | None = None
            async for block in reader:
                data += block
                section = parse_section(data, complete=False)
                if section is not None:
                    break
            if section is None:
                section = parse_section(data, complete=True)
                assert section is not None
            f_section = section
            if client.wants(core.HEADER):
                for fld in f_section.fields:
                    verdict = await conn.step(partial(client.header, fld.name, fld.value),
                                              timeout)
                    if verdict.action != "continue":
                        return self._verdict(f, "header", verdict, session=False)
            verdict = await conn.step(lambda: client.end_of_headers(macros), timeout)
            if verdict.action != "continue":
                return self._verdict(f, "end of headers", verdict, session=False)
            if client.wants(core.BODY):
                verdict = await self._body(conn, data[f_section.size:], reader, timeout)
                if verdict.action not in ("continue", "skip"):
                    return self._verdict(f, "body", verdict, session=False)
            await reader.aclose()
            self._section = f_section
            verdict = await conn.step(lambda: client.end_of_message(macros), timeout, edits)
        except MilterFailure as exc:
            edits.clear()
            return self._failed(f, "end of message", exc)
        return self._verdict(f, "end of message", verdict, session=False)

    async def _body(self, conn: MilterConnection, first: bytes, reader: AsyncIterator[bytes],
                    timeout: float) -> Verdict:
        """The body in SMFIC_BODY pieces of at most 65535 octets; stops at a verdict
        other than continue (SKIP: no more pieces, go to the end)."""
        pending = first
        while True:
            while len(pending) >= w.MAX_BODY_CHUNK:
                piece, pending = pending[:w.MAX_BODY_CHUNK], pending[w.MAX_BODY_CHUNK:]
                verdict = await conn.step(partial(conn.core.body, piece), timeout)
                if verdict.action != "continue":
                    return verdict
            try:
                pending += await reader.__anext__()
            except StopAsyncIteration:
                break
        if pending:
            return await conn.step(partial(conn.core.body, pending), timeout)
        return core.CONTINUE

    async def _apply(self, f: _Filter, current: Incoming, edits: list[Modification],
                     outcome: MessageOutcome, head: Callable[[str | None], bytes]) -> Incoming:
        """Take one filter's changes: envelope ones into `outcome`, header and body ones
        into a new copy of the message."""
        body: NewBody | None = None
        header_edits: list[Modification] = []
        try:
            for edit in edits:
                if isinstance(edit, ReplaceBody):
                    if body is None:
                        body = NewBody()
                    body.write(edit.data)
                elif isinstance(edit, ChangeSender):
                    outcome.sender = edit.address
                elif isinstance(edit, AddRecipient):
                    outcome.added.append((edit.address, edit.parameters))
                elif isinstance(edit, DeleteRecipient):
                    outcome.deleted.append(edit.address)
                elif isinstance(edit, Quarantine):
                    outcome.quarantine = edit.reason or "quarantined by a milter"
                else:
                    header_edits.append(edit)
            if edits:
                log.info("%s: %s: milter %s: %s", self.info.service, self.queue_id, f.spec,
                         ", ".join(_describe(e) for e in edits[:20]))
            if not header_edits and body is None and outcome.sender is None:
                return current
            section = self._section
            fields = edit_fields(section.fields, header_edits)
            new = self.receive(head(outcome.sender))
            try:
                await rewrite(current, new, section, fields, body)
            except BaseException:
                new.abort()
                raise
            return new
        except OSError as exc:
            log.error("%s: %s: applying the changes of milter %s failed: %s",
                      self.info.service, self.queue_id, f.spec, exc)
            outcome.refusal = Reply(451, "4.3.0", "Local error in processing, try later")
            return current
        finally:
            if body is not None:
                body.close()

    # -- verdicts and failures ----------------------------------------------------

    def _active(self) -> list[_Filter]:
        return [f for f in self.filters if f.conn is not None and not f.off and not f.done]

    async def _step(self, f: _Filter, what: str, send: Callable[[], bool],
                    session: bool = False) -> Reply | None:
        conn = f.conn
        assert conn is not None
        try:
            verdict = await conn.step(send, f.spec.command_timeout)
        except MilterFailure as exc:
            return self._failed(f, what, exc)
        return self._verdict(f, what, verdict, session=session)

    def _verdict(self, f: _Filter, what: str, verdict: Verdict, session: bool) -> Reply | None:
        action = verdict.action
        if action in ("continue", "skip"):
            return None
        if action == "accept":
            if session:
                f.off = True
            else:
                f.done = True
            return None
        if action == "discard":
            log.info("%s: %s: milter %s: discard at %s from [%s]", self.info.service,
                     self.queue_id or "NOQUEUE", f.spec, what, self.info.client_ip)
            self.discard = True
            if session:  # every message of the session (Postfix: "discard all mail")
                self.discard_all = True
                f.off = True
            else:
                f.done = True
            return None
        reply = verdict.reply
        assert reply is not None
        log.info("%s: %s: milter-%s: %s from [%s]: %s", self.info.service,
                 self.queue_id or "NOQUEUE", "reject" if action == "reject" else "tempfail",
                 what, self.info.client_ip, reply)
        if session and what == "connect":
            self.refusal = reply
            return reply
        return reply

    def _failed(self, f: _Filter, what: str, exc: Exception) -> Reply | None:
        """Postfix's milter_default_action for a filter that failed: close it; tempfail
        refuses the rest of the session, accept goes on without it."""
        action = f.spec.default_action
        log.warning("%s: %s: milter %s: %s at %s from [%s]; default action %s",
                    self.info.service, self.queue_id or "NOQUEUE", f.spec, exc, what,
                    self.info.client_ip, action)
        if f.conn is not None:
            f.conn.close()
            f.conn = None
        f.off = True
        if action == "accept":
            return None
        self.refusal = UNAVAILABLE
        return UNAVAILABLE

    def _abort_all(self) -> None:
        for f in self.filters:
            conn = f.conn
            if conn is None or f.off:
                continue
            if conn.core.state in _IN_MESSAGE and conn.core.awaiting is None:
                conn.core.abort()
                conn.flush()


_IN_MESSAGE = (core.MilterState.ENVELOPE, core.MilterState.RECIPIENTS,
               core.MilterState.HEADERS, core.MilterState.BODY)


def _describe(edit: Modification) -> str:
    """A modification for the log line (no header values: they may be long)."""
    name = type(edit).__name__
    if isinstance(edit, ReplaceBody):
        return f"{name} {len(edit.data)} octets"
    for attr in ("name", "address", "reason"):
        value = getattr(edit, attr, None)
        if value is not None:
            return f"{name} {value}"
    return name
