"""A throw-away PostgreSQL for tests: Debian's binaries, run by the tests.

``initdb`` and ``postgres`` run as an unprivileged user (PostgreSQL refuses to
run as root, and CI runs as root): ``strongroom-test-pg``, a system user made
here when missing; as a non-root user, the tests' own user. The cluster lives
in a temporary directory that user owns, listens on a free loopback port and a
socket in that directory, trusts local connections (a test database on
loopback only), and is never a system service.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "strongroom-test-pg"


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (scripts/_setup.sh installs it)")
    return Path(found[-1]).parent


def _user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        return pwd.getpwuid(os.getuid())
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        # Two test workers may both get here: whichever useradd loses, the user exists.
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=False,
            capture_output=True,
        )
        return pwd.getpwnam(USER)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One cluster: :meth:`start`, :meth:`stop` (fast shutdown), :meth:`destroy`."""

    def __init__(self) -> None:
        self.bin = _bindir()
        self.user = _user()
        self.dir = Path(tempfile.mkdtemp(prefix="strongroom-pg-"))
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "postgres.log"
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "strongroom",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ]
        )

    def _run(self, args: list[str]) -> None:
        subprocess.run(
            args,
            user=self.user.pw_uid,
            group=self.user.pw_gid,
            check=True,
            capture_output=True,
            cwd=self.dir,
        )

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://strongroom@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - the server's stderr for its life
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            user=self.user.pw_uid,
            group=self.user.pw_gid,
            stdout=log,
            stderr=log,
            cwd=self.dir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited:\n" + self.log.read_text()[-2000:])
            r = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
                check=False,
            )
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("postgres did not start:\n" + self.log.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: ends every session
            self.proc.wait(60)
        self.proc = None

    def create_db(self, name: str) -> str:
        self._run(
            [
                str(self.bin / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "strongroom",
                name,
            ]
        )
        return self.url(name)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
