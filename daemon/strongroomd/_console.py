"""The web console's files: which there are, where they are, how they are bundled.

Two layouts hold them. In the source tree, ``console/`` has the console's own
files and takes the editor (CodeMirror) from ``console/node_modules`` (npm ci,
pinned by ``console/package-lock.json``). In an installed package, the build
(``setup.py``) bundles them as package data into ``strongroomd/console/``, flat:
the console's files and ``vendor/``. The gateway serves whichever it finds,
the bundle first, so every install form serves the console.
"""

from __future__ import annotations

import shutil
from pathlib import Path

#: The console's own files.
FILES = ("index.html", "app.js", "style.css")
#: ``vendor/<name>`` -> its path under ``node_modules`` in the source tree.
VENDOR = {
    "codemirror.js": "codemirror/lib/codemirror.js",
    "codemirror.css": "codemirror/lib/codemirror.css",
    "lua.js": "codemirror/mode/lua/lua.js",
    "matchbrackets.js": "codemirror/addon/edit/matchbrackets.js",
}
#: The bundle inside the installed package, and the source tree's folder.
PACKAGED = Path(__file__).resolve().parent / "console"
SOURCE = Path(__file__).resolve().parents[2] / "console"


def default_dir() -> Path:
    """The bundled console when the package has one, else the source tree's."""
    return PACKAGED if (PACKAGED / "index.html").is_file() else SOURCE


def resolve(console_dir: Path, name: str) -> Path | None:
    """The file behind ``/console/<name>`` (it may be missing), or None: not a console file."""
    if name in ("", "index.html"):
        return console_dir / "index.html"
    if name in FILES:
        return console_dir / name
    vendor = name.removeprefix("vendor/")
    if name.startswith("vendor/") and vendor in VENDOR:
        bundled = console_dir / "vendor" / vendor
        return bundled if bundled.is_file() else console_dir / "node_modules" / VENDOR[vendor]
    return None


def bundle(source: Path, dest: Path) -> list[Path]:
    """Copy the console from a source tree's ``console/`` into the flat layout at ``dest``."""
    missing = [source / f for f in FILES if not (source / f).is_file()]
    missing += [source / "node_modules" / p for p in VENDOR.values()]
    missing = [p for p in missing if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"console files missing: {', '.join(map(str, missing))} "
            "(run npm ci in console/, as scripts/_setup.sh does)"
        )
    (dest / "vendor").mkdir(parents=True, exist_ok=True)
    written = []
    for f in FILES:
        written.append(Path(shutil.copyfile(source / f, dest / f)))
    for name, path in VENDOR.items():
        written.append(
            Path(shutil.copyfile(source / "node_modules" / path, dest / "vendor" / name))
        )
    return written
