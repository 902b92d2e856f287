"""The error class decides the status; the wire's code table agrees with it."""

from __future__ import annotations

import pytest
from strongroom.wire import CODES
from strongroomd import errors


def test_every_code_has_one_class_and_the_same_status_as_on_the_wire() -> None:
    assert set(errors.BY_CODE) | {"plugin_error"} == set(CODES)
    for code, cls in errors.BY_CODE.items():
        assert cls.status == CODES[code], code
        assert cls(code=code).status == CODES[code]


def test_a_code_outside_its_class_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot carry code"):
        errors.BadRequest("x", code="name_exists")
    with pytest.raises(ValueError):
        errors.Forbidden("x", code="busy")
    assert errors.Conflict("x", code="name_exists").status == 409


def test_codes_reported_by_the_sandbox_become_their_class() -> None:
    assert isinstance(errors.from_code("time_limit", "slow"), errors.TimeLimit)
    assert errors.from_code("memory_limit", "big").status == 413
    assert errors.from_code("no such code", "?").status == 500
    own = errors.PluginError("teapot", 418, "short_and_stout")
    assert (own.status, own.body()["error"]) == (418, "short_and_stout")


def test_no_raise_in_the_daemon_names_a_code_outside_its_class() -> None:
    """A static check of every ``Class(..., code="...")`` in the daemon's source."""
    import re
    from pathlib import Path

    root = Path(errors.__file__).parent
    pattern = re.compile(r'\b([A-Z][A-Za-z]+)\((?:[^()]|\([^()]*\))*?code="(\w+)"', re.S)
    wrong = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for m in pattern.finditer(text):
            cls = getattr(errors, m.group(1), None)
            known = isinstance(cls, type) and issubclass(cls, errors.ApiError)
            if known and m.group(2) not in cls.codes:
                wrong.append(f"{path.name}:{text[: m.start()].count(chr(10)) + 1}")
    assert wrong == []
