"""Builds the MX listener's mail checks (postroom.mailauth) from the [dmarc] and [dns] config."""

from __future__ import annotations

import logging

import dns.exception

from postroom.config import Config
from postroom.mailauth.checks import MailChecks
from postroom.mailauth.policy import CheckPolicy
from postroom.resolver import make_resolver

log = logging.getLogger("postroom.master")


def mail_checks(config: Config) -> MailChecks | None:
    """The checks of the smtp listener; None when [dmarc] check is off, or when no
    DNS resolver can be made (said in the log: mail is then taken unchecked)."""
    settings = config.dmarc
    if not settings.check:
        return None
    try:
        resolver = make_resolver(config.dns.nameservers)
    except dns.exception.DNSException as e:
        log.warning("mail checks off: no DNS resolver configured (%s); set [dns] nameservers", e)
        return None
    policy = CheckPolicy(
        enforce=settings.enforce,
        junk_folder=settings.junk_folder,
        inbox_quarantine_domains=settings.inbox_quarantine_domains,
        no_reject_domains=settings.no_reject_domains,
        dns_errors=settings.dns_errors,
        trusted_arc_sealers=settings.trusted_arc_sealers,
    )
    return MailChecks(resolver, config.hostname, policy, tuple(settings.ignore_clients))
