"""Next-hop lookup against real DNS servers on loopback: dnsmasq and a scriptable fake.

dnsmasq checks MX ordering, implicit MX and NXDOMAIN against a DNS server
someone else wrote; the fake adds what dnsmasq cannot serve: null MX,
SERVFAIL, timeouts, MX hosts without addresses, TTLs.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from postroom.config import Endpoint, Route, load_config
from postroom.delivery.routing import (
    MAX_HOPS,
    Failure,
    Hops,
    Local,
    Router,
    RouteResult,
    RouterOptions,
)
from postroom.delivery.smtp_out import Hop
from postroom.server.relay import router_options

if TYPE_CHECKING:  # the fixture's class; conftest modules are not imported by name
    from conftest import FakeDNS

MX_PORT = 2525


def make_router(
    port: int,
    *,
    routes: Mapping[str, Any] | None = None,
    local: Collection[str] = ("corp.example",),
    seed: int = 1,
    **options: Any,
) -> Router:
    settings = RouterOptions(
        routes=routes or {}, nameservers=(Endpoint("127.0.0.1", port),), mx_port=MX_PORT,
        **options,
    )
    return Router(settings, lambda domain: domain in local, rng=random.Random(seed))


def route(router: Router, domain: str) -> RouteResult:
    return asyncio.run(router.route(domain))


def hop_names(result: RouteResult) -> list[tuple[str, str]]:
    assert isinstance(result, Hops), result
    return [(hop.name, hop.host) for hop in result.hops]


# -- against dnsmasq ---------------------------------------------------------------

DNSMASQ_ZONE = (
    "--local=/isp.example/",
    "--local=/plain.example/",
    "--mx-host=isp.example,mx1.isp.example,10",
    "--mx-host=isp.example,mx2.isp.example,10",
    "--mx-host=isp.example,mx3.isp.example,20",
    "--host-record=mx1.isp.example,127.0.0.1,::1",
    "--host-record=mx2.isp.example,127.0.0.2",
    "--host-record=mx3.isp.example,127.0.0.3",
    "--host-record=plain.example,127.0.0.9",
)


@pytest.fixture
def dnsmasq_router(dnsmasq: Callable[..., int]) -> Callable[..., Router]:
    port = dnsmasq(*DNSMASQ_ZONE)

    def make(**options: Any) -> Router:
        return make_router(port, **options)

    return make


def test_dnsmasq_mx_in_preference_order_with_each_address(
    dnsmasq_router: Callable[..., Router],
) -> None:
    result = route(dnsmasq_router(), "isp.example")
    names = hop_names(result)
    # The two preference-10 hosts come first in either order; mx1 has an IPv4 and
    # an IPv6 address, IPv4 first; the preference-20 host comes last.
    assert sorted(names[:3]) == [
        ("mx1.isp.example", "127.0.0.1"),
        ("mx1.isp.example", "::1"),
        ("mx2.isp.example", "127.0.0.2"),
    ]
    assert names[3] == ("mx3.isp.example", "127.0.0.3")
    assert len(names) == 4
    assert isinstance(result, Hops)
    assert all(hop.port == MX_PORT and hop.tls == "opportunistic" for hop in result.hops)


def test_dnsmasq_equal_preferences_are_shuffled(dnsmasq_router: Callable[..., Router]) -> None:
    router = dnsmasq_router(seed=7)

    async def firsts() -> list[str]:
        results = [await router.route("isp.example") for _ in range(24)]
        return [hop_names(r)[0][0] for r in results]

    first = asyncio.run(firsts())
    # RFC 5321 5.1: both best MX hosts lead sometimes; the worse one never does.
    assert set(first) == {"mx1.isp.example", "mx2.isp.example"}
    # Seeded: the same seed gives the same sequence.
    replay = asyncio.run(_collect(dnsmasq_router(seed=7), "isp.example", 24))
    assert [hop_names(r)[0][0] for r in replay] == first


async def _collect(router: Router, domain: str, count: int) -> list[RouteResult]:
    return [await router.route(domain) for _ in range(count)]


def test_dnsmasq_implicit_mx(dnsmasq_router: Callable[..., Router]) -> None:
    assert hop_names(route(dnsmasq_router(), "plain.example")) == [
        ("plain.example", "127.0.0.9")
    ]


def test_dnsmasq_nxdomain_is_permanent(dnsmasq_router: Callable[..., Router]) -> None:
    result = route(dnsmasq_router(), "nothere.isp.example")
    assert isinstance(result, Failure)
    assert result.permanent and result.dsn_status == "5.1.2"
    assert "does not exist" in result.text


def test_dnsmasq_refusal_is_temporary(dnsmasq_router: Callable[..., Router]) -> None:
    # dnsmasq REFUSES names outside its --local zones (no upstream): try again later.
    result = route(dnsmasq_router(), "elsewhere.example")
    assert isinstance(result, Failure)
    assert not result.permanent and result.dsn_status == "4.4.3"
    assert "REFUSED" in result.text


# -- against the fake ----------------------------------------------------------------


def test_null_mx_is_permanent_556(fake_dns: FakeDNS) -> None:
    fake_dns.add("nomail.example", "MX", "0 .")
    fake_dns.add("nomail.example", "A", "127.0.0.1")  # present, but null MX wins
    result = route(make_router(fake_dns.port), "nomail.example")
    assert result == Failure(
        True, "5.1.10", "556 5.1.10 nomail.example does not accept mail (null MX, RFC 7505)"
    )


def test_dot_among_other_mx_records_is_skipped(fake_dns: FakeDNS) -> None:
    fake_dns.add("mixed.example", "MX", "0 .", "10 mx.mixed.example.")
    fake_dns.add("mx.mixed.example", "A", "127.0.0.5")
    assert hop_names(route(make_router(fake_dns.port), "mixed.example")) == [
        ("mx.mixed.example", "127.0.0.5")
    ]


def test_nxdomain_is_permanent(fake_dns: FakeDNS) -> None:
    result = route(make_router(fake_dns.port), "gone.example")
    assert isinstance(result, Failure)
    assert (result.permanent, result.dsn_status) == (True, "5.1.2")


def test_servfail_is_temporary(fake_dns: FakeDNS) -> None:
    fake_dns.servfail.add("broken.example")
    result = route(make_router(fake_dns.port), "broken.example")
    assert isinstance(result, Failure)
    assert (result.permanent, result.dsn_status) == (False, "4.4.3")
    assert "SERVFAIL" in result.text


def test_timeout_is_temporary(fake_dns: FakeDNS) -> None:
    fake_dns.drop.add("slow.example")
    result = route(make_router(fake_dns.port, dns_lifetime=0.3), "slow.example")
    assert isinstance(result, Failure)
    assert (result.permanent, result.dsn_status) == (False, "4.4.3")
    assert "timed out" in result.text


def test_no_mx_and_no_address_is_permanent(fake_dns: FakeDNS) -> None:
    fake_dns.add("textonly.example", "TXT", '"v=spf1 -all"')
    result = route(make_router(fake_dns.port), "textonly.example")
    assert isinstance(result, Failure)
    assert (result.permanent, result.dsn_status) == (True, "5.1.2")


def test_implicit_mx_uses_both_families_ipv4_first(fake_dns: FakeDNS) -> None:
    fake_dns.add("dual.example", "AAAA", "2001:db8::25")
    fake_dns.add("dual.example", "A", "192.0.2.25")
    assert hop_names(route(make_router(fake_dns.port), "dual.example")) == [
        ("dual.example", "192.0.2.25"),
        ("dual.example", "2001:db8::25"),
    ]


def test_implicit_mx_lookup_failure_is_temporary(fake_dns: FakeDNS) -> None:
    fake_dns.names.add("flaky.example")  # exists, no MX ...
    fake_dns.servfail.add(("flaky.example", "A"))  # ... and its address lookups fail
    fake_dns.drop.add(("flaky.example", "AAAA"))
    result = route(make_router(fake_dns.port, dns_lifetime=0.3), "flaky.example")
    assert isinstance(result, Failure)
    assert (result.permanent, result.dsn_status) == (False, "4.4.3")
    assert fake_dns.queries[0] == ("flaky.example", "MX")


def test_implicit_mx_with_one_family_failing_uses_the_other(fake_dns: FakeDNS) -> None:
    fake_dns.add("partial.example", "A", "127.0.0.3")
    fake_dns.servfail.add(("partial.example", "AAAA"))
    assert hop_names(route(make_router(fake_dns.port), "partial.example")) == [
        ("partial.example", "127.0.0.3")
    ]


def test_mx_host_without_address_is_skipped(fake_dns: FakeDNS) -> None:
    fake_dns.add(
        "half.example", "MX", "5 dead.half.example.", "7 sick.half.example.",
        "10 live.half.example.",
    )
    fake_dns.add("live.half.example", "A", "127.0.0.7")
    fake_dns.servfail.add("sick.half.example")
    assert hop_names(route(make_router(fake_dns.port), "half.example")) == [
        ("live.half.example", "127.0.0.7")
    ]


def test_mx_hosts_all_without_address_is_temporary(fake_dns: FakeDNS) -> None:
    fake_dns.add("hollow.example", "MX", "10 a.hollow.example.", "20 b.hollow.example.")
    fake_dns.servfail.add("b.hollow.example")
    result = route(make_router(fake_dns.port), "hollow.example")
    assert isinstance(result, Failure)
    assert (result.permanent, result.dsn_status) == (False, "4.4.3")
    assert "a.hollow.example" in result.text and "b.hollow.example" in result.text


def test_hops_are_capped(fake_dns: FakeDNS) -> None:
    many = [f"{i} mx{i}.many.example." for i in range(15)]
    fake_dns.add("many.example", "MX", *many)
    for i in range(15):
        fake_dns.add(f"mx{i}.many.example", "A", f"127.0.1.{i}")
    result = route(make_router(fake_dns.port), "many.example")
    names = hop_names(result)
    assert len(names) == MAX_HOPS
    assert names[0] == ("mx0.many.example", "127.0.1.0")  # the best ones are kept


def test_mx_names_sharing_an_address_are_tried_once(fake_dns: FakeDNS) -> None:
    fake_dns.add("twice.example", "MX", "10 a.twice.example.", "20 b.twice.example.")
    fake_dns.add("a.twice.example", "A", "127.0.0.8")
    fake_dns.add("b.twice.example", "A", "127.0.0.8", "127.0.0.9")
    assert [h for _, h in hop_names(route(make_router(fake_dns.port), "twice.example"))] == [
        "127.0.0.8",
        "127.0.0.9",
    ]


def test_static_route_wins_over_mx(fake_dns: FakeDNS) -> None:
    fake_dns.add("isp.example", "MX", "10 mx.isp.example.")
    fake_dns.add("mx.isp.example", "A", "127.0.0.1")
    router = make_router(fake_dns.port, routes={"isp.example": Route("127.0.0.1", 3525)})
    result = route(router, "ISP.example.")
    assert result == Hops([Hop(host="127.0.0.1", port=3525, name="127.0.0.1")])
    assert fake_dns.queries == []


def test_static_route_to_a_smarthost_by_name(fake_dns: FakeDNS) -> None:
    fake_dns.add("smtp.relay.example", "A", "127.0.0.4")
    smarthost = Route("smtp.relay.example", 587, tls="required", auth=("u", "p"))
    router = make_router(fake_dns.port, routes={"isp.example": smarthost})
    assert route(router, "isp.example") == Hops(
        [Hop(host="127.0.0.4", port=587, name="smtp.relay.example", tls="required",
             auth=("u", "p"))]
    )


def test_static_route_to_localhost_needs_no_dns(fake_dns: FakeDNS) -> None:
    router = make_router(fake_dns.port, routes={"isp.example": Route("localhost", 3525)})
    assert hop_names(route(router, "isp.example")) == [
        ("localhost", "127.0.0.1"),
        ("localhost", "::1"),
    ]
    assert fake_dns.queries == []


def test_static_route_host_that_does_not_resolve_is_temporary(fake_dns: FakeDNS) -> None:
    router = make_router(fake_dns.port, routes={"isp.example": Route("typo.example", 25)})
    result = route(router, "isp.example")
    assert isinstance(result, Failure)
    assert (result.permanent, result.dsn_status) == (False, "4.4.3")
    assert "typo.example" in result.text


def test_domain_literals(fake_dns: FakeDNS) -> None:
    router = make_router(fake_dns.port)
    assert route(router, "[192.0.2.1]") == Hops(
        [Hop(host="192.0.2.1", port=MX_PORT, name="192.0.2.1")]
    )
    assert route(router, "[IPv6:2001:DB8:0::1]") == Hops(
        [Hop(host="2001:db8::1", port=MX_PORT, name="2001:db8::1")]
    )
    assert fake_dns.queries == []


def test_local_domain(fake_dns: FakeDNS) -> None:
    assert route(make_router(fake_dns.port), "Corp.Example") == Local()
    assert fake_dns.queries == []


def test_invalid_domain_is_permanent(fake_dns: FakeDNS) -> None:
    result = route(make_router(fake_dns.port), "bad..example")
    assert isinstance(result, Failure) and result.permanent


def test_internationalized_domain_is_looked_up_as_a_labels(fake_dns: FakeDNS) -> None:
    fake_dns.add("xn--bcher-kva.example", "A", "127.0.0.6")
    assert hop_names(route(make_router(fake_dns.port), "bücher.example")) == [
        ("xn--bcher-kva.example", "127.0.0.6")
    ]


def test_answers_are_cached_for_their_ttl(fake_dns: FakeDNS) -> None:
    fake_dns.add("cached.example", "MX", "10 mx.cached.example.")
    fake_dns.add("mx.cached.example", "A", "127.0.0.1")
    router = make_router(fake_dns.port)
    asyncio.run(_collect(router, "cached.example", 3))
    # One MX, one A and one (empty, negatively cached) AAAA lookup for three routes.
    assert sorted(fake_dns.queries) == [
        ("cached.example", "MX"),
        ("mx.cached.example", "A"),
        ("mx.cached.example", "AAAA"),
    ]


def test_zero_ttl_answers_are_not_cached(fake_dns: FakeDNS) -> None:
    fake_dns.add("fresh.example", "A", "127.0.0.1", ttl=0)
    fake_dns.add("fresh.example", "MX", "10 fresh.example.", ttl=0)
    router = make_router(fake_dns.port)
    asyncio.run(_collect(router, "fresh.example", 2))
    assert fake_dns.queries.count(("fresh.example", "MX")) == 2
    assert fake_dns.queries.count(("fresh.example", "A")) == 2


def test_cache_life_is_capped(fake_dns: FakeDNS) -> None:
    fake_dns.add("long.example", "A", "127.0.0.1", ttl=86400)
    router = make_router(fake_dns.port, max_cache_ttl=0)
    asyncio.run(_collect(router, "long.example", 2))
    assert fake_dns.queries.count(("long.example", "A")) == 2


# -- RFC 5321 5.1: never relay to ourselves -----------------------------------------


@pytest.fixture
def three_mx(fake_dns: FakeDNS) -> FakeDNS:
    fake_dns.add(
        "loop.example", "MX", "10 mx1.loop.example.", "20 mx2.loop.example.",
        "30 mx3.loop.example.",
    )
    for i in (1, 2, 3):
        fake_dns.add(f"mx{i}.loop.example", "A", f"127.0.2.{i}")
    return fake_dns


def test_mx_records_not_better_than_ourselves_are_dropped(three_mx: FakeDNS) -> None:
    router = make_router(three_mx.port, own_hostname="MX2.loop.example")
    assert hop_names(route(router, "loop.example")) == [("mx1.loop.example", "127.0.2.1")]
    by_address = make_router(three_mx.port, own_endpoints=[("127.0.2.2", MX_PORT)])
    assert hop_names(route(by_address, "loop.example")) == [("mx1.loop.example", "127.0.2.1")]


def test_our_own_address_on_another_port_is_not_ourselves(three_mx: FakeDNS) -> None:
    router = make_router(three_mx.port, own_endpoints=[("127.0.2.1", MX_PORT + 1)])
    assert len(hop_names(route(router, "loop.example"))) == 3


def test_best_mx_is_ourselves_is_a_loop(three_mx: FakeDNS) -> None:
    router = make_router(three_mx.port, own_hostname="mx1.loop.example")
    result = route(router, "loop.example")
    assert isinstance(result, Failure)
    assert (result.permanent, result.dsn_status) == (True, "5.4.6")


def test_implicit_mx_pointing_at_ourselves_is_a_loop(fake_dns: FakeDNS) -> None:
    fake_dns.add("self.example", "A", "127.0.0.1")
    router = make_router(fake_dns.port, own_endpoints=[("127.0.0.1", MX_PORT)])
    result = route(router, "self.example")
    assert isinstance(result, Failure) and result.dsn_status == "5.4.6"


def test_the_relays_router_from_its_config(fake_dns: FakeDNS, tmp_path: Path) -> None:
    """The server builds its router from the config (server.relay.router_options)."""
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:2525"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{fake_dns.port}"]\n'
        '[routes]\n"isp.example" = "127.0.0.1:3525"\n'
        "[relay]\nmx_port = 2525\n"
    )
    router = Router(router_options(load_config(tmp_path)), lambda d: d == "corp.example")
    fake_dns.add("other.example", "MX", "10 mx.other.example.")
    fake_dns.add("mx.other.example", "A", "127.0.0.2")
    fake_dns.add("self.example", "MX", "10 mx.self.example.")
    fake_dns.add("mx.self.example", "A", "127.0.0.1")  # our own smtp listener

    async def main() -> list[RouteResult]:
        return [
            await router.route(d)
            for d in ("corp.example", "isp.example", "other.example", "self.example")
        ]

    local, static, other, self_ = asyncio.run(main())
    assert local == Local()
    assert static == Hops([Hop(host="127.0.0.1", port=3525, name="127.0.0.1")])
    assert other == Hops([Hop(host="127.0.0.2", port=2525, name="mx.other.example")])
    assert isinstance(self_, Failure) and self_.dsn_status == "5.4.6"
