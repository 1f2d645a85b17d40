"""The fault table of docs/reliability.md: each fault a user meets, injected and run through the command line as
the user would, on a checkout of embedscale; what came out (exit code, the error's last line) and what was left
on disk.

    python bench/fault_table.py --repo /path/to/checkout --python /path/to/checkout/.venv/bin/python --name X

Run once on the checkout before issue 20 (a01abc8) and once on this one; `--merge BEFORE AFTER` writes the
before/after table (bench/results/fault_table.json) that docs/reliability.md shows. Every case builds its own
inputs in a temporary directory (tiny JSONL pairs, a tiny BEIR set, shards written by the checkout's own
`embedscale shard`), runs `python -m embedscale.cli ...` of that checkout with the real all-MiniLM-L6-v2, and
inspects what the run left: exported weights (finite or not), a user's file (still there or not), metrics.json.
Two cases run 2 CPU ranks: a rank that stalls (sleeps) at its third step, with trainer.collective_timeout=10
where the checkout has the key (a checkout without it is given up on after --stall-limit seconds), and a torchrun
agent killed while its 2 workers train (are the workers still running 15 s later?).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command, report  # noqa: E402

TRAIN = [  # 2 steps of MiniLM on 8 pairs, nothing else
    "model.query_max_length=32",
    "model.document_max_length=64",
    "data.batch_size_per_rank=4",
    "trainer.max_steps=2",
    "eval=none",
    "logger=none",
]


@dataclass
class Ctx:
    tmp: Path
    python: str
    repo: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_"))}
        env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", EMBEDSCALE_CACHE=str(self.tmp / "cache"))
        env.update(TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(self.repo))
        return env

    def has(self, word: str) -> bool:
        """Does the checkout's code name `word` (a config key that a newer checkout has and an older lacks)?"""
        return any(word in f.read_text() for f in (self.repo / "embedscale").rglob("*.py"))

    def cli(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        cmd = [self.python, "-m", "embedscale.cli", *args, f"hydra.run.dir={self.tmp / 'hydra'}"]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=self.tmp, env=self.env(), timeout=timeout)

    def pairs(self, n: int = 8, name: str = "pairs.jsonl") -> Path:
        path = self.tmp / name
        rows = [
            {"query": f"what treats condition {i}?", "positive": f"drug {i} treats condition {i} well"}
            for i in range(n)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def shards(self, n: int = 32, per_shard: int = 8) -> Path:
        src = self.pairs(n, "to-shard.jsonl")
        out = self.tmp / "shards"
        proc = self.cli("shard", f"shard.inputs=[{src}]", f"shard.output={out}", f"shard.samples_per_shard={per_shard}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return out

    def beir(self, *, docs: int = 12, queries: int = 4, qrels_extra: str = "", query_extra: str = "") -> Path:
        root = self.tmp / "beir" / "tiny"
        (root / "qrels").mkdir(parents=True, exist_ok=True)
        with gzip.open(root / "corpus.jsonl.gz", "wt") as f:
            for i in range(docs):
                f.write(json.dumps({"_id": f"d{i}", "title": "", "text": f"drug {i} treats condition {i}"}) + "\n")
        (root / "queries.jsonl").write_text(
            "".join(json.dumps({"_id": f"q{i}", "text": f"what treats condition {i}?"}) + "\n" for i in range(queries))
            + query_extra
        )
        (root / "qrels" / "test.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(queries)) + qrels_extra
        )
        return root.parent

    def train(self, *extra: str, run_dir: str = "run") -> subprocess.CompletedProcess:
        return self.cli("train", *TRAIN, f"run_dir={self.tmp / run_dir}", *extra)

    def evaluate(self, root: Path, *extra: str) -> subprocess.CompletedProcess:
        return self.cli(
            "evaluate", f"data_root={root}", "eval.beir=[{path: tiny, split: test}]", "eval.sts=[]",
            f"output={self.tmp / 'eval.json'}", *extra,
        )  # fmt: skip


def weights_state(run_dir: Path) -> str:
    files = sorted((run_dir / "model").glob("*.safetensors"))
    if not files:
        return "no model/ export"
    import torch
    from safetensors.torch import load_file

    tensors = {k: v for f in files for k, v in load_file(f).items()}
    bad = sum(not torch.isfinite(v).all() for v in tensors.values())
    return f"model/ exported, {bad} of {len(tensors)} tensors non-finite"


def message(proc: subprocess.CompletedProcess) -> str:
    """The error's last line (the exception and its message); for a run that exited 0, its last warning."""
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    if proc.returncode == 0:  # a run that went through: its last warning (logged to stdout or stderr), if any
        logged = lines + [line.strip() for line in (proc.stdout or "").splitlines()]
        warnings = [line for line in logged if "WARNING" in line and "srun" not in line]
        return warnings[-1][:400] if warnings else ""
    errors = [line for line in lines if re.match(r"^([\w.]*(Error|Exception|Interrupt)|ValueError)\b", line)]
    text = errors[-1] if errors else (lines[-1] if proc.returncode and lines else "")
    return text[:400]


# -- the cases ------------------------------------------------------------------------------------------------------


OVERFLOW = """
import torch
import lightning as L

class Overflow(L.Callback):  # one attention weight overflows before step 3 (as an fp16 overflow would)
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 2:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    if name.endswith("encoder.layer.0.attention.self.query.weight"):
                        p.view(-1)[0] = float("inf")
                        break

init = L.Trainer.__init__
def patched(self, *args, **kwargs):
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), Overflow()]
    init(self, *args, **kwargs)
L.Trainer.__init__ = patched

from embedscale.cli import main
main()
"""


def diverging(ctx: Ctx):
    script = ctx.tmp / "overflow.py"
    script.write_text(OVERFLOW)
    extra = ["data.format=jsonl", f"data.path={ctx.pairs(64)}", "trainer.max_steps=8", f"run_dir={ctx.tmp / 'run'}"]
    cmd = [ctx.python, str(script), "train", *[a for a in TRAIN if "max_steps" not in a], *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ctx.tmp, env=ctx.env(), timeout=600)
    return proc, weights_state(ctx.tmp / "run")


def lr_typo(ctx: Ctx):
    proc = ctx.train("data.format=jsonl", f"data.path={ctx.pairs(16)}", "optim.lr=1e10", "trainer.max_steps=6")
    return proc, weights_state(ctx.tmp / "run")


def tar_text_edit(ctx: Ctx):
    root = ctx.shards()
    tar = sorted(root.glob("*.tar"))[0]
    data = tar.read_bytes()
    tar.write_bytes(data.replace(b"drug 1 treats", b"drug 1 HARMS!", 1))  # same length
    proc = ctx.train("data.format=shards", f"data.path={root}")
    return proc, weights_state(ctx.tmp / "run")


def sidecar_rewrite(ctx: Ctx):
    import numpy as np

    root = ctx.shards()
    index_path = sorted(root.glob("*.idx.npy"))[0]
    index = np.load(index_path)
    index[:] = index[0]  # every entry points at the first sample: one sample 8 times, 7 never
    np.save(index_path, index)
    proc = ctx.train("data.format=shards", f"data.path={root}", "trainer.max_steps=8")
    metrics = ctx.tmp / "run" / "metrics.json"
    skipped = json.loads(metrics.read_text())["train"].get("skipped_samples") if metrics.exists() else None
    return proc, f"metrics.json skipped_samples={skipped}" if metrics.exists() else "no metrics.json"


def manifest_escape(ctx: Ctx):
    root = ctx.shards()
    outside = ctx.tmp / "outside.tar"
    first = sorted(root.glob("*.tar"))[0]
    outside.write_bytes(first.read_bytes())
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../outside.tar"
    (root / "manifest.json").write_text(json.dumps(manifest))
    proc = ctx.train("data.format=shards", f"data.path={root}")
    return proc, "read ../outside.tar" if proc.returncode == 0 else "not read"


def manifest_count(ctx: Ctx):
    root = ctx.shards()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 5
    manifest["samples"] = manifest.get("samples", 0) + 5
    (root / "manifest.json").write_text(json.dumps(manifest))
    return ctx.train("data.format=shards", f"data.path={root}", "trainer.max_steps=8"), ""


def bad_value(override: str) -> Callable[[Ctx], tuple]:
    def case(ctx: Ctx):
        proc = ctx.train("data.format=jsonl", f"data.path={ctx.pairs(16)}", override)
        return proc, weights_state(ctx.tmp / "run")

    return case


def shard_overwrite(ctx: Ctx):
    out = ctx.tmp / "mine-dir"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"note": "the user's own manifest"}))
    (out / "thesis.tex").write_text("two years of work")
    src = ctx.pairs(8)
    proc = ctx.cli("shard", f"shard.inputs=[{src}]", f"shard.output={out}", "shard.overwrite=true")
    return proc, "thesis.tex kept" if (out / "thesis.tex").exists() else "thesis.tex DELETED"


def run_dir_reuse(ctx: Ctx):
    src = ctx.pairs(16)
    first = ctx.train("data.format=jsonl", f"data.path={src}", "seed=1")
    ckpt = ctx.tmp / "run" / "checkpoints" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns if ckpt.exists() else None
    assert first.returncode == 0, first.stderr[-2000:]
    proc = ctx.train("data.format=jsonl", f"data.path={src}", "seed=2")
    after = ckpt.stat().st_mtime_ns if ckpt.exists() else None
    return proc, "first run's last.ckpt kept" if before == after else "first run's last.ckpt REPLACED"


def mine_pickle(ctx: Ctx):
    import pickle

    marker = ctx.tmp / "PWNED"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = ctx.tmp / "evil.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": Exploit()}, f)
    root = ctx.beir()
    proc = ctx.cli(
        "mine", f"data_root={root}", "mine.input=tiny", "mine.split=test", f"mine.checkpoint={ckpt}",
        f"mine.output={ctx.tmp / 'mined'}",
    )  # fmt: skip
    return proc, "the checkpoint RAN CODE" if marker.exists() else "no code ran"


def tampered_cache(ctx: Ctx):
    import torch

    root = ctx.beir()
    first = ctx.evaluate(root)
    assert first.returncode == 0, first.stderr[-2000:]
    ndcg_first = json.loads((ctx.tmp / "eval.json").read_text())
    cached = sorted((ctx.tmp / "cache").rglob("*.pt"))
    for path in cached:  # another corpus' embeddings: shuffled rows, same shape
        obj = torch.load(path, weights_only=False)
        if isinstance(obj, dict) and "x" in obj:
            obj["x"] = obj["x"].flip(0)
        elif isinstance(obj, torch.Tensor):
            obj = obj.flip(0)
        torch.save(obj, path)
    proc = ctx.evaluate(root)
    second = json.loads((ctx.tmp / "eval.json").read_text()) if proc.returncode == 0 else None
    same = second is not None and json.dumps(_numbers(second)) == json.dumps(_numbers(ndcg_first))
    return proc, f"{len(cached)} cache file(s) tampered; metrics {'unchanged' if same else 'CHANGED'}"


def _numbers(obj):
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in sorted(obj.items()) if k not in ("seconds", "wall_seconds", "output")}
    if isinstance(obj, float):
        return round(obj, 6)
    return obj if isinstance(obj, int | str | list) else None


def bad_utf8(ctx: Ctx):
    src = ctx.pairs(16)
    lines = src.read_bytes().splitlines(keepends=True)
    lines[6] = b'{"query": "caf\xe9", "positive": "x"}\n'
    src.write_bytes(b"".join(lines))
    return ctx.train("data.format=jsonl", f"data.path={src}"), ""


def truncated_gz(ctx: Ctx):
    src = ctx.pairs(400)
    gz = ctx.tmp / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes())[:-200])
    return ctx.train("data.format=jsonl", f"data.path={gz}"), ""


def qrels_text_score(ctx: Ctx):
    return ctx.evaluate(ctx.beir(qrels_extra="q1\td2\thigh\n")), ""


def query_without_id(ctx: Ctx):
    return ctx.evaluate(ctx.beir(query_extra=json.dumps({"text": "a query without an id"}) + "\n")), ""


def qrels_missing_docs(ctx: Ctx):
    return ctx.evaluate(ctx.beir(qrels_extra="q1\td999\t1\nq2\td998\t1\n")), ""


def duplicate_ids(ctx: Ctx):
    return ctx.evaluate(ctx.beir(query_extra=json.dumps({"_id": "q1", "text": "a second q1"}) + "\n")), ""


def empty_shard_input(ctx: Ctx):
    src = ctx.tmp / "empty.jsonl"
    src.write_text("")
    out = ctx.tmp / "empty-shards"
    proc = ctx.cli("shard", f"shard.inputs=[{src}]", f"shard.output={out}")
    return proc, "a dataset was written" if (out / "manifest.json").exists() else "nothing written"


def skip_quarter(ctx: Ctx):
    root = ctx.shards(n=32, per_shard=8)
    for tar in sorted(root.glob("*.tar"))[:2]:  # 2 of 4 shards: the first 2 samples of each no longer JSON
        import numpy as np

        data = bytearray(tar.read_bytes())
        for offset, _ in np.load(str(tar).removesuffix(".tar") + ".idx.npy")[:4]:
            data[int(offset)] = ord("#")
        tar.write_bytes(bytes(data))
    extra = ["data.on_error=skip", "trainer.max_steps=-1", "trainer.max_epochs=1"]
    if ctx.has("data.verify"):
        extra.append("data.verify=off")  # the corruption is the point: past the checksum
    proc = ctx.train("data.format=shards", f"data.path={root}", *extra)
    metrics = ctx.tmp / "run" / "metrics.json"
    skipped = json.loads(metrics.read_text())["train"].get("skipped_samples") if metrics.exists() else None
    return proc, f"skipped_samples={skipped}" if metrics.exists() else "no metrics.json"


STALL = """
import sys, time
import lightning as L

class Stall(L.Callback):  # rank 1 stops responding at its third step
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            time.sleep(3600)

init = L.Trainer.__init__
def patched(self, *args, **kwargs):
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), Stall()]
    init(self, *args, **kwargs)
L.Trainer.__init__ = patched

from embedscale.cli import main
main()
"""


def stalled_rank(ctx: Ctx, limit: float):
    script = ctx.tmp / "stall.py"
    script.write_text(STALL)
    extra = ["trainer=ddp_cpu", "trainer.max_steps=6", "data.format=jsonl", f"data.path={ctx.pairs(64)}"]
    if ctx.has("collective_timeout"):
        extra.append("trainer.collective_timeout=10")
    cmd = [ctx.python, str(script), "train", *TRAIN, *extra, f"run_dir={ctx.tmp / 'run'}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ctx.tmp, env=ctx.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=limit)
        seconds = time.perf_counter() - start
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err), f"ended after {seconds:.0f} s"
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, None, out, ""), f"STILL BLOCKED after {limit:.0f} s (killed)"


def _kill_tree(pid: int) -> None:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        _kill_tree(int(child))
    subprocess.run(["kill", "-9", str(pid)], capture_output=True)


def orphaned_workers(ctx: Ctx):
    extra = ["trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2", "trainer.num_threads=1"]
    extra += [
        "trainer.max_steps=100000",
        "trainer.max_epochs=100000",
        "data.format=jsonl",
        f"data.path={ctx.pairs(64)}",
    ]
    args = [a for a in TRAIN if not a.startswith("trainer.max_steps")] + extra + [f"run_dir={ctx.tmp / 'run'}"]
    cmd = [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "embedscale.cli"]
    agent = subprocess.Popen([*cmd, "train", *args, f"hydra.run.dir={ctx.tmp / 'hydra'}"], cwd=ctx.tmp, env=ctx.env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(1)
            children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children")
            workers = [int(p) for p in children.read_text().split()] if children.exists() else []
        time.sleep(30)  # both workers training
        agent.kill()
        agent.wait()
        time.sleep(15)
        alive = [w for w in workers if Path(f"/proc/{w}").exists() and "zombie" not in _state(w)]
    finally:
        for w in workers:
            _kill_tree(w)
    state = (
        f"{len(alive)} of {len(workers)} workers STILL RUNNING 15 s after" if alive else "both workers gone 15 s after"
    )
    return subprocess.CompletedProcess(cmd, None, "", ""), f"{state} the agent was killed"  # killed: no exit code


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def module_cli_ddp(ctx: Ctx):
    src = ctx.pairs(16)
    proc = ctx.train("data.format=jsonl", f"data.path={src}", "trainer=ddp_cpu", "trainer.devices=2")
    return proc, weights_state(ctx.tmp / "run")


CASES: list[tuple[str, str, Callable[[Ctx], tuple]]] = [
    ("non-finite", "a weight overflows to inf before step 3 of 8", diverging),
    ("non-finite", "optim.lr=1e10 (the issue's diverging run; a 2e5-for-2e-5 typo)", lr_typo),
    ("verified inputs", "same-length text edit inside a shard tar", tar_text_edit),
    ("verified inputs", "rewritten .idx.npy sidecar (one sample 8 times, 7 never)", sidecar_rewrite),
    ("verified inputs", "manifest file name ../outside.tar", manifest_escape),
    ("verified inputs", "manifest sample count larger than the shard", manifest_count),
    ("verified inputs", "crafted mine.checkpoint (a pickle that runs a command)", mine_pickle),
    ("verified inputs", "tampered embedding cache (rows permuted, same shape)", tampered_cache),
    ("config values", "trainer.gradient_clip_val=-1", bad_value("trainer.gradient_clip_val=-1")),
    ("config values", "optim.weight_decay=-0.1", bad_value("optim.weight_decay=-0.1")),
    ("config values", "data.max_samples=-3", bad_value("data.max_samples=-3")),
    ("config values", "loss.max_inverse_temperature=0", bad_value("loss.max_inverse_temperature=0")),
    ("config values", "loss.temperature=inf", bad_value("loss.temperature=inf")),
    ("config values", "model.document_max_length=1024 (MiniLM: 512)", bad_value("model.document_max_length=1024")),
    ("config values", "trainer.max_steps=0", bad_value("trainer.max_steps=0")),
    ("safe writes", "shard.overwrite=true on a directory with the user's manifest.json, thesis.tex", shard_overwrite),
    ("safe writes", "a second run into a run directory that holds a finished run", run_dir_reuse),
    ("bounded waits", "rank 1 of 2 stalls at its third step", lambda ctx: stalled_rank(ctx, STALL_LIMIT)),
    ("bounded waits", "the torchrun agent of 2 training workers is killed", orphaned_workers),
    ("bounded waits", "data.on_error=skip with 8 of 32 samples corrupt (25%)", skip_quarter),
    ("bad records", "invalid UTF-8 on line 7 of a training JSONL", bad_utf8),
    ("bad records", "truncated .jsonl.gz", truncated_gz),
    ("bad records", "qrels score 'high'", qrels_text_score),
    ("bad records", "BEIR query without _id", query_without_id),
    ("bad records", "qrels naming 2 documents missing from the corpus", qrels_missing_docs),
    ("bad records", "duplicate BEIR query id", duplicate_ids),
    ("bad records", "embedscale shard on an empty input", empty_shard_input),
    ("bad records", "python -m embedscale.cli train trainer=ddp_cpu trainer.devices=2", module_cli_ddp),
]  # fmt: skip


STALL_LIMIT = 150.0


def run_cases(repo: Path, python: str, only: str | None) -> list[dict]:
    rows = []
    for cls, case, fn in CASES:
        if only and not re.search(only, case):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ctx = Ctx(Path(tmp), python, repo)
            start = time.perf_counter()
            try:
                proc, state = fn(ctx)
                code, text = proc.returncode, message(proc)
            except Exception as err:  # the case's own set-up failed: say so in its row, run the others
                code, text, state = None, f"set-up failed: {type(err).__name__}: {str(err)[:300]}", ""
            rows.append(
                {
                    "class": cls,
                    "case": case,
                    "exit": code,
                    "message": text.replace(tmp, "<tmp>"),
                    "left": state,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(
                f"[{cls}] {case}: exit {code} ({rows[-1]['seconds']} s) {state}\n    {rows[-1]['message']}", flush=True
            )
    return rows


def merge(before_path: Path, after_path: Path) -> None:
    before = {r["case"]: r for r in json.loads(before_path.read_text())["rows"]}
    after = json.loads(after_path.read_text())
    rows = []
    for r in after["rows"]:
        b = before.get(r["case"], {})
        rows.append(
            {
                "class": r["class"],
                "case": r["case"],
                "before_exit": b.get("exit"),
                "before": "; ".join(p for p in (b.get("message", ""), b.get("left", "")) if p),
                "after_exit": r["exit"],
                "after": "; ".join(p for p in (r["message"], r["left"]) if p),
            }
        )
    report("fault_table", rows, {"before": str(before_path), "after": str(after_path)})
    print("\n| class | case | before: exit, outcome | after: exit, outcome |\n|---|---|---|---|")
    for r in rows:
        cells = [
            r["class"],
            r["case"],
            f"{_exit(r['before_exit'])}; {r['before']}",
            f"{_exit(r['after_exit'])}; {r['after']}",
        ]
        print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")


def _exit(code) -> str:
    return "exit -" if code is None else f"exit {code}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--name", default="fault_table_after")
    parser.add_argument(
        "--only", default=None, help="a regular expression: rerun the matching cases only, keeping the other rows"
    )
    parser.add_argument("--merge", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--stall-limit", type=float, default=STALL_LIMIT, help="seconds before a blocked run is killed")
    args = parser.parse_args()
    globals()["STALL_LIMIT"] = args.stall_limit
    if args.merge:
        merge(*args.merge)
        return
    rows = run_cases(args.repo.resolve(), args.python, args.only)
    previous, extra = RESULTS / f"{args.name}.json", {}
    if args.only and previous.exists():  # rerun some cases: the others keep their rows from the last full run
        old = json.loads(previous.read_text())
        fresh = {r["case"]: r for r in rows}
        rows = [fresh.pop(r["case"], r) for r in old["rows"]] + list(fresh.values())
        extra = {k: old[k] for k in ("assembled",) if k in old}
        extra["reruns"] = [*old.get("reruns", []), f"{command()} (at {time.strftime('%Y-%m-%d %H:%M')})"]
    commit = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    report(args.name, rows, {"repo_commit": commit.stdout.strip(), **extra})


if __name__ == "__main__":
    main()
