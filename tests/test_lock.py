"""The locks, checked without the network: what CI tests is what users of `make` and the Docker image get.

requirements/lock.txt pins every runtime, dev and bench dependency (torch's CPU build) for Python 3.11;
docker/requirements-gpu.txt pins the image's set at the same versions, with the GPU overlay (torch's CUDA
build, faiss-gpu, deepspeed). Both come from `make lock` (requirements/lock.sh); nothing here asks a registry,
so these tests cannot turn red because the registry moved on.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CPU_LOCK = ROOT / "requirements" / "lock.txt"
GPU_LOCK = ROOT / "docker" / "requirements-gpu.txt"
CPU_EXTRAS = ("cpu", "dev", "bench")
FAISS = {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12"}


def read_lock(path: Path) -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"{path.name}:{number}: not an exact pin: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{path.name}:{number}: {name} pinned twice"
        pins[name] = Version(match[2])
    return pins


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize(("lock", "extras"), [(CPU_LOCK, CPU_EXTRAS), (GPU_LOCK, ("gpu",))])
def test_the_lock_pins_every_dependency_of_pyproject_within_its_range(lock, extras):
    pins = read_lock(lock)
    for req in requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name} does not pin {req} (pyproject.toml): run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock.name} pins {name}=={pins[name]}, outside pyproject.toml's {req}: run make lock"
        )


def test_the_gpu_image_shares_every_version_with_the_cpu_lock_and_has_one_faiss():
    cpu, gpu = read_lock(CPU_LOCK), read_lock(GPU_LOCK)
    shared = sorted(set(cpu) & set(gpu) - {"torch"})
    assert len(shared) > 50
    differ = {name: (str(cpu[name]), str(gpu[name])) for name in shared if cpu[name] != gpu[name]}
    assert not differ, f"the image would run other versions than CI tests: {differ}"
    assert cpu["torch"].local == "cpu" and gpu["torch"].local is None  # CPU build / PyPI's CUDA build
    assert cpu["torch"].public == gpu["torch"].public
    assert FAISS & set(cpu) == {"faiss-cpu"}
    assert FAISS & set(gpu) == {"faiss-gpu"}, "exactly one faiss in the image, the GPU one"
    assert "deepspeed" in gpu
    assert any(name.startswith("nvidia-") for name in gpu) and not any(name.startswith("nvidia-") for name in cpu)


def test_this_environment_is_the_lock():
    """The tests run on exactly the locked versions (make setup syncs the venv to the lock)."""
    wrong = {}
    for name, pinned in read_lock(CPU_LOCK).items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            wrong[name] = (str(pinned), str(installed))
    assert not wrong, f"installed versions differ from requirements/lock.txt (pinned, installed): {wrong}; make setup"


def test_the_image_and_make_install_exactly_the_locks():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert any("--no-deps" in line and "-r docker/requirements-gpu.txt" in line for line in installs), installs
    assert any("--no-deps ." in line for line in installs), installs  # the package itself adds nothing
    assert "pip check" in dockerfile
    assert "constraints" not in dockerfile
    makefile = (ROOT / "Makefile").read_text()
    assert "sync" in makefile and "$(LOCK)" in makefile and "requirements/lock.txt" in makefile
    for lock in (CPU_LOCK, GPU_LOCK):
        assert "make lock" in lock.read_text().splitlines()[1], f"{lock.name}: write it with make lock"
