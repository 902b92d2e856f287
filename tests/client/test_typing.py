"""The client's types are usable: mypy on typed examples of both clients, and the async stub.

``typing_examples/usage_ok.py`` uses the sync and async clients as an
application would and must check clean (the library itself included: it is
found through MYPYPATH, so its own errors count). ``usage_bad.py`` misuses
them, and mypy must report exactly the lines marked ``# error``: the
results are typed (``EncryptResult.cipher`` is bytes, an un-awaited async
call is a coroutine), not ``Any``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.client import async_stub
from tests.conftest import ROOT

EXAMPLES = Path(__file__).parent / "typing_examples"
MYPY = Path(sys.executable).with_name("mypy")


def _mypy(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            MYPY,
            "--config-file",
            str(ROOT / "client" / "pyproject.toml"),
            "--python-executable",
            sys.executable,
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "--show-error-codes",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT / "client")},
    )


def test_typed_usage_checks_clean(tmp_path: Path) -> None:
    r = _mypy(EXAMPLES / "usage_ok.py", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout


def test_misuse_is_caught_line_by_line(tmp_path: Path) -> None:
    path = EXAMPLES / "usage_bad.py"
    lines = path.read_text().splitlines()
    marked = {i for i, line in enumerate(lines, 1) if line.endswith("  # error")}
    r = _mypy(path, tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    reported = {int(m[1]) for m in re.finditer(r"usage_bad\.py:(\d+): error", r.stdout)}
    assert reported == marked, r.stdout
    assert 'has no attribute "cipher"' in r.stdout and 'Maybe you forgot to use "await"' in r.stdout


def test_async_stub_is_current() -> None:
    assert async_stub.STUB.read_text() == async_stub.render(), (
        "client/strongroom/_async_resources.pyi is out of date with _resources.py: "
        "run .venv/bin/python -m tests.client.async_stub"
    )


def test_async_namespaces_are_the_sync_classes_at_run_time() -> None:
    import strongroom._async_resources as runtime
    import strongroom._resources as resources

    stubbed = set(re.findall(r"^class (Async\w+):", async_stub.STUB.read_text(), re.M))
    assert stubbed == set(runtime.__all__)
    for name in stubbed:
        assert getattr(runtime, name) is getattr(resources, name.removeprefix("Async"))
