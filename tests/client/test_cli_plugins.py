"""`strongroom plugin push|list|invoke|test|delete` against a real strongroomd."""

from __future__ import annotations

import json

from tests.client.test_cli import unique

CODE = 'function run(input)\n  print("doubling", input.x)\n  return {double = input.x * 2}\nend\n'
BROKEN = "function run(input)\n  local t = nil\n  return t.field\nend\n"


def test_push_invoke_update_delete(sr, tmp_path) -> None:
    g = unique("g")
    sr("groups", "create", g)
    name = unique("double")
    file = tmp_path / f"{name}.lua"
    file.write_text(CODE)
    made = json.loads(sr("--json", "plugin", "push", str(file), "--group", g).stdout)
    assert made["name"] == name and made["version"] == 1
    assert name in sr("plugin", "list").stdout
    assert json.loads(sr("plugin", "invoke", name, "--input", '{"x": 21}').stdout) == {"double": 42}
    file.write_text(CODE.replace("* 2", "* 3"))
    again = json.loads(sr("--json", "plugin", "push", str(file), "--group", g).stdout)
    assert again["plugin_id"] == made["plugin_id"] and again["version"] == 2
    assert json.loads(sr("plugin", "invoke", name, "--input", '{"x": 2}').stdout) == {"double": 6}
    sr("plugin", "delete", name)
    assert name not in sr("plugin", "list").stdout


def test_test_prints_result_output_and_traceback(sr, tmp_path) -> None:
    good = tmp_path / "good.lua"
    good.write_text(CODE)
    out = sr("plugin", "test", str(good), "--input", '{"x": 5}').stdout
    assert "doubling\t5" in out and '"double": 10' in out
    bad = tmp_path / "bad.lua"
    bad.write_text(BROKEN)
    res = sr("plugin", "test", str(bad), "--input", "{}", code=1)
    assert "test:3:" in res.stderr and "stack traceback" in res.stderr
    syntax = tmp_path / "syntax.lua"
    syntax.write_text("function run(\n  x = = 1\nend\n")
    res = sr("plugin", "test", str(syntax), code=1)
    assert "syntax_error" in res.stderr and ":2:" in res.stderr
