from __future__ import annotations

import re
from pathlib import Path

from gateway.core.conf import KNOBS, README, readme_with_knobs, reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    """Regenerate with: python -m gateway.core.conf > docs/CONFIGURATION.md"""
    assert (ROOT / "docs" / "CONFIGURATION.md").read_text() == reference_markdown()


def test_readme_lists_every_knob_with_its_default():
    """Refresh with: python -m gateway.core.conf --readme"""
    readme = (ROOT / "README.md").read_text()
    assert readme == readme_with_knobs(readme)
    for knob in KNOBS:
        assert f"`{knob.env}`" in readme


def test_every_vx11_variable_the_code_reads_is_documented():
    documented = {k.env for k in KNOBS} | {"VX11_VAR_DIR", "VX11_LOG_LEVEL", "VX11_SHUB_UPSTREAM"}
    found: set[str] = set()
    for path in [
        *ROOT.glob("gateway/**/*.py"),
        *ROOT.glob("sessions_ctx7/**/*.py"),
        *ROOT.glob("vx11site/*.py"),
    ]:
        found |= set(re.findall(r"[\"'](VX11_[A-Z0-9_]+)[\"']", path.read_text()))
    found = {name for name in found if not name.startswith("VX11_MODULE_")}
    assert found - documented == set()


def test_the_readme_command_finds_the_projects_readme() -> None:
    """``python -m gateway.core.conf --readme`` rewrites this file, not one beside the module."""
    assert Path(__file__).resolve().parents[2] / "README.md" == README
    assert "<!-- knobs:start -->" in README.read_text()
