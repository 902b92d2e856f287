"""Build hook of the daemon's distribution (the rest is in pyproject.toml).

The web console ships inside the package: building a wheel (``pip install .``)
bundles console/ and the editor files from console/node_modules (``npm ci``, as
scripts/_setup.sh runs it) into ``strongroomd/console/``. Editable installs
serve the source tree's console/ instead, so they bundle nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _console_module():
    # By file: the package's __init__ must not be needed to build it.
    spec = importlib.util.spec_from_file_location(
        "_strongroomd_console", ROOT / "daemon" / "strongroomd" / "_console.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithConsole(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "strongroomd" / "console"
        _console_module().bundle(ROOT / "console", dest)


setup(cmdclass={"build_py": BuildWithConsole})
