"""Install time of the project's environment, from venv creation to ready, with cold package caches.

    python bench/install_time.py [--rounds 2] [--name install_time]

Three ways, interleaved round by round, each into a fresh venv with fresh (empty) pip and uv caches:
- `pip-ranges`: what `make setup` did before the lock: pip installs torch==2.13.0 (the CPU build from
  /opt/wheels), then `pip install -e '.[cpu,dev,bench]'`, resolving pyproject.toml's ranges on the day.
- `pip-lock`: pip installs requirements/lock.txt with --no-deps, then the package with --no-deps.
- `uv-lock`: what `make setup` does now: pip installs the locked uv, `uv pip sync --compile-bytecode` installs
  the lock (compiling bytecode, as pip does), uv installs the package with --no-deps (and `uv pip check`).
The wheels come from the package registry every time (the caches are empty); torch's CPU wheel is read from
/opt/wheels by all three. "ready" is `import embedscale, torch, lightning, transformers` succeeding.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
WHEELS = "/opt/wheels"


def uv_version() -> str:
    return next(line.split("==")[1].split()[0] for line in LOCK.read_text().splitlines() if line.startswith("uv=="))


def steps(method: str, venv: Path) -> list[list[str]]:
    py, uv = str(venv / "bin" / "python"), str(venv / "bin" / "uv")
    make_venv = [sys.executable, "-m", "venv", str(venv)]
    if method == "pip-ranges":
        return [
            make_venv,
            [py, "-m", "pip", "install", "-q", "torch==2.13.0"],
            [py, "-m", "pip", "install", "-q", "-e", f"{ROOT}[cpu,dev,bench]"],
        ]
    if method == "pip-lock":
        return [
            make_venv,
            [py, "-m", "pip", "install", "-q", "--no-deps", "-r", str(LOCK)],
            [py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
        ]
    if method == "uv-lock":
        return [
            make_venv,
            [py, "-m", "pip", "install", "-q", f"uv=={uv_version()}"],
            [uv, "pip", "sync", "-q", "--compile-bytecode", "--python", py, "--find-links", WHEELS, str(LOCK)],
            [uv, "pip", "install", "-q", "--python", py, "--no-deps", "-e", str(ROOT)],
            [uv, "pip", "check", "-q", "--python", py],
        ]
    raise ValueError(method)


def one(method: str) -> float:
    with tempfile.TemporaryDirectory(prefix=f"install-{method}-") as tmp:
        tmp_path = Path(tmp)
        env = dict(os.environ, PIP_CACHE_DIR=str(tmp_path / "pip-cache"), UV_CACHE_DIR=str(tmp_path / "uv-cache"))
        venv = tmp_path / "venv"
        start = time.perf_counter()
        for cmd in steps(method, venv):
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        check = "import embedscale, torch, lightning, transformers"
        subprocess.run([str(venv / "bin" / "python"), "-c", check], check=True, env=env)
        seconds = time.perf_counter() - start
        shutil.rmtree(venv, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default="pip-ranges,pip-lock,uv-lock")
    parser.add_argument("--name", default="install_time")
    args = parser.parse_args()
    methods = args.methods.split(",")
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for method in methods:
            times[method].append(one(method))
            print(f"round {r + 1} {method}: {times[method][-1]:.1f} s", flush=True)
    base = statistics.median(times[methods[0]])
    rows = [
        {
            "method": m,
            "median_s": round(statistics.median(t), 1),
            "runs_s": ", ".join(f"{x:.1f}" for x in t),
            f"vs_{methods[0]}": round(statistics.median(t) / base, 2),
        }
        for m, t in times.items()
    ]
    report(args.name, rows, {"rounds": args.rounds, "times": times})


if __name__ == "__main__":
    main()
