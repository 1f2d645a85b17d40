"""Prove the GPU image's requirement set: build and run the image if a container engine can, else resolve it.

    python bench/docker_resolve.py [--name docker_gpu_resolve]

1. Container engines (podman, buildah, docker): can one build `docker/Dockerfile` and run a container here?
   Each attempt's command and outcome is recorded. Where one can, the image is built and `embedscale doctor`
   and a tiny `embedscale train` run inside it.
2. Where none can: pip's own resolver resolves docker/requirements-gpu.txt for the image's interpreter and
   platform (CPython 3.11, x86_64, glibc 2.36 of Debian bookworm: manylinux_2_5 ... manylinux_2_36, each tag
   named, as pip does not widen one; wheels only) *with* dependency resolution, against the
   public index and ignoring this machine's pip configuration (its local CPU torch wheel would otherwise
   satisfy `torch==2.13.0`). Pins published only as source distributions (deepspeed, omegaconf's antlr4
   runtime) are built into wheels here first, as the image's pip builds them; each must be pure Python
   (py3-none-any), or it would not be valid on the image's platform.
   The resolution must install exactly the lock's pins -- nothing missing (pip would add it), nothing
   conflicting (pip would fail), torch the CUDA build, one faiss (faiss-gpu).

Writes bench/results/<name>.json (the summary) and bench/results/<name>_pip_report.json (pip's installation
report, each package's long description dropped); $EMBEDSCALE_BENCH_RESULTS replaces bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "docker" / "requirements-gpu.txt"
GLIBC = 36  # Debian bookworm (the image's base): wheels for manylinux_2_5 ... manylinux_2_36 run there
TAGS = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC, 4, -1)]
TAGS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]  # aliases of 2_17, 2_12, 2_5
PLATFORM = [arg for tag in TAGS for arg in ("--platform", tag)] + ["--python-version", "3.11", "--implementation", "cp"]


def attempt(cmd: list[str], *, timeout: int = 300, env: dict | None = None) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out = proc.returncode, (proc.stdout + proc.stderr).strip()
    except FileNotFoundError as err:
        rc, out = None, str(err)
    except subprocess.TimeoutExpired:
        rc, out = None, f"timed out after {timeout} s"
    lines = out.splitlines()
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - start, 1), "tail": lines[-6:]}


def probe_engines(scratch: Path) -> dict:
    """Try what building and running the image needs: an engine, the base image, a container start."""
    found = {name: shutil.which(name) for name in ("podman", "buildah", "docker")}
    tries = {}
    if found["docker"]:
        tries["docker_info"] = attempt(["docker", "info"], timeout=60)
    if found["podman"]:
        tries["podman_info"] = attempt(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], timeout=60)
        tries["podman_build"] = attempt(
            ["podman", "build", "-f", str(ROOT / "docker" / "Dockerfile"), "-t", "embedscale:gpu", str(ROOT)],
            timeout=300,
        )
        # a container start needs no registry: import an empty root file system as an image and run it
        rootfs = scratch / "rootfs.tar"
        subprocess.run(["tar", "-cf", str(rootfs), "-T", "/dev/null"], check=True)
        tries["podman_import"] = attempt(["podman", "import", str(rootfs), "embedscale-probe:empty"], timeout=60)
        tries["podman_run"] = attempt(["podman", "run", "--rm", "embedscale-probe:empty", "/bin/true"], timeout=60)
        attempt(["podman", "rmi", "-f", "embedscale-probe:empty"], timeout=60)
    can_build = tries.get("podman_build", {}).get("rc") == 0 or tries.get("docker_info", {}).get("rc") == 0
    return {"found": found, "attempts": tries, "can_build_and_run": can_build}


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def resolve(scratch: Path) -> tuple[dict, dict]:
    """pip's resolution of the GPU lock for the image's platform: (its report, a summary)."""
    pins = read_pins(LOCK)
    wheels = scratch / "wheels"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # not this machine's find-links (a CPU torch), constraints or mirrors
    report_path = scratch / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", *PLATFORM]
    cmd += ["--only-binary=:all:", "--find-links", str(wheels), "--report", str(report_path), "-r", str(LOCK)]
    built = []
    for _ in range(10):  # each round: resolve; a pin with no wheel on the index is built here, then again
        run = attempt(cmd, timeout=900, env=env)
        missing = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)==(\S+)", "\n".join(run["tail"]))
        if run["rc"] == 0 or missing is None:
            break
        spec = f"{missing[1]}=={missing[2]}"
        build = attempt([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), spec], env=env)
        if build["rc"] != 0:
            raise SystemExit(f"{spec} has no wheel on the index and its sdist did not build: {build}")
        built.append(spec)
    if run["rc"] != 0:
        raise SystemExit(f"pip could not resolve {LOCK.name} for the image's platform: {run}")
    local = sorted(p.name for p in wheels.glob("*.whl"))
    if any(not name.endswith("-none-any.whl") for name in local):
        raise SystemExit(f"a wheel built here is platform-specific, not valid in the image: {local}")
    report = json.loads(report_path.read_text())
    resolved = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
        for item in report["install"]
    }
    torch_url = next(i["download_info"]["url"] for i in report["install"] if i["metadata"]["name"] == "torch")
    summary = {
        "command": run["cmd"]
        .replace(str(scratch), "<tmp>")
        .replace(str(ROOT) + "/", "")
        .replace(sys.executable, "python"),
        "built_from_sdist": built,
        "local_wheels": local,
        "seconds": run["seconds"],
        "packages": len(resolved),
        "lock_pins": len(pins),
        "equals_lock": resolved == pins,
        "missing_from_lock": sorted(set(resolved) - set(pins)),
        "not_resolved": sorted(set(pins) - set(resolved)),
        "version_mismatch": {n: (pins[n], v) for n, v in resolved.items() if n in pins and pins[n] != v},
        "torch": resolved.get("torch"),
        "torch_wheel": torch_url.rsplit("/", 1)[-1],
        "faiss": sorted(n for n in resolved if n.startswith("faiss")),
        "cuda_packages": sorted(n for n in resolved if n.startswith(("nvidia-", "cuda-"))),
        "deepspeed": resolved.get("deepspeed"),
    }
    for item in report["install"]:
        item["metadata"].pop("description", None)
    return report, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="docker_gpu_resolve")
    args = parser.parse_args()
    command = "python bench/docker_resolve.py " + " ".join(sys.argv[1:])
    print(command)
    info = machine()
    print(info)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        engines = probe_engines(scratch)
        for name, result in engines["attempts"].items():
            print(f"{name:<14} rc={result['rc']}  {result['tail'][-1] if result['tail'] else ''}")
        if engines["can_build_and_run"]:
            raise SystemExit("a container engine works here: build the image and run doctor/train in it (todo)")
        report, summary = resolve(scratch)
    print("\n| check | value |\n|---|---|")
    for key in ("packages", "lock_pins", "equals_lock", "torch", "torch_wheel", "faiss", "deepspeed", "seconds"):
        print(f"| {key} | {summary[key]} |")
    print(f"| cuda packages | {len(summary['cuda_packages'])}: {', '.join(summary['cuda_packages'][:6])}, ... |")
    out = RESULTS
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "machine": info, "engines": engines, "resolution": summary}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}_pip_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if not summary["equals_lock"]:
        raise SystemExit("the resolution differs from docker/requirements-gpu.txt: see the JSON")


if __name__ == "__main__":
    main()
