"""What a cluster user reads: a training log written to a file (no terminal), and the export loaded back.

    python bench/plain_log.py [--steps 20] [-- extra overrides]

Runs `embedscale train trainer.max_steps=N` (the quickstart: all-MiniLM-L6-v2 on SciFact, evaluated before and
after) with stdout and stderr redirected to a file, as a batch job writes them. Then:
- counts the progress lines and every other line that occurs more than once (each message should occur once);
- loads the export with `SentenceTransformer(path)` and with `AutoModel.from_pretrained(path)`, capturing what
  transformers prints, and records whether a LOAD REPORT (missing or unexpected weights) appears.

Writes bench/results/plain_log.json with the first 20 lines of the log after the config dump (the excerpt the
docs show), the counts and the load result.
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import report  # noqa: E402

PROGRESS = re.compile(r"\bstep \d+/\d+ \(\d+%\)")


def load_report(export: Path) -> dict:
    """Load the export both ways with every transformers/ST log captured; does any of it say LOAD REPORT?"""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    hf_logging.set_verbosity_info()
    hf_logging.disable_default_handler()  # captured, not printed
    hf_logging.add_handler(handler)
    logging.getLogger("sentence_transformers").addHandler(handler)
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            SentenceTransformer(str(export), device="cpu")
            AutoModel.from_pretrained(str(export))
    finally:
        hf_logging.remove_handler(handler)
        hf_logging.enable_default_handler()
        hf_logging.set_verbosity_warning()
    text = buf.getvalue()
    flagged = [ln for ln in text.splitlines() if re.search(r"LOAD REPORT|MISSING|UNEXPECTED|newly initialized", ln)]
    return {"captured_lines": len(text.splitlines()), "load_report_lines": flagged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--excerpt", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        log = Path(tmp) / "log"
        exe = Path(sys.executable).with_name("embedscale")
        cmd = [str(exe), "train", f"trainer.max_steps={args.steps}", f"run_dir={run_dir}", *args.overrides]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        start = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        seconds = time.perf_counter() - start
        lines = log.read_text().splitlines()
        loaded = load_report(run_dir / "model") if rc == 0 else {"error": "training failed"}
    progress = [ln for ln in lines if PROGRESS.search(ln)]
    # Progress lines carry changing figures; any other line printed twice is a repeated message.
    repeats = {ln: n for ln, n in collections.Counter(lines).items() if n > 1 and ln.strip() and ln not in progress}
    body = [ln for ln in lines if ln.strip()]
    first = next((i for i, ln in enumerate(body) if ln in progress), 0)
    excerpt = body[max(0, first - args.excerpt // 2) : max(0, first - args.excerpt // 2) + args.excerpt]
    rows = [
        {"what": "exit code", "value": rc},
        {"what": "seconds", "value": round(seconds, 1)},
        {"what": "log lines", "value": len(lines)},
        {"what": "progress lines", "value": len(progress)},
        {"what": "other lines printed more than once", "value": len(repeats)},
        {"what": "LOAD REPORT lines when loading the export", "value": len(loaded.get("load_report_lines", [-1]))},
    ]
    print("\n".join(excerpt))
    report(
        "plain_log",
        rows,
        {"command_run": " ".join(cmd[1:3]) + " > log", "excerpt": excerpt, "repeated_lines": repeats, "load": loaded},
    )
    sys.exit(0 if rc == 0 and not repeats and not loaded.get("load_report_lines") else 1)


if __name__ == "__main__":
    main()
