"""scripts/install-service: the README's service install, in a scratch root, verified.

There is no running systemd here: the script installs into a scratch root that
holds the host's systemd units (the base system it installs onto), and
``systemd-analyze verify --root=`` checks the unit as shipped against it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "install-service"
UNIT = ROOT / "scripts" / "systemd" / "strongroomd.service"
README = ROOT / "README.md"
HOST_UNITS = Path("/usr/lib/systemd/system")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("the install makes root-owned files and a system user: needs root")
    assert shutil.which("systemd-analyze"), "scripts/_setup.sh installs systemd"
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(HOST_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    out = subprocess.run(
        [str(SCRIPT), "--root", str(root)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return root


def test_unit_as_shipped_verifies_after_the_install(scratch: Path) -> None:
    installed = scratch / "etc/systemd/system/strongroomd.service"
    assert installed.read_text() == UNIT.read_text()
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={scratch}", "strongroomd.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "strongroomd.service" not in proc.stderr, proc.stderr


def test_install_places_files_with_the_documented_owners(scratch: Path) -> None:
    group = next(
        line.split(":") for line in (scratch / "etc/group").read_text().splitlines()
        if line.startswith("strongroom:")
    )  # fmt: skip
    gid = int(group[2])
    assert "strongroom:" in (scratch / "etc/passwd").read_text()

    def owner(path: str) -> tuple[int, int, int]:
        st = (scratch / path).stat()
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert owner("etc/strongroom") == (0, gid, 0o750)
    assert owner("etc/strongroom/strongroomd.toml") == (0, gid, 0o640)
    assert owner("etc/strongroom/pin") == (0, 0, 0o600)
    assert len((scratch / "etc/strongroom/pin").read_text().strip()) >= 24
    daemon = scratch / "opt/strongroom/venv/bin/strongroomd"
    assert os.access(daemon, os.X_OK)
    out = subprocess.run([daemon, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("strongroomd "), out
    site = next((scratch / "opt/strongroom/venv/lib").glob("python*/site-packages"))
    assert (site / "strongroomd/console/index.html").is_file()  # the console ships inside
    assert (site / "strongroom/py.typed").is_file()


def test_readme_and_unit_agree_on_the_install_and_etc_ownership() -> None:
    texts = {"README.md": README.read_text(), "the unit": UNIT.read_text()}
    for name, text in texts.items():
        flat = re.sub(r"[\s#|`]+", " ", text)  # comment lines and table cells alike
        assert "scripts/install-service" in flat, name
        for owner in (
            "/etc/strongroom/ root:strongroom 0750",
            "strongroomd.toml root:strongroom 0640",
            "/etc/strongroom/pin root:root 0600",
        ):
            assert owner in flat, (name, owner)
