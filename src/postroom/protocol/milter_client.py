"""The milter client core (Sendmail/Postfix milter protocol version 6): steps out, verdicts in.

`MilterClient` does no I/O. The driver calls a method per step of the SMTP
session (`negotiate`, `connect`, `helo`, `mail`, `rcpt`, `data`, `header`,
`end_of_headers`, `body`, `end_of_message`, `abort`, `quit`), writes
`data_to_send()` to the filter, and when the method returned True (the step
awaits an answer) feeds what the filter sends to `receive_data` and takes
events from `next_event()` until a `Verdict`:

    client = MilterClient()
    client.negotiate()                 # -> Negotiated
    if client.connect("mail.example", "192.0.2.1", 25, macros):
        ... read until a Verdict (Progress only resets the driver's clock)
    ...
    client.end_of_message(macros)      # modifications, then the Verdict

A step the filter asked to leave out (SMFIP_NO*) sends nothing; a step it
said it will not answer (SMFIP_NR_*) sends its packet and awaits nothing:
both return False, which the driver takes as "continue". Macros (SMFIC_MACRO)
go before their step's command, filtered to the names the filter asked for
in negotiation when it asked. Modifications may only answer the end of the
message and only for actions negotiated; SKIP only a body chunk. Anything
else from the filter (an unknown code, a malformed packet, an answer nobody
awaits, SMFIR_SHUTDOWN) raises RemoteProtocolError and closes the core: the
driver then applies its default action, as Postfix does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from postroom.protocol import milter_wire as w
from postroom.protocol._core import NEED_DATA as NEED_DATA
from postroom.protocol._core import CoreState, LocalProtocolError, Signal, illegal_move
from postroom.protocol._core import RemoteProtocolError as RemoteProtocolError
from postroom.protocol.replies import Reply

# What SMFIR_REJECT and SMFIR_TEMPFAIL mean in SMTP, as Postfix words them.
REJECTED = Reply(550, "5.7.1", "Command rejected")
TEMPFAILED = Reply(451, "4.7.1", "Service unavailable - try again later")
# A filter's reply text: "CODE[ X.Y.Z] text", multi-line with CRLF and "CODE-" (RFC 5321 4.2).
_FIELD_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 3.6.8 ftext
_REPLYCODE_RE = re.compile(r"([45][0-9][0-9])([ -])(?:([45]\.[0-9]{1,3}\.[0-9]{1,3}) )?(.*)", re.S)


class MilterState(CoreState):
    """Where the filter's session stands: what the steps sent so far make legal next."""

    OPENED = "opened"  # connected; options not negotiated
    NEGOTIATED = "negotiated"  # the connect step is next
    CONNECTED = "connected"  # HELO, or MAIL of a new message
    ENVELOPE = "envelope"  # MAIL sent: RCPT next
    RECIPIENTS = "recipients"  # RCPT sent: more, or DATA
    HEADERS = "headers"  # DATA sent: header fields, then their end
    BODY = "body"  # EOH sent: body chunks, then the end of the message
    CLOSED = "closed"


S = MilterState
NEGOTIATE, CONNECT, HELO, MAIL, RCPT, DATA = "negotiate", "connect", "helo", "mail", "rcpt", "data"
HEADER, EOH, BODY, EOM, ABORT, QUIT = "header", "eoh", "body", "end of message", "abort", "quit"
_IN_MESSAGE = (S.ENVELOPE, S.RECIPIENTS, S.HEADERS, S.BODY)

# (state, step) -> the state once the step is sent. The one table `_step` reads.
TRANSITIONS: dict[tuple[MilterState, str], MilterState] = {
    (S.OPENED, NEGOTIATE): S.NEGOTIATED,
    (S.NEGOTIATED, CONNECT): S.CONNECTED,
    (S.CONNECTED, HELO): S.CONNECTED,
    (S.CONNECTED, MAIL): S.ENVELOPE,
    (S.ENVELOPE, RCPT): S.RECIPIENTS,
    (S.RECIPIENTS, RCPT): S.RECIPIENTS,
    (S.RECIPIENTS, DATA): S.HEADERS,
    (S.HEADERS, HEADER): S.HEADERS,
    (S.HEADERS, EOH): S.BODY,
    (S.BODY, BODY): S.BODY,
    (S.BODY, EOM): S.CONNECTED,
    (S.CONNECTED, ABORT): S.CONNECTED,
    **{(state, ABORT): S.CONNECTED for state in _IN_MESSAGE},
    **{(state, QUIT): S.CLOSED for state in S if state is not S.CLOSED},
}

# Each step: its command code, the flag that leaves it out, the flag that leaves its
# answer out (0: none), and its macro stage (None: no macros).
STEPS: dict[str, tuple[bytes, int, int, int | None]] = {
    CONNECT: (w.SMFIC_CONNECT, w.SMFIP_NOCONNECT, w.SMFIP_NR_CONN, w.SMFIM_CONNECT),
    HELO: (w.SMFIC_HELO, w.SMFIP_NOHELO, w.SMFIP_NR_HELO, w.SMFIM_HELO),
    MAIL: (w.SMFIC_MAIL, w.SMFIP_NOMAIL, w.SMFIP_NR_MAIL, w.SMFIM_ENVFROM),
    RCPT: (w.SMFIC_RCPT, w.SMFIP_NORCPT, w.SMFIP_NR_RCPT, w.SMFIM_ENVRCPT),
    DATA: (w.SMFIC_DATA, w.SMFIP_NODATA, w.SMFIP_NR_DATA, w.SMFIM_DATA),
    HEADER: (w.SMFIC_HEADER, w.SMFIP_NOHDRS, w.SMFIP_NR_HDR, None),
    EOH: (w.SMFIC_EOH, w.SMFIP_NOEOH, w.SMFIP_NR_EOH, w.SMFIM_EOH),
    BODY: (w.SMFIC_BODY, w.SMFIP_NOBODY, w.SMFIP_NR_BODY, None),
    EOM: (w.SMFIC_BODYEOB, 0, 0, w.SMFIM_EOM),
}

# Modifications: the action each needs negotiated.
_MODIFICATION_ACTIONS = {
    w.SMFIR_ADDHEADER: w.SMFIF_ADDHDRS,
    w.SMFIR_INSHEADER: w.SMFIF_ADDHDRS,
    w.SMFIR_CHGHEADER: w.SMFIF_CHGHDRS,
    w.SMFIR_REPLBODY: w.SMFIF_CHGBODY,
    w.SMFIR_ADDRCPT: w.SMFIF_ADDRCPT,
    w.SMFIR_ADDRCPT_PAR: w.SMFIF_ADDRCPT_PAR,
    w.SMFIR_DELRCPT: w.SMFIF_DELRCPT,
    w.SMFIR_CHGFROM: w.SMFIF_CHGFROM,
    w.SMFIR_QUARANTINE: w.SMFIF_QUARANTINE,
}


# -- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The filter's answer to SMFIC_OPTNEG: what it will do, which steps it wants and
    which it will answer, and per macro stage the macros it asked for."""

    version: int
    actions: int
    protocol: int
    macros: Mapping[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The filter's last word on a step. `action`: "continue" (go on), "accept" (the
    message, or the session at connect/HELO, needs this filter no more), "reject",
    "tempfail", "discard" (accept and drop the message), "skip" (no more body chunks).
    `reply`: the SMTP reply for reject and tempfail."""

    action: str
    reply: Reply | None = None


CONTINUE = Verdict("continue")


@dataclass(frozen=True, slots=True)
class Progress:
    """The filter asks for more time (SMFIR_PROGRESS); the verdict is still to come."""


@dataclass(frozen=True, slots=True)
class AddHeader:
    name: str
    value: str  # lines separated by "\n", without the space after the colon


@dataclass(frozen=True, slots=True)
class InsertHeader:
    index: int  # 0: before the first header field
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    index: int  # the index-th field of that name, from 1
    name: str
    value: str  # "" deletes the field


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    data: bytes  # a piece of the new body; the pieces follow in order


@dataclass(frozen=True, slots=True)
class AddRecipient:
    address: str
    parameters: str | None = None  # ESMTP parameters (SMFIR_ADDRCPT_PAR)


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    address: str


@dataclass(frozen=True, slots=True)
class ChangeSender:
    address: str
    parameters: str | None = None


@dataclass(frozen=True, slots=True)
class Quarantine:
    reason: str


Modification = (AddHeader | InsertHeader | ChangeHeader | ReplaceBody | AddRecipient
                | DeleteRecipient | ChangeSender | Quarantine)
Event = Negotiated | Verdict | Progress | Modification


def parse_replycode(text: str) -> Reply:
    """SMFIR_REPLYCODE's text as a Reply: a 4xx or 5xx code, an optional enhanced code
    of the same class (RFC 3463 2), lines joined by CRLF with "CODE-" continuations."""
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    code = 0
    enhanced: str | None = None
    texts = []
    for i, line in enumerate(lines):
        m = _REPLYCODE_RE.fullmatch(line)
        if m is None or (code and int(m.group(1)) != code):
            raise RemoteProtocolError(f"malformed milter reply code {text[:80]!r}")
        last = i == len(lines) - 1
        if (m.group(2) == " ") != last:
            raise RemoteProtocolError(f"malformed milter multi-line reply {text[:80]!r}")
        code = int(m.group(1))
        if i == 0:
            enhanced = m.group(3)
            if enhanced is not None and enhanced[0] != m.group(1)[0]:
                raise RemoteProtocolError(f"enhanced code {enhanced} in a {code} reply")
        texts.append(m.group(4) if m.group(3) == enhanced else line[4:])
    return Reply(code, enhanced, "\n".join(texts), close=code == 421)


class MilterClient:
    """One connection to one filter (see the module docstring)."""

    def __init__(self, actions: int = w.ALL_ACTIONS, protocol: int = w.OFFERED_PROTOCOL) -> None:
        self.offered_actions = actions
        self.offered_protocol = protocol
        self._state = S.OPENED
        self._awaiting: str | None = None  # the step whose answer is due
        self._reader = w.PacketReader()
        self._out = bytearray()
        self._eof = False
        self.negotiated: Negotiated | None = None

    @property
    def state(self) -> MilterState:
        return self._state

    @property
    def awaiting(self) -> str | None:
        """The step whose answer is due, or None."""
        return self._awaiting

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        """Bytes from the filter; b"" when it closed its side."""
        if not data:
            self._eof = True
        elif self._state is not S.CLOSED:
            self._reader.feed(data)

    # -- steps --------------------------------------------------------------------

    def negotiate(self) -> None:
        """SMFIC_OPTNEG: version 6, the actions and protocol steps postroom offers."""
        self._move(NEGOTIATE)
        data = w.word(w.VERSION) + w.word(self.offered_actions) + w.word(self.offered_protocol)
        self._out += w.packet(w.SMFIC_OPTNEG, data)
        self._awaiting = NEGOTIATE

    def connect(self, hostname: str, address: str | None, port: int = 0,
                macros: Mapping[str, str] | None = None) -> bool:
        """The client connected: its name ("[IP]" when it has none), its IP address
        (an IPv6 one in "IPv6:" form is not expected: plain), or a path for "unix"."""
        if address is None:
            family, tail = w.FAMILY_UNKNOWN, b""
        elif ":" in address:
            family, tail = w.FAMILY_INET6, port.to_bytes(2, "big") + w.cstrings(address)
        elif address.startswith("/"):
            family, tail = w.FAMILY_UNIX, b"\0\0" + w.cstrings(address)
        else:
            family, tail = w.FAMILY_INET, port.to_bytes(2, "big") + w.cstrings(address)
        return self._step(CONNECT, w.cstrings(hostname) + family + tail, macros)

    def helo(self, name: str, macros: Mapping[str, str] | None = None) -> bool:
        return self._step(HELO, w.cstrings(name), macros)

    def mail(self, sender: str, parameters: Sequence[str] = (),
             macros: Mapping[str, str] | None = None) -> bool:
        """MAIL FROM: the reverse path in angle brackets, then each ESMTP parameter."""
        return self._step(MAIL, w.cstrings(f"<{sender}>", *parameters), macros)

    def rcpt(self, recipient: str, parameters: Sequence[str] = (),
             macros: Mapping[str, str] | None = None) -> bool:
        return self._step(RCPT, w.cstrings(f"<{recipient}>", *parameters), macros)

    def data(self, macros: Mapping[str, str] | None = None) -> bool:
        return self._step(DATA, b"", macros)

    def header(self, name: str, value: str) -> bool:
        """One header field: its name and its value without the colon and the one space
        after it, folded lines joined by "\\n" (Sendmail's form, which filters expect)."""
        return self._step(HEADER, w.cstrings(name, value), None)

    def end_of_headers(self, macros: Mapping[str, str] | None = None) -> bool:
        return self._step(EOH, b"", macros)

    def body(self, chunk: bytes) -> bool:
        """A piece of the body (CRLF line ends), at most MAX_BODY_CHUNK octets."""
        if len(chunk) > w.MAX_BODY_CHUNK:
            raise ValueError(f"body chunk of {len(chunk)} octets (at most {w.MAX_BODY_CHUNK})")
        return self._step(BODY, chunk, None)

    def end_of_message(self, macros: Mapping[str, str] | None = None) -> bool:
        """The message is whole: modifications may come, then the verdict (always awaited)."""
        return self._step(EOM, b"", macros)

    def abort(self) -> None:
        """The message ends without its end (RSET, a refusal, a lost client); no answer."""
        self._move(ABORT)
        self._out += w.packet(w.SMFIC_ABORT)

    def quit(self) -> None:
        """The session is over; no answer. The driver closes the connection."""
        if self._state is S.CLOSED:
            return
        self._move(QUIT)
        self._out += w.packet(w.SMFIC_QUIT)

    def wants(self, step: str) -> bool:
        """The filter takes `step` (did not ask to leave it out)."""
        skip = STEPS[step][1]
        return not (self.negotiated is not None and self.negotiated.protocol & skip)

    def _move(self, step: str) -> None:
        if self._awaiting is not None:
            raise LocalProtocolError(f"cannot send {step!r} before {self._awaiting!r} is answered")
        state = TRANSITIONS.get((self._state, step))
        if state is None:
            raise illegal_move(self._state, step)
        self._state = state

    def _step(self, step: str, data: bytes, macros: Mapping[str, str] | None) -> bool:
        code, skip, no_reply, stage = STEPS[step]
        self._move(step)
        protocol = self.negotiated.protocol if self.negotiated is not None else 0
        if macros and stage is not None:
            self._macros(code, stage, macros)
        if protocol & skip:
            return False
        self._out += w.packet(code, data)
        if protocol & no_reply:
            return False
        self._awaiting = step
        return True

    def _macros(self, code: bytes, stage: int, macros: Mapping[str, str]) -> None:
        asked = self.negotiated.macros.get(stage) if self.negotiated is not None else None
        pairs: list[str] = []
        for name, value in macros.items():
            if asked is None or name in asked or name.strip("{}") in asked:
                pairs += [name, value]
        if pairs:
            self._out += w.packet(w.SMFIC_MACRO, code + w.cstrings(*pairs))

    # -- answers ------------------------------------------------------------------

    def next_event(self) -> Event | Signal:
        """The next thing the filter said, or NEED_DATA. RemoteProtocolError when the
        filter broke the protocol or closed while an answer was due (the core closes)."""
        if self._state is S.CLOSED:
            raise LocalProtocolError("the milter session is closed")
        try:
            got = self._reader.next_packet()
            if got is None:
                if self._eof:
                    raise RemoteProtocolError(
                        f"the filter closed the connection (awaiting {self._awaiting})")
                return NEED_DATA
            return self._answer(*got)
        except RemoteProtocolError:
            self._state = S.CLOSED
            self._awaiting = None
            raise

    def _answer(self, code: bytes, data: bytes) -> Event:
        step = self._awaiting
        if step is None:
            raise RemoteProtocolError(f"milter reply {code!r} when no answer is due")
        if step == NEGOTIATE:
            if code != w.SMFIC_OPTNEG:
                raise RemoteProtocolError(f"milter answered negotiation with {code!r}")
            self._awaiting = None
            self.negotiated = self._options(data)
            return self.negotiated
        if code == w.SMFIR_PROGRESS:
            return Progress()
        if code in _MODIFICATION_ACTIONS:
            return self._modification(step, code, data)
        verdict = self._verdict(step, code, data)
        self._awaiting = None
        return verdict

    def _options(self, data: bytes) -> Negotiated:
        if len(data) < 12:
            raise RemoteProtocolError("milter negotiation reply too short")
        version, actions, protocol = (w.read_word(data, i) for i in (0, 4, 8))
        if not 2 <= version <= w.VERSION:
            raise RemoteProtocolError(f"milter protocol version {version} not supported")
        if actions & ~self.offered_actions:
            raise RemoteProtocolError(f"milter asks for actions 0x{actions:x}, offered "
                                      f"0x{self.offered_actions:x}")
        protocol &= ~w.SMFIP_MDS_BITS
        if protocol & ~self.offered_protocol:
            raise RemoteProtocolError(f"milter asks for protocol steps 0x{protocol:x}, offered "
                                      f"0x{self.offered_protocol:x}")
        macros: dict[int, tuple[str, ...]] = {}
        rest = data[12:]
        while rest:
            stage = w.read_word(rest)
            end = rest.find(b"\0", 4)
            if end < 0:
                raise RemoteProtocolError("milter macro list not terminated by NUL")
            names = rest[4:end].decode("utf-8", "replace").split()
            macros[stage] = tuple(n.strip("{}") for n in names)
            rest = rest[end + 1 :]
        return Negotiated(version, actions, protocol, macros)

    def _modification(self, step: str, code: bytes, data: bytes) -> Modification:
        if step != EOM:
            raise RemoteProtocolError(f"milter modification {code!r} in answer to {step}")
        assert self.negotiated is not None
        if not self.negotiated.actions & _MODIFICATION_ACTIONS[code]:
            raise RemoteProtocolError(f"milter modification {code!r} not negotiated")
        if code == w.SMFIR_ADDHEADER:
            return AddHeader(*_field(*w.split_strings(data, 2)))
        if code in (w.SMFIR_INSHEADER, w.SMFIR_CHGHEADER):
            index = w.read_word(data)
            name, value = _field(*w.split_strings(data[4:], 2))
            return (InsertHeader if code == w.SMFIR_INSHEADER else ChangeHeader)(index, name, value)
        if code == w.SMFIR_REPLBODY:
            return ReplaceBody(data)
        if code == w.SMFIR_DELRCPT:
            return DeleteRecipient(_address(w.split_strings(data, 1)[0]))
        if code == w.SMFIR_QUARANTINE:
            return Quarantine(w.split_strings(data)[0])
        parts = w.split_strings(data)
        if len(parts) > 2 or (code == w.SMFIR_ADDRCPT and len(parts) != 1):
            raise RemoteProtocolError(f"milter modification {code!r} with {len(parts)} strings")
        parameters = parts[1] if len(parts) == 2 and parts[1] else None
        if code == w.SMFIR_CHGFROM:
            return ChangeSender(_address(parts[0]), parameters)
        return AddRecipient(_address(parts[0]), parameters)

    def _verdict(self, step: str, code: bytes, data: bytes) -> Verdict:
        if code == w.SMFIR_CONTINUE:
            return CONTINUE
        if code == w.SMFIR_ACCEPT:
            return Verdict("accept")
        if code == w.SMFIR_DISCARD:
            return Verdict("discard")
        if code == w.SMFIR_REJECT:
            return Verdict("reject", REJECTED)
        if code in (w.SMFIR_TEMPFAIL, w.SMFIR_CONN_FAIL):
            return Verdict("tempfail", TEMPFAILED)
        if code == w.SMFIR_REPLYCODE:
            reply = parse_replycode(w.split_strings(data)[0])
            return Verdict("tempfail" if reply.is_transient else "reject", reply)
        if code == w.SMFIR_SKIP:
            assert self.negotiated is not None
            if step != BODY or not self.negotiated.protocol & w.SMFIP_SKIP:
                raise RemoteProtocolError(f"milter SKIP in answer to {step}")
            return Verdict("skip")
        if code == w.SMFIR_SHUTDOWN:
            raise RemoteProtocolError("the filter shuts down (SMFIR_SHUTDOWN)")
        raise RemoteProtocolError(f"unknown milter reply {code!r} to {step}")


def _field(name: str, value: str) -> tuple[str, str]:
    """A header field a filter gives: a name of RFC 5322 3.6.8 ftext, and a value whose
    every line but the first starts with white space (else it would end the field,
    or the header section, early: RFC 5322 2.2.3)."""
    if not _FIELD_NAME_RE.fullmatch(name):
        raise RemoteProtocolError(f"milter header name {name[:60]!r} is not a field name")
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if any(not line or line[0] not in " \t" for line in lines[1:]):
        raise RemoteProtocolError(f"milter header {name} value breaks the header section")
    return name, value


def _address(text: str) -> str:
    """An address a filter gave, with or without its angle brackets."""
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


def header_value(raw: bytes) -> str:
    """A header field's value as filters get it (SMFIC_HEADER): after the colon, the one
    space Sendmail eats taken off, folded lines joined by "\\n", the final CRLF gone."""
    text = raw.decode("utf-8", "surrogateescape")
    if text.startswith(" "):
        text = text[1:]
    return text.replace("\r\n", "\n").rstrip("\n")


def header_field(name: str, value: str) -> bytes:
    """A field a filter added or changed, as stored: "Name: value", CRLF line ends."""
    text = f"{name}: {value}".replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    return text.replace("\n", "\r\n").encode("utf-8", "surrogateescape") + b"\r\n"
