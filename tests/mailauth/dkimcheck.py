"""Checks of DKIM signatures for the tests: dkimpy with keys from a dict, and the peers
(Perl Mail::DKIM, OpenDKIM) against the DNS server of dnszone.py on loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import dkim

from postroom.mailauth.keys import DKIMKey

MAIL_DKIM_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
my $res = Net::DNS::Resolver->new(config_file => '/dev/null', nameservers => ['127.0.0.1'],
                                  port => $ARGV[0]);
Mail::DKIM::DNS::resolver($res);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (<STDIN>) { s/\r?\n\z/\015\012/; $dkim->PRINT($_); }
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
  print $sig->domain, " ", $sig->selector, " ", $sig->algorithm, " ", $sig->result, "\n";
}
"""


def records(*keys: DKIMKey) -> dict[tuple[str, str], list[str]]:
    return {(k.record_name, "TXT"): [k.txt()] for k in keys}


def dkimpy_verify(message: bytes, *keys: DKIMKey, index: int = 0) -> bool:
    """Signature number `index` verifies with dkimpy (rsa; its ed25519 needs PyNaCl)."""
    txt = {f"{k.record_name}.".encode(): k.txt().encode() for k in keys}
    try:
        return bool(dkim.DKIM(message).verify(index,
                                              dnsfunc=lambda name, timeout=5: txt.get(name)))
    except dkim.DKIMException:  # a body hash that differs, for one
        return False


def mail_dkim(perl: str, message: bytes, dns_port: int) -> list[str]:
    """Mail::DKIM's verdict per signature: "DOMAIN SELECTOR ALGORITHM RESULT"."""
    out = subprocess.run([perl, "-e", MAIL_DKIM_VERIFY, str(dns_port)], input=message,
                         capture_output=True, timeout=60, check=True)
    return out.stdout.decode().splitlines()


def opendkim_verify(opendkim: str, folder: Path, message: bytes, dns_port: int) -> str:
    """OpenDKIM's `-t` verdict on the message's first signature (one line).

    Debian's OpenDKIM resolves with libunbound, which must be told to ask a
    loopback server and not to answer the .example names itself.
    """
    (folder / "unbound.conf").write_text(
        "server:\n  do-not-query-localhost: no\n"
        '  local-zone: "example." nodefault\n  domain-insecure: "example."\n'
        f'forward-zone:\n  name: "."\n  forward-addr: 127.0.0.1@{dns_port}\n')
    (folder / "opendkim.conf").write_text(
        f"Mode v\nSyslog no\nResolverConfiguration {folder}/unbound.conf\n")
    (folder / "message.eml").write_bytes(message)
    out = subprocess.run([opendkim, "-x", str(folder / "opendkim.conf"), "-t",
                          str(folder / "message.eml")], capture_output=True, timeout=60)
    return (out.stdout + out.stderr).decode().strip()
