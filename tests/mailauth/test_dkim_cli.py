"""`postroom dkim` and `postroom dns` as an administrator runs them; `dns check` against a
DNS server on loopback with right, missing and wrong records."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnszone import TestDNS, serve_dns

from postroom.cli import main
from postroom.mailauth.keys import KeyStore

ADDRESS = "192.0.2.25"


def run(capsys: pytest.CaptureFixture[str], data: Path, *args: str) -> tuple[int, str, str]:
    status = main(["--data", str(data), *args])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(name="dns")
def dns_fixture() -> Iterator[TestDNS]:
    with serve_dns() as server:
        yield server


@pytest.fixture(name="data")
def data_fixture(tmp_path: Path, dns: TestDNS) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
        f'[listen]\nsmtp = "{ADDRESS}:25"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n')
    return data


def test_dkim_add_writes_a_private_key_and_prints_its_record(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    status, out, err = run(capsys, data, "dkim", "add", "corp.example", "--selector", "s1")
    assert (status, err) == (0, "")
    (key,) = KeyStore(data).all()
    assert key.path.parent == data / "dkim" / "corp.example"
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "dkim").stat().st_mode) == 0o700
    assert key.path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert key.private_key().key_size == 2048  # type: ignore[union-attr]
    assert "s1._domainkey.corp.example.\tIN\tTXT\t( \"v=DKIM1; k=rsa; p=" in out
    # The record is the key's, split into 255-octet strings.
    record = out.split("TXT\t( ")[1].split(" )")[0]
    assert "".join(part.strip('"') for part in record.split('" "')) == key.txt()


def test_dkim_add_refuses_what_it_cannot_do(capsys: pytest.CaptureFixture[str],
                                            data: Path) -> None:
    assert run(capsys, data, "dkim", "add", "corp.example", "--selector", "s1")[0] == 0
    status, _out, err = run(capsys, data, "dkim", "add", "corp.example", "--selector", "S1")
    assert status == 2 and "already has a key with selector 's1'" in err
    status, _out, err = run(capsys, data, "dkim", "add", "other.example")
    assert status == 2 and "not a local domain" in err
    status, _out, err = run(capsys, data, "dkim", "add", "corp.example", "--selector", "a_b")
    assert status == 2 and "not a usable selector" in err
    assert len(KeyStore(data).all()) == 1


def test_rotation_add_retire_delete(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    run(capsys, data, "dkim", "add", "corp.example", "--selector", "old")
    run(capsys, data, "dkim", "add", "corp.example", "--selector", "new")
    run(capsys, data, "dkim", "add", "corp.example", "--selector", "ed", "--algorithm",
        "ed25519")
    status, out, _err = run(capsys, data, "dkim", "list")
    assert status == 0
    rows = [line.split("\t")[:4] for line in out.splitlines()]
    assert rows == [["corp.example", "ed", "ed25519", "active"],
                    ["corp.example", "new", "rsa-2048", "active"],
                    ["corp.example", "old", "rsa-2048", "active"]]
    status, _out, err = run(capsys, data, "dkim", "del", "corp.example", "old")
    assert status == 2 and "retire it first" in err
    status, out, _err = run(capsys, data, "dkim", "retire", "corp.example", "old")
    assert status == 0 and "retired rsa key old" in out
    assert [k.selector for k in KeyStore(data).active("corp.example")] == ["ed", "new"]
    status, out, _err = run(capsys, data, "dkim", "list", "corp.example")
    assert "corp.example\told\trsa-2048\tretired" in out
    # The retired key's record is no longer asked for; a note says to remove it later.
    status, out, _err = run(capsys, data, "dns", "records", "corp.example")
    assert "old._domainkey" not in out and "DKIM key old is retired" in out
    assert run(capsys, data, "dkim", "del", "corp.example", "old")[0] == 0
    assert [k.selector for k in KeyStore(data).all()] == ["ed", "new"]
    status, _out, err = run(capsys, data, "dkim", "retire", "corp.example", "old")
    assert status == 2 and "no active key" in err


def test_dns_records_prints_every_record_as_a_zone_snippet(
        capsys: pytest.CaptureFixture[str], data: Path) -> None:
    run(capsys, data, "dkim", "add", "corp.example", "--selector", "s1")
    status, out, _err = run(capsys, data, "dns", "records", "corp.example")
    assert status == 0
    lines = [line for line in out.splitlines() if line and not line.startswith(";")]
    assert lines[0] == "corp.example.\tIN\tMX\t10 mx.corp.example."
    assert lines[1] == f"mx.corp.example.\tIN\tA\t{ADDRESS}"
    assert lines[2] == f'corp.example.\tIN\tTXT\t"v=spf1 mx ip4:{ADDRESS} -all"'
    assert lines[3].startswith("s1._domainkey.corp.example.\tIN\tTXT\t")
    assert lines[4] == ('_dmarc.corp.example.\tIN\tTXT\t"v=DMARC1; p=none; adkim=r; aspf=r; '
                        'rua=mailto:postmaster@corp.example"')
    assert "tighten p=none to p=quarantine, then p=reject" in out
    assert "; optional: TLS-RPT" in out
    assert '; _mta-sts.corp.example.\tIN\tTXT\t"v=STSv1; id=1"' in out


def publish_all(dns: TestDNS, data: Path) -> None:
    (key,) = KeyStore(data).all()
    dns.set("corp.example", "MX", ["10 mx.corp.example"])
    dns.set("mx.corp.example", "A", [ADDRESS])
    dns.set("corp.example", "TXT", [f"v=spf1 mx ip4:{ADDRESS} -all"])
    dns.set(key.record_name, "TXT", [key.txt()])
    dns.set("_dmarc.corp.example", "TXT", ["v=DMARC1; p=none"])


def test_dns_check_is_ready_when_every_record_is_right(
        capsys: pytest.CaptureFixture[str], data: Path, dns: TestDNS) -> None:
    run(capsys, data, "dkim", "add", "corp.example", "--selector", "s1")
    publish_all(dns, data)
    status, out, _err = run(capsys, data, "dns", "check", "corp.example")
    assert status == 0, out
    assert [line.split()[0] for line in out.splitlines()] == [
        "ok", "ok", "ok", "ok", "ok", "optional", "corp.example"]
    assert out.splitlines()[-1] == "corp.example is ready to send and receive mail"


@pytest.mark.parametrize(("name", "rtype", "value", "verdict"), [
    ("corp.example", "MX", None, "MISSING  MX corp.example: publish: corp.example.\tIN\tMX\t"
                                 "10 mx.corp.example."),
    ("corp.example", "MX", ["10 mx.elsewhere.example"], "WRONG    MX corp.example: found "
                                                        "10 mx.elsewhere.example."),
    ("mx.corp.example", "A", ["192.0.2.99"], "WRONG    A mx.corp.example: found 192.0.2.99"),
    ("corp.example", "TXT", None, "MISSING  TXT corp.example: publish"),
    ("corp.example", "TXT", ["v=spf1 +all"], "WRONG    TXT corp.example: found v=spf1 +all "
                                             "(allows every host"),
    ("corp.example", "TXT", ["v=spf1 ip4:198.51.100.1 -all"], "(does not authorize this host)"),
    ("corp.example", "TXT", ["v=spf1 mx -all", "v=spf1 a -all"], "2 records where one is "
                                                                  "allowed"),
    ("s1._domainkey.corp.example", "TXT", None, "MISSING  TXT s1._domainkey.corp.example"),
    ("s1._domainkey.corp.example", "TXT", ["v=DKIM1; k=rsa; p=MIIBIjAN"], "(another key)"),
    ("_dmarc.corp.example", "TXT", None, "MISSING  TXT _dmarc.corp.example: publish"),
    ("_dmarc.corp.example", "TXT", ["v=DMARC1; p=maybe"], "(p= must be none, quarantine or "
                                                          "reject)"),
], ids=["mx missing", "mx elsewhere", "address", "spf missing", "spf +all", "spf other host",
        "two spf", "dkim missing", "dkim other key", "dmarc missing", "dmarc bad policy"])
def test_dns_check_says_what_is_missing_or_wrong(
        capsys: pytest.CaptureFixture[str], data: Path, dns: TestDNS, name: str, rtype: str,
        value: list[str] | None, verdict: str) -> None:
    run(capsys, data, "dkim", "add", "corp.example", "--selector", "s1")
    publish_all(dns, data)
    dns.set(name, rtype, value)
    status, out, _err = run(capsys, data, "dns", "check", "corp.example")
    assert status == 1
    assert verdict in out, out
    assert "is ready" not in out


def test_dns_check_without_an_answer_is_not_ready(
        capsys: pytest.CaptureFixture[str], data: Path, dns: TestDNS) -> None:
    run(capsys, data, "dkim", "add", "corp.example", "--selector", "s1")
    publish_all(dns, data)
    dns.silent.add("_dmarc.corp.example")
    status, out, _err = run(capsys, data, "dns", "check", "corp.example")
    assert status == 1
    assert "UNKNOWN  TXT _dmarc.corp.example: TXT lookup of _dmarc.corp.example" in out


def test_dns_check_without_a_key_says_to_make_one(
        capsys: pytest.CaptureFixture[str], data: Path, dns: TestDNS) -> None:
    status, out, _err = run(capsys, data, "dns", "check", "corp.example")
    assert status == 1
    assert "MISSING  DKIM key: make one with `postroom dkim add corp.example`" in out


def test_a_wildcard_listener_asks_only_that_the_host_has_an_address(
        capsys: pytest.CaptureFixture[str], data: Path, dns: TestDNS) -> None:
    config = data / "postroom.toml"
    config.write_text(config.read_text().replace(f'smtp = "{ADDRESS}:25"', 'smtp = "0.0.0.0:25"'))
    run(capsys, data, "dkim", "add", "corp.example", "--selector", "s1")
    status, out, _err = run(capsys, data, "dns", "records", "corp.example")
    assert "; mx.corp.example.\tIN\tA\t<address> (or AAAA)" in out
    assert 'corp.example.\tIN\tTXT\t"v=spf1 mx -all"' in out
    publish_all(dns, data)
    dns.set("mx.corp.example", "A", None)
    status, out, _err = run(capsys, data, "dns", "check", "corp.example")
    assert status == 1 and "MISSING  A mx.corp.example" in out
    dns.set("mx.corp.example", "AAAA", ["2001:db8::25"])
    status, out, _err = run(capsys, data, "dns", "check", "corp.example")
    assert status == 0, out
    assert "ok       A mx.corp.example: 2001:db8::25" in out
