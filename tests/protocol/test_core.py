"""What the four protocol cores share (_core): one sentinel, one error pair, one state writer."""

from __future__ import annotations

import ast
import inspect
from types import ModuleType

import pytest

from postroom.protocol import _core, pop3_client, pop3_server, smtp_client, smtp_server
from postroom.protocol._core import NEED_DATA, PAUSED, LocalProtocolError, RemoteProtocolError

CORES = (smtp_server, pop3_server, smtp_client, pop3_client)


def test_one_sentinel_for_all_cores() -> None:
    for core in CORES:
        assert core.NEED_DATA is NEED_DATA
    assert smtp_server.PAUSED is pop3_server.PAUSED is PAUSED
    assert repr(NEED_DATA) == "NEED_DATA" and repr(PAUSED) == "PAUSED"


def test_one_error_pair_for_all_cores() -> None:
    for core in CORES:
        assert core.LocalProtocolError is LocalProtocolError
    for core in (smtp_client, pop3_client):
        assert core.RemoteProtocolError is RemoteProtocolError
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


@pytest.mark.parametrize("module", [smtp_server, pop3_server, _core])
def test_the_state_has_one_writer(module: ModuleType) -> None:
    """Only `__init__` (the first state) and `_move` (through the table) assign
    `self._state`; the client cores inherit both from _core.ClientCore."""
    writers = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                targets = inner.targets if isinstance(inner, ast.Assign) else (
                    [inner.target] if isinstance(inner, ast.AnnAssign | ast.AugAssign) else [])
                for target in targets:
                    if (isinstance(target, ast.Attribute) and target.attr == "_state"
                            and isinstance(target.value, ast.Name) and target.value.id == "self"):
                        writers.add(node.name)
    assert writers == {"__init__", "_move"}
    for client in (smtp_client, pop3_client):
        assert "self._state =" not in inspect.getsource(client)


def test_an_illegal_move_names_state_and_trigger() -> None:
    with pytest.raises(LocalProtocolError, match="'tls_started' is not allowed in state GREETING"):
        pop3_server.POP3Server().tls_started()
    server = smtp_server.SMTPServer(smtp_server.SMTPServerConfig(hostname="mx.example"))
    with pytest.raises(LocalProtocolError, match="'tls_started' is not allowed in state connected"):
        server.tls_started()
    assert server.state is smtp_server.State.CONNECTED  # the refused call changed nothing


def test_a_state_prints_as_its_value() -> None:
    assert str(smtp_server.State.READY) == "ready"
    assert f"{smtp_client.State.IN_MAIL}" == "mail"
    assert str(pop3_server.State.TRANSACTION) == "TRANSACTION"
