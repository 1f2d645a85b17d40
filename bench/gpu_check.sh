# One GPU check (bench/gpu_check.py), in one command on one H100/H200 in under 10 minutes: `embedscale doctor` on
# NCCL, BERT-base at a global batch of 65,536 pairs with GradCache and bf16 (pairs/s, tokens/s, MFU, peak memory vs
# the plan), and DeepSpeed ZeRO-3 + LoRA + GradCache on a TinyLlama-1.1B-shaped decoder (peak memory vs the plan).
# Checks what the script needs, installs only what can be installed offline, then runs it; each row in its own
# process with a timeout, rows that would start after 540 s (counted from here) are skipped and recorded.
#
#   bash bench/gpu_check.sh                       # GPU; bench/results/gpu_check.json (and $OUT/gpu_check.json)
#   bash bench/gpu_check.sh --dry-run             # CPU, tiny models, doctor on gloo: the whole script end to end
#   WHEELS=/path/to/wheels bash bench/gpu_check.sh  # install a missing deepspeed from local wheels first
#
# deepspeed is needed by the ZeRO-3 rows only (pip install embedscale[deepspeed]). On an offline machine it cannot
# come from PyPI: prepare its wheels on a networked machine with the same Python, e.g.
#   pip wheel -w wheels deepspeed hjson py-cpuinfo ninja msgpack einops
# and pass WHEELS=wheels. Hydra is optional here (the script imports the planner without its CLI wrapper).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export GPU_CHECK_START=${GPU_CHECK_START:-$(date +%s)}  # the time budget counts from here

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
  PIP_DEFAULT_TIMEOUT=5 timeout 60 "$PY" -m pip install -q --retries 0 deepspeed >/dev/null 2>&1 \
    && echo "installed deepspeed from the package index" \
    || echo "deepspeed is not installed and no package index is reachable (offline): pass WHEELS=<dir>"
fi
echo "missing now: [$(missing deepspeed lightning transformers peft hydra omegaconf)] (hydra/omegaconf are optional)"
DS_BUILD_OPS=0 "$PY" bench/gpu_check.py "$@"
rc=$?
echo "bench/gpu_check.py exit code: $rc (2: some rows failed or were skipped, see 'error' and 'skipped')"
exit $rc
