"""Two distributions from one repository (client/pyproject.toml and pyproject.toml).

The client, ``strongroom``, installs alone: its wheel requires msgpack only;
click (the command line) is its ``cli`` extra and cryptography (envelope
files) its ``envelope`` extra, and it needs nothing of the daemon's. Checked
on a wheel built here and installed into a fresh venv that sees only that
wheel and the packages named. Offline: the build backend comes from pip's own
configuration as ``scripts/_setup.sh`` uses it, and the dependencies are the
main venv's installed packages, linked one by one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_daemon

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
DAEMON_ONLY = ("strongroomd", "pkcs11", "lupa", "aiohttp", "cryptography", "sdnotify")


def _requires(wheel: Path, extra: str | None = None) -> list[str]:
    """The wheel's requirements: unconditional ones, or those of ``extra``."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    out = []
    for r in msg.get_all("Requires-Dist") or []:
        req, _, marker = r.partition(";")
        if (extra is None and not marker) or (extra and f'extra == "{extra}"' in marker):
            out.append(req.strip())
    return out


def _name(requirement: str) -> str:
    for i, c in enumerate(requirement):
        if not (c.isalnum() or c in "-_."):
            return requirement[:i].lower()
    return requirement.lower()


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP, "wheel", "-q", "--no-deps", str(ROOT / "client"), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("strongroom-*.whl")
    return wheel


def _venv_with(tmp: Path, wheel: Path, packages: list[str]) -> Path:
    """A venv holding the wheel and, linked from this venv, only ``packages``."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [*PIP, "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    deps = tmp / "deps"
    deps.mkdir()
    for name in packages:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations
        (deps / name).symlink_to(spec.submodule_search_locations[0])
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(f"{deps}\n")
    return venv


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_client_pyproject_declares_msgpack_only() -> None:
    project = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    assert project["name"] == "strongroom"
    assert [_name(r) for r in project["dependencies"]] == ["msgpack"]
    extras = project["optional-dependencies"]
    assert [_name(r) for r in extras["cli"]] == ["click"]
    assert [_name(r) for r in extras["envelope"]] == ["cryptography"]
    assert project["scripts"] == {"strongroom": "strongroom._entry:main"}
    daemon = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert daemon["name"] == "strongroomd"
    # An operator's install (pip install .) has the command and envelope files.
    assert "strongroom[cli,envelope]==0.1.0" in daemon["dependencies"]
    assert "strongroom" not in daemon["scripts"]


def test_client_wheel_needs_no_daemon_package(client_wheel: Path) -> None:
    assert [_name(r) for r in _requires(client_wheel)] == ["msgpack"]
    assert [_name(r) for r in _requires(client_wheel, "cli")] == ["click"]
    assert [_name(r) for r in _requires(client_wheel, "envelope")] == ["cryptography"]
    with zipfile.ZipFile(client_wheel) as z:
        names = z.namelist()
    for name in ("py.typed", "wire.py", "envelope.py", "_async_resources.pyi"):
        assert f"strongroom/{name}" in names, name
    assert not [n for n in names if n.startswith("strongroomd")]
    with zipfile.ZipFile(client_wheel) as z:
        ep = next(n for n in names if n.endswith("entry_points.txt"))
        assert "strongroom = strongroom._entry:main" in z.read(ep).decode()


def test_library_works_with_msgpack_alone(client_wheel: Path, tmp_path: Path, daemon) -> None:
    venv = _venv_with(tmp_path, client_wheel, ["msgpack"])
    code = (
        "import importlib.util, sys, strongroom\n"
        "assert strongroom.__file__.startswith(sys.prefix), strongroom.__file__\n"
        f"with strongroom.Client({str(daemon.socket)!r}, {daemon.admin_key!r}) as c:\n"
        "    assert c.crypto.digest(b'hi', alg='SHA256').digest\n"
        f"absent = [m for m in {(*DAEMON_ONLY, 'click')!r} if importlib.util.find_spec(m)]\n"
        "assert not absent, absent\n"
        "import io\n"
        "from strongroom import EnvelopeError, envelope\n"
        "try:\n"
        "    envelope.encrypt({}, io.BytesIO(), io.BytesIO())\n"
        "except EnvelopeError as exc:\n"
        "    assert exc.code == 'missing_dependency' and 'strongroom[envelope]' in str(exc)\n"
        "print('ok')\n"
    )
    r = subprocess.run(
        [venv / "bin" / "python", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        cwd=tmp_path,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r
    # The command is installed; without click it says how to get it.
    r = subprocess.run(
        [venv / "bin" / "strongroom", "keys", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r
    assert "pip install 'strongroom[cli]'" in r.stderr, r.stderr


def test_cli_runs_with_msgpack_and_click(client_wheel: Path, tmp_path: Path) -> None:
    venv = _venv_with(tmp_path, client_wheel, ["msgpack", "click"])
    cli = venv / "bin" / "strongroom"
    r = subprocess.run(
        [cli, "--help"], capture_output=True, text=True, timeout=60, env=_clean_env(), cwd=tmp_path
    )
    assert r.returncode == 0 and "keys" in r.stdout and "Traceback" not in r.stderr, r
    r = subprocess.run(
        [cli, "--version"], capture_output=True, text=True, timeout=60, env=_clean_env()
    )
    assert r.returncode == 0 and "0.1.0" in r.stdout, r
    # Envelope files need the envelope extra; without it the command says so, before
    # asking the daemon for anything (there is no daemon here).
    (tmp_path / "f").write_bytes(b"data")
    args = [cli, "envelope", "encrypt", "--key", "k", "--in", "f", "--out", "f.env"]
    r = subprocess.run(
        args, capture_output=True, text=True, timeout=60, env=_clean_env(), cwd=tmp_path
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r
    assert r.stderr.startswith("error: missing_dependency: ") and "strongroom[envelope]" in r.stderr
    assert not (tmp_path / "f.env").exists()


# -- the daemon's wheel carries the console -------------------------------------------------


def test_daemon_wheel_bundles_the_console_and_the_gateway_serves_it(
    tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "wheel"
    subprocess.run(
        [*PIP, "wheel", "-q", "--no-deps", str(ROOT), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("strongroomd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        bundled = {
            "strongroomd/console/index.html",
            "strongroomd/console/app.js",
            "strongroomd/console/style.css",
            "strongroomd/console/vendor/codemirror.js",
            "strongroomd/console/vendor/codemirror.css",
            "strongroomd/console/vendor/lua.js",
            "strongroomd/console/vendor/matchbrackets.js",
        }
        assert bundled <= names, sorted(bundled - names)
        assert not [n for n in names if n.startswith("strongroom/")]  # the client's own wheel
        site = tmp_path / "site"
        z.extractall(site)
    # The installed package (not the source tree) is what the daemon runs from here.
    index = site / "strongroomd" / "console" / "index.html"
    index.write_text(index.read_text() + "<!-- from the wheel -->\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    d = start_daemon(tmp_path, config="http_enabled = true\nhttp_port = 0\n")
    try:
        url = (d.state_dir / "http.url").read_text().strip()
        with urllib.request.urlopen(f"{url}/console/", timeout=10) as r:
            assert r.status == 200 and "<!-- from the wheel -->" in r.read().decode()
        with urllib.request.urlopen(f"{url}/console/vendor/lua.js", timeout=10) as r:
            assert r.status == 200 and b"CodeMirror" in r.read()
    finally:
        assert d.stop() == 0
