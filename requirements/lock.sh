#!/usr/bin/env bash
# `make lock`: the only step that asks the package registry for newer versions.
#
# Writes two fully pinned locks for Python 3.11 on x86_64 Linux (manylinux_2_28):
#   requirements/lock.txt         every runtime, dev and bench dependency, torch's CPU build, faiss-cpu:
#                                 what `make quickstart`, `make test` and .ci/run install (with uv, --no-deps).
#   docker/requirements-gpu.txt   the Docker image: the runtime dependencies at the *same* versions as
#                                 lock.txt, plus the GPU overlay -- torch's CUDA build (PyPI), faiss-gpu
#                                 (never together with faiss-cpu) and deepspeed.
# Run it when you want newer dependencies (or changed pyproject.toml's), then `make test` and commit both
# files with the results: tests/test_lock.py checks that they cover pyproject.toml and agree with each other.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
PLATFORM=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The torch versions are the two one-line files requirements/torch-{cpu,gpu}.txt.
# torch's CPU build is not on PyPI (PyPI's Linux wheel is the CUDA build): it comes from the local wheel
# folder this kind of machine has, or from PyTorch's CPU index.
if compgen -G "/opt/wheels/torch-*+cpu-*.whl" >/dev/null; then
  torch_source=(--find-links /opt/wheels)
else
  torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
"$UV" pip compile -q pyproject.toml --extra cpu --extra dev --extra bench "${PLATFORM[@]}" \
  --override requirements/torch-cpu.txt "${torch_source[@]}" --annotation-style line \
  --custom-compile-command "make lock" -o requirements/lock.txt

# The GPU image: same versions for everything the two share (lock.txt as constraints, less its CPU-only
# builds), torch from PyPI (CUDA), the [gpu] extra (faiss-gpu, deepspeed).
grep -E '^[A-Za-z0-9]' requirements/lock.txt | sed 's/ .*//' | grep -v -E '^(torch|faiss-cpu)==' >"$tmp/shared.txt"
"$UV" pip compile -q pyproject.toml --extra gpu "${PLATFORM[@]}" --override requirements/torch-gpu.txt \
  --constraint "$tmp/shared.txt" --annotation-style line --no-annotate \
  --custom-compile-command "make lock" -o docker/requirements-gpu.txt
echo "wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) pins) and docker/requirements-gpu.txt ($(grep -c '==' docker/requirements-gpu.txt) pins)"
