"""One failed token call never poisons later ones (issue 8, case 6).

The cause, in SoftHSM 2.6.1's file backend: a call that cannot open a file
(EMFILE) while it checks the token's generation re-indexes the token
directory, ``opendir`` fails, and the token is marked invalid for the life
of the process; every later token-object creation fails, on every session.
So the token layer refuses such calls while descriptors are short, and if a
call breaks the token anyway, re-initialises the library (see
``strongroomd._token.core``).
"""

from __future__ import annotations

import asyncio
import os
import resource
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from strongroomd._token import Token
from strongroomd._token import core as core_mod
from strongroomd.errors import ApiError, NotFound
from strongroomd.keyref import KeyRef, NewKey

from tests.conftest import Raw, start_daemon, unique
from tests.daemon.api.helpers import new_group, new_key, ok
from tests.daemon.token_fixture import softhsm_token

NOFILE = resource.RLIMIT_NOFILE


@contextmanager
def no_descriptors_left(pid: int) -> Iterator[None]:
    """Process ``pid`` can open no more files until the block ends."""
    soft, hard = resource.prlimit(pid, NOFILE)
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = next(n for n in range(len(used) + 1) if n not in used)
    resource.prlimit(pid, NOFILE, (lowest_free, hard))  # a new fd must be below the limit
    try:
        yield
    finally:
        resource.prlimit(pid, NOFILE, (soft, hard))


def test_a_delete_without_descriptors_leaves_later_creations_working(tmp_path) -> None:
    d = start_daemon(tmp_path, config="inspectable = true\n")  # its /proc/PID/fd is read
    try:
        r = Raw(d.socket)
        r.login(d.admin_key)
        group = new_group(r)
        doomed, kept = new_key(r, group)["kid"], new_key(r, group)["kid"]
        enc = {"key": {"kid": kept}, "alg": "AES", "mode": "GCM", "plain": b"p" * 32}
        ok(r.call("POST", "/crypto/v1/encrypt", enc))
        assert d.proc is not None
        with no_descriptors_left(d.proc.pid):
            # What the answer says about the half-done delete is the keyring's concern.
            r.call("DELETE", f"/crypto/v1/keys/{doomed}")
        # Before the fix every token-object creation answered 500 from here on.
        for _ in range(3):
            new_key(r, group)
        ok(r.call("POST", "/crypto/v1/encrypt", enc))
    finally:
        assert d.stop() == 0, d.log.read_text()[-3000:]


# -- the last resort, in process: a call broke the token despite the check --------------


def _new(obj_type: str, *, transient: bool = False) -> NewKey:
    return NewKey(str(uuid.uuid4()), unique("k"), obj_type, 256, None, False, transient)


def _ref(new: NewKey) -> KeyRef:
    return KeyRef(new.kid, new.obj_type, 256, None, False)


@contextmanager
def _exhausted() -> Iterator[None]:
    """This process can open no more files until the block ends."""
    soft, hard = resource.getrlimit(NOFILE)
    held: list[int] = []
    resource.setrlimit(NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(NOFILE, (soft, hard))


def test_a_token_broken_by_a_failed_call_is_reinitialised(monkeypatch) -> None:
    conf = softhsm_token()
    aes = {"alg": "AES", "mode": "GCM", "plain": b"p" * 32}

    async def main() -> None:
        token = await Token.open(conf.module, conf.label, conf.pin)
        try:
            doomed, kept, short = _new("AES"), _new("AES"), _new("AES", transient=True)
            for new in (doomed, kept, short):
                await token.generate(new)
            await token.encrypt(_ref(kept), aes)
            # The descriptor check passes, then descriptors run out mid-call (another
            # thread took them): the race the check narrows but cannot close.
            answers = iter([True])
            monkeypatch.setattr(core_mod, "fds_free", lambda n: next(answers, False))
            with _exhausted(), pytest.raises(ApiError):
                await token.remove(doomed.kid)
            monkeypatch.undo()
            assert token._core.suspect  # broken, and not yet recovered: no descriptors then
            await token.generate(_new("AES"))  # recovers first, then succeeds
            assert token._core.reopened == 1 and not token._core.suspect
            await token.encrypt(_ref(kept), aes)  # token keys come back from the index
            with pytest.raises(NotFound, match="lost"):
                await token.encrypt(_ref(short), aes)  # transient keys do not
            assert doomed.kid in token.kids()  # the failed delete did not happen
            await token.remove(doomed.kid)
            assert doomed.kid not in token.kids()
        finally:
            await token.close()

    asyncio.run(main())
