"""CLI help texts (issue 15): every default and unit is shown, nothing is swallowed as rich
markup, flags show no misleading `<bool>`; usage errors exit 2."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from tmequant.cli import app, main

runner = CliRunner()


def _commands(cmd=None, path=()):
    cmd = cmd or typer.main.get_command(app)
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, path + (name,))
    else:
        yield path, cmd


COMMANDS = list(_commands())


def _help(path) -> str:
    res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # unwrapped


def test_every_verb_is_covered():
    assert {" ".join(p) for p, _ in COMMANDS} >= {"tile", "predict", "biomarkers", "run", "train",
                                                  "evaluate", "demo", "models list", "models show"}


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_shows_every_default(path, cmd):
    text = _help(path)
    assert "<bool>" not in text
    for p in cmd.params:
        if p.param_type_name != "option" or p.name == "help" or p.required:
            continue
        opt = max(p.opts, key=len)
        assert opt in text, opt
        if p.is_flag:
            continue  # off unless given (or --x/--no-x with its default shown)
        if p.default is None:
            # nothing to show: the help text says what happens without the option
            assert "default" in (p.help or "").lower(), f"{' '.join(path)} {opt}: {p.help!r}"
        else:
            shown = str(p.default) if not isinstance(p.default, (list, tuple)) else ""
            in_help = "default" in (p.help or "").lower() and shown in (p.help or "")
            assert f"[default: {shown}" in text or in_help, f"{' '.join(path)} {opt}"


def test_markup_in_help_is_shown_verbatim():
    text = _help(["biomarkers"])
    assert "[biomarkers] section" in text
    # the ten flag defaults of the biomarkers verb, written as "[default N]" in the help
    assert len(re.findall(r"\[default [0-9]", text)) == 10
    assert "[default 500]" in text and "[default 3000]" in text
    assert "[nucleus_counter]" in _help(["predict"])
    run = _help(["run"])
    assert "[biomarkers], [nucleus_counter], [tiling] and [qc]" in run
    assert "um/px" in run  # units


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "o"), "-m", "x"]) == 2
    assert main(["tile", str(tmp_path), "--out", str(tmp_path / "o"), "--bogus"]) == 2
    assert main(["models", "show", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err
