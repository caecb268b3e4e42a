"""The ACME keeper's own rules, without a CA: a certificate that would not end the
renewal is refused (else every pass would order another), and the challenge answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from postroom.config import load_config
from postroom.server import acme as keeper_module
from postroom.server.acme import CHALLENGE_PREFIX, CertificateKeeper
from postroom.tlscert import make_self_signed


def keeper(tmp_path: Path) -> CertificateKeeper:
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mx.example.test"\n[tls.acme]\ndirectory = "https://ca.example/dir"\n'
        'retry_after = ["10ms"]\n')
    installed: list[bool] = []
    return CertificateKeeper(load_config(tmp_path), lambda: installed.append(True))


def test_a_certificate_that_is_due_at_once_is_refused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    subject = keeper(tmp_path)
    monkeypatch.setattr(keeper_module, "obtain",
                        lambda request, answers: make_self_signed("mx.example.test"))

    async def scenario() -> bool:
        return await subject.attempt()

    assert asyncio.run(scenario()) is False
    assert subject.failures == 1 and subject.issued == 0
    assert not subject.cert.exists()  # nothing stored


def test_the_challenge_listener_answers_known_tokens_only(tmp_path: Path) -> None:
    subject = keeper(tmp_path)
    subject.answers["tok"] = "tok.thumbprint"

    async def scenario() -> list[tuple[int, bytes]]:
        paths = [f"{CHALLENGE_PREFIX}tok", f"{CHALLENGE_PREFIX}other", "/", "/tok"]
        return [(a.status, a.body) for a in [await subject.answer(p) for p in paths]]

    assert asyncio.run(scenario()) == [(200, b"tok.thumbprint"), (404, b"not found\n"),
                                       (404, b"not found\n"), (404, b"not found\n")]
