"""The attacker's harness: the session tests' real servers, clients and workspaces."""

from tests.session.conftest import client, make_server, workspace

__all__ = ["client", "make_server", "workspace"]
