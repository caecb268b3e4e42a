"""The milter wire form (Sendmail/Postfix milter protocol version 6): codes, flags, packets.

A packet is a 32-bit length in network byte order, then that many octets: a
one-octet command (MTA to filter, "SMFIC_*") or reply (filter to MTA,
"SMFIR_*") and its data. Strings inside are NUL-terminated. The names follow
Sendmail's libmilter (mfdef.h), which Postfix's milter8 client speaks too.
"""

from __future__ import annotations

import struct

from postroom.protocol._core import RemoteProtocolError

VERSION = 6  # SMFI_PROT_VERSION: the version Sendmail 8.14+ and Postfix 2.6+ speak

# A packet's largest data part: libmilter's MILTER_MAX_DATA_SIZE (64 KiB - 1).
MAX_DATA = 65535
# One body chunk (SMFIC_BODY): what fits in a packet without SMFIP_MDS_* (libmilter's
# MILTER_CHUNK_SIZE), as Postfix sends it.
MAX_BODY_CHUNK = 65535
# The largest packet read from a filter: a body replacement chunk may use the
# 1 MiB packets of SMFIP_MDS_1M filters (never offered, but tolerated as Postfix does).
MAX_PACKET = 1024 * 1024 + 16

# Commands, MTA to filter.
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies, filter to MTA.
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# Actions a filter may take (SMFIF_*), offered by the MTA in SMFIC_OPTNEG.
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ALL_ACTIONS = 0x1FF

# Protocol steps (SMFIP_*): the MTA offers to leave a step out (NO*) or to take
# no reply to it (NR_*); the filter answers with the ones it wants.
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400  # the MTA understands SMFIR_SKIP in answer to a body chunk
SMFIP_RCPT_REJ = 0x800  # also send recipients the MTA refused (not offered)
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000  # header values with their leading space (not offered)
# What postroom offers: every step may be left out or go unanswered, and SKIP.
OFFERED_PROTOCOL = (
    SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY | SMFIP_NOHDRS
    | SMFIP_NOEOH | SMFIP_NR_HDR | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_SKIP | SMFIP_NR_CONN
    | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_DATA | SMFIP_NR_UNKN
    | SMFIP_NR_EOH | SMFIP_NR_BODY
)
# Bits a v6 filter may set that do not name a step: the packet-size ones (SMFIP_MDS_256K,
# SMFIP_MDS_1M), which only raise what the filter may send; ignored, not refused.
SMFIP_MDS_BITS = 0x10000000 | 0x20000000

# Macro stages of SMFIR_SETSYMLIST / the OPTNEG reply's lists (SMFIM_*).
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

# SMFIC_CONNECT's protocol family octet.
FAMILY_UNKNOWN = b"U"
FAMILY_UNIX = b"L"
FAMILY_INET = b"4"
FAMILY_INET6 = b"6"

_LENGTH = struct.Struct("!I")
_WORD = struct.Struct("!I")


def packet(code: bytes, data: bytes = b"") -> bytes:
    """One packet: its length, the code, the data."""
    if len(data) > MAX_DATA:
        raise ValueError(f"milter packet data of {len(data)} octets (at most {MAX_DATA})")
    return _LENGTH.pack(len(data) + 1) + code + data


def cstrings(*values: str) -> bytes:
    """NUL-terminated strings; ValueError for a NUL inside one (it would end it early)."""
    out = bytearray()
    for value in values:
        raw = value.encode("utf-8", "surrogateescape")
        if b"\0" in raw:
            raise ValueError("NUL in a milter string")
        out += raw + b"\0"
    return bytes(out)


def word(value: int) -> bytes:
    return _WORD.pack(value)


def read_word(data: bytes, offset: int = 0) -> int:
    if len(data) < offset + 4:
        raise RemoteProtocolError("milter reply too short for its 32-bit field")
    return int(_WORD.unpack_from(data, offset)[0])


def split_strings(data: bytes, count: int | None = None) -> list[str]:
    """The NUL-terminated strings of `data` (`count` of them, when given)."""
    if not data.endswith(b"\0"):
        raise RemoteProtocolError("milter string not terminated by NUL")
    parts = [p.decode("utf-8", "surrogateescape") for p in data[:-1].split(b"\0")]
    if count is not None and len(parts) != count:
        raise RemoteProtocolError(f"milter reply with {len(parts)} strings, expected {count}")
    return parts


class PacketReader:
    """Cuts packets out of received bytes: `next_packet` gives (code, data) or None."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_packet(self) -> tuple[bytes, bytes] | None:
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        length = int(_LENGTH.unpack_from(buffer)[0])
        if length == 0 or length > MAX_PACKET:
            raise RemoteProtocolError(f"milter packet length {length} out of range")
        if len(buffer) < 4 + length:
            return None
        code = bytes(buffer[4:5])
        data = bytes(buffer[5 : 4 + length])
        del buffer[: 4 + length]
        return code, data
