"""The new user's first hour: the README's command blocks, run in order.

Each block the README marks with ``<!-- readme-test: sh -->`` (or
``python``) runs here, in the README's order, against a daemon started on a
fresh state directory, from a scratch directory where ``var`` is that state
directory and ``.venv`` the project's, as a user following the README would
have them. ``(in DIR)`` in the marker runs the block with DIR's files at
hand. A block fails the test when it exits non-zero or prints a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_daemon

MARK = re.compile(
    r"<!-- readme-test: (sh|python)(?: \(in ([\w./-]+)\))? -->\n```\w*\n(.*?)```", re.S
)


def blocks() -> list[tuple[str, str | None, str]]:
    return [(m[1], m[2], m[3]) for m in MARK.finditer((ROOT / "README.md").read_text())]


def test_readme_marks_its_blocks() -> None:
    kinds = [kind for kind, _, _ in blocks()]
    assert kinds.count("sh") >= 2 and "python" in kinds


def test_readme_blocks_run(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, "var")
    try:
        home = tmp_path  # var/ is the daemon's state directory
        (home / ".venv").symlink_to(ROOT / ".venv")
        env = {
            **os.environ,
            "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
            "STRONGROOM_STATE_DIR": str(daemon.state_dir),
        }
        for name in ("STRONGROOM_SOCKET", "STRONGROOM_API_KEY", "STRONGROOM_API_KEY_FILE"):
            env.pop(name, None)
        exports = ""  # what earlier blocks exported, as a user's shell keeps it
        for i, (kind, where, code) in enumerate(blocks()):
            cwd = home
            if where:
                cwd = tmp_path / f"block{i}"
                shutil.copytree(ROOT / where, cwd)
                (cwd / "var").symlink_to(daemon.state_dir)
            if kind == "sh":
                script = f"set -eu -o pipefail\n{exports}{code}"
                args = ["bash", "-c", script]
                exports += "".join(
                    line + "\n" for line in code.splitlines() if line.startswith("export ")
                )
            else:
                args = [sys.executable, "-c", code]
                env["STRONGROOM_API_KEY_FILE"] = str(daemon.state_dir / "admin.key")
            r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
            shown = (
                f"README block {i + 1} ({kind}):\n{code}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
            )
            assert r.returncode == 0, shown
            assert "Traceback" not in r.stdout + r.stderr, shown
    finally:
        assert daemon.stop() == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
