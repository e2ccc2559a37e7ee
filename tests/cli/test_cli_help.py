"""Help text and choices: flags look like flags, fixed choices are listed, presets sort naturally."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.presets import list_presets

COMMANDS = ["init", "check", "tag", "bucket", "cache", "train", "resize", "merge", "report"]


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_flags_show_no_value(name: str | None) -> None:
    text = help_text(*([name] if name else []))
    assert "<bool>" not in text
    assert "--help" in text


def test_fixed_choices_are_listed() -> None:
    assert "<auto|cpu|cuda>" in help_text("cache")
    assert "<text|table|json|github>" in help_text("check")
    for name in COMMANDS:
        assert "<str>" not in help_text(name), name


def test_init_lists_presets_in_natural_order() -> None:
    names = [p.name for p in list_presets()]
    assert names.index("char-8gb") < names.index("char-12gb") < names.index("char-24gb")
    assert names.index("style-12gb") < names.index("style-24gb")
    listed = help_listing()
    assert listed.index("char-8gb") < listed.index("char-12gb") < listed.index("char-24gb")


def help_listing() -> str:
    result = CliRunner().invoke(app, ["init", "--list"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    return result.stdout


@pytest.mark.parametrize(
    ("name", "family"), [("sd2-char-12gb", "sd2"), ("sd2v-char-12gb", "sd2-v")]
)
def test_sd2_presets_fit_their_header_budget(name: str, family: str) -> None:
    preset = next(p for p in list_presets() if p.name == name)
    assert preset.family == family and preset.vram == "12 GB"
    assert name in help_listing()
    args = ["check", str(preset.path), "--no-data", "--budget", "header", "--format", "json"]
    result = subprocess.run(
        [sys.executable, "-m", "loraforge", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'"family": "{family}"' in result.stdout
