"""The CLI against the session daemon, as the admin."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from strongroom._cli import cli


@pytest.fixture
def sr(daemon, tmp_path):
    """Run ``strongroom ARGS`` in-process; asserts the exit code (0 unless ``code``)."""
    keyfile = tmp_path / "admin.key"
    keyfile.write_text(daemon.admin_key)
    env = {"STRONGROOM_SOCKET": str(daemon.socket), "STRONGROOM_API_KEY": None,
           "STRONGROOM_API_KEY_FILE": str(keyfile), "STRONGROOM_STATE_DIR": None}  # fmt: skip

    def run(*args: str, input: bytes | None = None, code: int = 0, env_: dict | None = None):
        result = CliRunner().invoke(
            cli, list(args), env={**env, **(env_ or {})}, input=input, prog_name="strongroom"
        )
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return run
