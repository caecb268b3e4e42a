"""The receiving host's recipient policy: local users only, no relay by any address trick."""

import asyncio
from collections.abc import Callable

import pytest

from postroom.mailauth.srs import SRS
from postroom.policy.relay import RecipientDecision, RecipientPolicy, normalise_domain
from postroom.store.api import Expansion

USERS = {"boss@corp.example": ["boss@corp.example"], "sales@corp.example": ["boss@corp.example"]}


def resolve(address: str) -> Expansion | None:
    if address == "forward@corp.example":
        return Expansion(("boss@corp.example",), ("friend@other.example",), ())
    if address == "orphan@corp.example":  # an alias whose only target was removed
        return Expansion((), (), ("gone@corp.example",))
    local, _, domain = address.rpartition("@")
    if "+" in local and address not in USERS:
        address = local.split("+", 1)[0] + "@" + domain
    boxes = USERS.get(address.lower())
    return Expansion(tuple(boxes), (), ()) if boxes else None


class Directory:
    """A store.api.Directory over two functions."""

    def __init__(self, is_local: Callable[[str], bool],
                 expand: Callable[[str], Expansion | None]) -> None:
        self._is_local = is_local
        self._expand = expand

    def is_local_domain(self, domain: str) -> bool:
        return self._is_local(domain)

    async def expand(self, address: str) -> Expansion | None:
        return self._expand(address)

    async def verify_password(self, address: str, password: str) -> bool:
        return False

    async def apop_secret(self, address: str) -> str | None:
        return None


class Policy:
    """A RecipientPolicy whose checks run to their answer here."""

    def __init__(self, policy: RecipientPolicy) -> None:
        self._policy = policy

    def check_recipient(self, address: str) -> RecipientDecision:
        return asyncio.run(self._policy.check_recipient(address))


@pytest.fixture
def policy() -> Policy:
    return Policy(RecipientPolicy(Directory(lambda d: d == "corp.example", resolve),
                                  primary_domain="corp.example"))


def test_local_user_accepted(policy: Policy) -> None:
    d = policy.check_recipient("boss@corp.example")
    assert (d.reply.code, d.reply.enhanced) == (250, "2.1.5")
    assert d.mailboxes == ("boss@corp.example",)


def test_alias_and_subaddress_reach_the_mailbox(policy: Policy) -> None:
    assert policy.check_recipient("sales@corp.example").mailboxes == ("boss@corp.example",)
    assert policy.check_recipient("boss+reports@corp.example").mailboxes == (
        "boss@corp.example",
    )


def test_unknown_local_user_is_550_511(policy: Policy) -> None:
    d = policy.check_recipient("nobody@corp.example")
    assert (d.reply.code, d.reply.enhanced) == (550, "5.1.1")
    assert not d.accepted


@pytest.mark.parametrize(
    "address",
    [
        "user@other.example",
        "user%other.example@corp.example",
        "other.example!user@corp.example",
        '"user@other.example"@corp.example',
        '"user%other.example"@corp.example',
        "user@other.example.",
        "user@corp.example.other.example",
        "user@CORP.EXAMPLE.evil.example",
        "boss@[127.0.0.1]",
        "boss",
    ],
)
def test_relay_tricks_are_refused_554_571(policy: Policy, address: str) -> None:
    d = policy.check_recipient(address)
    assert (d.reply.code, d.reply.enhanced) == (554, "5.7.1"), address
    assert d.mailboxes == ()


@pytest.mark.parametrize("address", ["BOSS@Corp.Example", "boss@corp.example."])
def test_case_and_trailing_dot_are_normalised(policy: Policy, address: str) -> None:
    assert policy.check_recipient(address).accepted


def test_bare_postmaster_is_accepted(policy: Policy) -> None:
    # RFC 5321 4.5.1: <Postmaster> with no domain must be accepted...
    p = Policy(RecipientPolicy(Directory(
        lambda d: d == "corp.example",
        lambda a: Expansion((a,), (), ()) if a == "postmaster@corp.example" else None,
    ), primary_domain="corp.example"))
    assert p.check_recipient("Postmaster").accepted


def test_normalise_domain() -> None:
    assert normalise_domain("Corp.Example.") == "corp.example"
    assert normalise_domain("corp.example..") == ""
    assert normalise_domain("Bücher.Example") == "xn--bcher-kva.example"


def test_alias_forwarding_off_host_is_refused_not_half_delivered(policy: Policy) -> None:
    d = policy.check_recipient("forward@corp.example")
    assert (d.reply.code, d.reply.enhanced) == (550, "5.7.1")
    assert d.mailboxes == ()


@pytest.mark.parametrize("address", ['"boss"@corp.example', '"bo\\ss"@corp.example',
                                     '"sales"@Corp.Example', '"boss+x"@corp.example'])
def test_a_quoted_local_part_is_the_local_part_it_spells(
    policy: Policy, address: str
) -> None:
    # RFC 5321 4.1.2: "boss" and boss are the same local part.
    d = policy.check_recipient(address)
    assert (d.reply.code, d.mailboxes) == (250, ("boss@corp.example",)), d.reply


@pytest.mark.parametrize("address", ['"boss smith"@corp.example', '"nobody"@corp.example'])
def test_a_quoted_local_part_that_is_nobody_is_550_511(
    policy: Policy, address: str
) -> None:
    d = policy.check_recipient(address)
    assert (d.reply.code, d.reply.enhanced) == (550, "5.1.1"), d.reply


def test_empty_quoted_local_part_is_a_syntax_error(policy: Policy) -> None:
    assert policy.check_recipient('""@corp.example').reply.code == 501


def test_an_alias_that_leads_nowhere_says_so(policy: Policy) -> None:
    d = policy.check_recipient("orphan@corp.example")
    assert (d.reply.code, d.reply.enhanced) == (451, "4.3.5")
    assert "alias that leads to no mailbox" in d.reply.text
    assert "no such user" not in d.reply.text


def forwarding_policy() -> Policy:
    def expand(address: str) -> Expansion | None:
        if address == "postmaster@corp.example":
            return Expansion((), ("admin@other.example",), ())
        return resolve(address)

    return Policy(RecipientPolicy(Directory(lambda d: d == "corp.example", expand),
                                  primary_domain="corp.example", srs=SRS(b"secret")))


@pytest.mark.parametrize("address", ["forward@corp.example", "forward@Corp.Example."])
def test_with_forwarding_on_an_alias_off_host_is_accepted_for_both(address: str) -> None:
    d = forwarding_policy().check_recipient(address)
    assert (d.reply.code, d.mailboxes) == (250, ("boss@corp.example",))
    assert (d.forward, d.forward_domain) == (("friend@other.example",), "corp.example")


def test_bare_postmaster_forwards_in_the_primary_domain() -> None:
    d = forwarding_policy().check_recipient("Postmaster")
    assert (d.forward, d.forward_domain) == (("admin@other.example",), "corp.example")


def test_an_srs_address_leads_back_to_the_sender_or_is_refused() -> None:
    srs = SRS(b"secret").forward("alice@sender.example", "corp.example")
    d = forwarding_policy().check_recipient(srs)
    assert (d.reply.code, d.mailboxes, d.forward) == (250, (), ("alice@sender.example",))
    d = forwarding_policy().check_recipient(srs.replace("alice", "mallory"))
    assert (d.reply.code, d.reply.enhanced, d.forward) == (550, "5.1.1", ())
