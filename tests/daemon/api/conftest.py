"""Fixtures shared by the API tests."""

from __future__ import annotations

import pytest

from tests.conftest import Raw
from tests.daemon.api.helpers import new_app, new_group


@pytest.fixture
def world(daemon, admin_raw: Raw):
    """The admin, two groups, and an app in each: (admin, g1, g2, app1, app2)."""
    g1, g2 = new_group(admin_raw), new_group(admin_raw)
    a1 = new_app(daemon, admin_raw, [g1])
    a2 = new_app(daemon, admin_raw, [g2])
    yield admin_raw, g1, g2, a1, a2
    a1.conn.close()
    a2.conn.close()


@pytest.fixture(scope="module")
def env(daemon):
    """The admin and a group of its own, for Lua test runs: (admin, group_id)."""
    admin = Raw(daemon.socket)
    admin.login(daemon.admin_key)
    g = new_group(admin)
    yield admin, g
    admin.close()
