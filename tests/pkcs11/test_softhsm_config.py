"""softhsm_config/softhsm2.conf is the template the daemon renders."""

from __future__ import annotations

from pathlib import Path

from strongroomd import state

from tests.conftest import ROOT, Daemon


def test_template_file_and_builtin_agree() -> None:
    assert state.SOFTHSM_TEMPLATE == ROOT / "softhsm_config" / "softhsm2.conf"
    assert state.SOFTHSM_TEMPLATE.read_text() == state.BUILTIN_SOFTHSM_TEMPLATE


def test_rendered_into_the_state_dir(daemon: Daemon) -> None:
    text = daemon.softhsm_conf.read_text()
    tokendir = (daemon.state_dir / "softhsm" / "tokens").resolve()
    assert f"directories.tokendir = {tokendir}\n" in text
    assert "objectstore.backend = file\n" in text
    assert "{tokendir}" not in text


def test_fallback_without_the_source_tree(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(state, "SOFTHSM_TEMPLATE", tmp_path / "missing.conf")
    text = state.render_softhsm_conf(tmp_path / "tokens")
    assert f"directories.tokendir = {(tmp_path / 'tokens').resolve()}\n" in text
