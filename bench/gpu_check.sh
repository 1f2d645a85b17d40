#!/usr/bin/env bash
# DeepSpeed ZeRO-3 + LoRA + GradCache on a ~1B decoder on one GPU (bench/gpu_check.py): checks what the script
# needs, installs only what can be installed offline, then runs it. Fits in ~5 minutes on one H100/H200.
#
#   bash bench/gpu_check.sh                       # GPU; results in $OUT/gpu_check.json (or bench/results/)
#   bash bench/gpu_check.sh --dry-run             # CPU, tiny model: the whole script end to end
#   WHEELS=/path/to/wheels bash bench/gpu_check.sh  # install missing deepspeed/hydra from local wheels first
#
# deepspeed is required (pip install embedscale[deepspeed]). On an offline machine it cannot come from PyPI:
# prepare its wheels on a networked machine with the same Python, e.g.
#   pip wheel -w wheels deepspeed hjson py-cpuinfo ninja msgpack einops
# and pass WHEELS=wheels. Hydra is optional here (the script imports the planner without its CLI wrapper).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

missing() { "$PY" - "$@" <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
}

need=$(missing deepspeed)
if [ -n "$need" ] && [ -n "${WHEELS:-}" ]; then
  echo "installing deepspeed from $WHEELS (offline)"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" deepspeed || echo "pip could not install deepspeed from $WHEELS"
elif [ -n "$need" ]; then
  # one quick try, in case an index is reachable; offline machines fail here in seconds
  PIP_DEFAULT_TIMEOUT=5 timeout 120 "$PY" -m pip install -q --retries 0 deepspeed >/dev/null 2>&1 \
    && echo "installed deepspeed from the package index" \
    || echo "deepspeed is not installed and no package index is reachable (offline): pass WHEELS=<dir>"
fi
echo "missing now: [$(missing deepspeed lightning transformers peft hydra omegaconf)] (hydra/omegaconf are optional)"
DS_BUILD_OPS=0 "$PY" bench/gpu_check.py "$@"
rc=$?
echo "bench/gpu_check.py exit code: $rc (2: some rows did not run, see 'error')"
exit $rc
