"""requirements.lock (what `make` installs) agrees with pyproject.toml (what `pip install` resolves)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def locked_versions() -> dict[str, str]:
    """Name -> pinned version of every package in requirements.lock; each pin carries a hash."""
    text = (ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text)
    pins = {}
    for entry in entries:
        match = PIN.match(entry)
        if match:
            assert "--hash=sha256:" in entry, f"requirements.lock: {match[1]} has no hash"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_every_declared_dependency_is_locked_at_a_version_its_range_admits():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = locked_versions()
    assert len(pins) > 100  # the whole environment, transitive dependencies included
    for line in declared:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {requirement}: run `make lock`"
        )


def test_the_lock_names_no_machine_specific_index():
    text = (ROOT / "requirements.lock").read_text()
    assert "--extra-index-url" not in text and "--find-links" not in text and "file://" not in text
