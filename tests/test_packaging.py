"""The version is written once and reported the same everywhere."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import natgrad

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_single_sourced():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    source = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert source == {"attr": "natgrad.__version__"}
    assert importlib.metadata.version("natgrad") == natgrad.__version__
    assert f"## {natgrad.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_cli_reports_the_version(capsys):
    from natgrad.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"natgrad {natgrad.__version__}"
