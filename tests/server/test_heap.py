"""server.heap: on glibc the malloc thresholds are fixed, so a session's large blocks
are mapped on their own and unmapped when freed (BENCHMARKS.md, POP3 login on a big
maildrop), and malloc_trim is at hand."""

from __future__ import annotations

import platform

import pytest

from postroom.server import heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt and malloc_trim")
def test_glibc_thresholds_are_fixed_and_trim_is_available() -> None:
    assert heap.fix_thresholds()
    assert heap.release()
