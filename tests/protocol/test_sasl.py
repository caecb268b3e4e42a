"""SASL PLAIN and LOGIN, server and client side, and the strict base64 of RFC 4954 4."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.protocol.replies import Reply
from postroom.protocol.sasl import (
    AUTH_FAILED,
    AUTH_SUCCEEDED,
    ClientExchange,
    Credentials,
    SASLError,
    ServerExchange,
    challenge,
    decode_base64,
    encode_base64,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_reply_constants() -> None:
    # RFC 4954 6
    assert (AUTH_SUCCEEDED.code, AUTH_SUCCEEDED.enhanced) == (235, "2.7.0")
    assert (AUTH_FAILED.code, AUTH_FAILED.enhanced) == (535, "5.7.8")


@pytest.mark.parametrize(
    ("text", "data"),
    [("=", b""), ("", b""), ("YQ==", b"a"), ("YWI=", b"ab"), ("YWJj", b"abc")],
)
def test_base64(text: str, data: bytes) -> None:
    assert decode_base64(text) == data


@pytest.mark.parametrize("text", ["YQ", "Y Q==", "=YQ=", "YQ==YQ==", "YW=j", "YQ=", "Y*==", "==="])
def test_base64_is_strict(text: str) -> None:
    # RFC 4954 4: reject characters outside the alphabet and misplaced padding.
    with pytest.raises(SASLError) as info:
        decode_base64(text)
    assert info.value.reply == Reply(501, "5.5.2", "Cannot decode the base64 response")


def test_challenge_reply() -> None:
    assert challenge(b"") == Reply(334, None, "")
    assert challenge(b"Username:") == Reply(334, None, "VXNlcm5hbWU6")
    assert encode_base64(b"Password:") == "UGFzc3dvcmQ6"


def test_plain_with_initial_response() -> None:
    ex = ServerExchange("plain")
    assert ex.mechanism == "PLAIN"
    result = ex.start(b64(b"admin\0alice\0s3cr\xc3\xa9t"))
    assert result == Credentials(authcid="alice", password="s3cr\u00e9t", authzid="admin")
    assert ex.done
    assert "s3cr" not in repr(result)


def test_plain_without_initial_response() -> None:
    ex = ServerExchange("PLAIN")
    assert ex.start(None) == Reply(334, None, "")
    assert ex.respond(b64(b"\0bob\0pw")) == Credentials("bob", "pw")
    with pytest.raises(ValueError):
        ex.respond(b64(b"\0bob\0pw"))


@pytest.mark.parametrize(
    "message", [b"", b"bob\0pw", b"\0\0pw", b"\0bob\0", b"a\0b\0c\0d", b"\0b\xff\0pw"]
)
def test_malformed_plain(message: bytes) -> None:
    with pytest.raises(SASLError) as info:
        ServerExchange("PLAIN").start(b64(message) or "=")
    assert info.value.reply.code == 501


def test_login() -> None:
    ex = ServerExchange("LOGIN")
    assert ex.start(None) == Reply(334, None, "VXNlcm5hbWU6")
    assert ex.respond(b64(b"carol")) == Reply(334, None, "UGFzc3dvcmQ6")
    assert ex.respond(b64(b"pw")) == Credentials("carol", "pw")
    ex = ServerExchange("LOGIN")
    assert ex.start(b64(b"dave")) == Reply(334, None, "UGFzc3dvcmQ6")
    assert ex.respond("=") == Credentials("dave", "")


def test_unknown_mechanism_and_misuse() -> None:
    with pytest.raises(SASLError) as info:
        ServerExchange("CRAM-MD5")
    assert info.value.reply == Reply(504, "5.5.4", "Unrecognized authentication type")
    ex = ServerExchange("LOGIN")
    with pytest.raises(ValueError):
        ex.respond("x")
    ex.start(None)
    with pytest.raises(ValueError):
        ex.start(None)


@given(
    authcid=st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s),
    password=st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s),
    authzid=st.text(max_size=10).filter(lambda s: "\0" not in s),
    mechanism=st.sampled_from(["PLAIN", "LOGIN"]),
    initial=st.booleans(),
)
def test_client_and_server_agree(
    authcid: str, password: str, authzid: str, mechanism: str, initial: bool
) -> None:
    client = ClientExchange(mechanism, authcid, password, authzid if mechanism == "PLAIN" else "")
    server = ServerExchange(mechanism)
    first = client.initial_response() if initial else None
    result = server.start(first)
    while isinstance(result, Reply):
        assert result.code == 334
        result = server.respond(client.respond(result.text))
    assert result.authcid == authcid and result.password == password
    assert result.authzid == (authzid if mechanism == "PLAIN" else "")


def test_client_refuses_odd_challenges() -> None:
    client = ClientExchange("LOGIN", "u", "p")
    client.respond("VXNlcm5hbWU6")
    client.respond("UGFzc3dvcmQ6")
    with pytest.raises(SASLError):
        client.respond("")
    with pytest.raises(SASLError):
        ClientExchange("PLAIN", "u", "p").respond("not base64!")
    with pytest.raises(ValueError):
        ClientExchange("GSSAPI", "u", "p")
    with pytest.raises(ValueError):
        ClientExchange("PLAIN", "u\0x", "p")
