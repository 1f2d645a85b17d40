"""The report of a run directory: an HTML page with its training curves, evaluations and sweeps
(`embedscale report RUN_DIR`, embedscale/jobs/report.py).

    embedscale report runs/train/<ts>                 # writes runs/train/<ts>/report/index.html + PNGs
    embedscale report runs/train/<ts> --wandb         # also logs the figures to the run's wandb page

It reads only files a run directory already holds -- `logs/metrics.csv` (Lightning's CSV logger: loss,
temperature, learning rates, gradient norm, samples/s, eval/*), `metrics.json` (the evaluations over
steps, `eval_history`) and `sweep.json` (`embedscale sweep ... sweep.output=RUN_DIR/sweep.json`) -- so it
works on a finished run, on one still training (from the CSV alone) and on a copied directory, without
the model, a GPU or network. The page references its PNGs relatively: the report/ folder is portable.

A plain argparse entry point rather than a Hydra job: the one argument is a path, and a report must not
create a Hydra output directory of its own. When training logs to wandb, the train job calls
`write_report` and `log_report_to_wandb` at the end, so the same figures land on the wandb run.
"""

from __future__ import annotations

import csv
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# (file stem, title, y label, predicate over CSV column names); a column goes to the first group it matches
TRAIN_GROUPS = [
    ("loss", "Training loss", "loss", lambda c: c.startswith("train/loss")),
    ("temperature", "Temperature", "tau", lambda c: c == "train/temperature"),
    ("learning_rate", "Learning rate", "lr", lambda c: c.startswith("lr-")),
    ("grad_norm", "Gradient norm (L2, all parameters)", "norm", lambda c: c == "train/grad_norm"),
    ("throughput", "Throughput", "samples / s (all ranks)", lambda c: c == "train/samples_per_second"),
    ("accuracy", "In-batch accuracy and positive similarity", "value", lambda c: c in _ACCURACY),
]
_ACCURACY = ("train/accuracy", "train/positive_similarity")
KEY_METRICS = ("ndcg@10", "recall@100", "mrr@10", "spearman")
SWEEP_MARKERS = {"fp32": "o", "int8": "s", "binary": "v", "binary_rescore": "^", "binary_rescore_int8": "D"}


@dataclass
class RunRecord:
    """What a run directory holds, as plain values."""

    run_dir: Path
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """CSV column -> (step, value) for every row that has a value."""
    eval_history: list[dict] = field(default_factory=list)
    """[{tag, step, seconds, metrics}] from metrics.json, else rebuilt from the CSV's eval/* columns."""
    summary: dict = field(default_factory=dict)
    """metrics.json without its history (model, train, eval)."""
    sweep: dict | None = None


def read_metrics_csv(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning CSV log -> {column: [(step, value)]}, skipping empty cells (each row logs a few columns) and NaN
    (a metric of another source's objective, not logged at this step: embedscale/contrastive/module.py)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for name, value in row.items():
                if name in ("step", "epoch") or value in ("", None, "nan"):
                    continue
                series.setdefault(name, []).append((int(float(step)), float(value)))
    return series


def _history_from_csv(series: dict[str, list[tuple[int, float]]]) -> list[dict]:
    by_step: dict[int, dict[str, float]] = {}
    for name, points in series.items():
        if name.startswith("eval/"):
            for step, value in points:
                by_step.setdefault(step, {})[name[len("eval/") :]] = value
    return [{"tag": f"step{s}", "step": s, "metrics": m} for s, m in sorted(by_step.items())]


def load_run(run_dir: Path) -> RunRecord:
    """Read logs/metrics.csv, metrics.json and sweep.json of a run directory (each optional, not all absent)."""
    run_dir = Path(run_dir)
    rec = RunRecord(run_dir)
    csv_path, metrics_path, sweep_path = (
        run_dir / "logs" / "metrics.csv",
        run_dir / "metrics.json",
        run_dir / "sweep.json",
    )
    if not any(p.is_file() for p in (csv_path, metrics_path, sweep_path)):
        raise ValueError(
            f"{run_dir} holds none of logs/metrics.csv, metrics.json, sweep.json: pass the directory of an "
            "`embedscale train` run (run_dir=...), or write a sweep there with sweep.output=RUN_DIR/sweep.json"
        )
    if csv_path.is_file():
        rec.series = read_metrics_csv(csv_path)
    if metrics_path.is_file():
        summary = json.loads(metrics_path.read_text())
        rec.eval_history = summary.pop("eval_history", []) or []
        summary.pop("config", None)
        rec.summary = summary
    if not rec.eval_history:
        rec.eval_history = _history_from_csv(rec.series)
    if sweep_path.is_file():
        rec.sweep = json.loads(sweep_path.read_text())
    return rec


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    return fig, ax


def constant_columns(series: dict[str, list[tuple[int, float]]]) -> dict[str, float]:
    """train/* columns outside TRAIN_GROUPS whose value never changes: a line in the page, not a plot."""
    grouped = {c for c in series for *_, match in TRAIN_GROUPS if match(c)}
    return {
        c: points[0][1]
        for c, points in sorted(series.items())
        if c.startswith("train/") and c not in grouped and len({v for _, v in points}) == 1
    }


def _merge_identical(series: dict[str, list[tuple[int, float]]], cols: list[str]) -> dict[str, str]:
    """{column to draw: its label}; a column equal to an earlier one (train/loss_q2d = train/loss when there is
    no symmetric term) is drawn once, labelled with both names."""
    labels: dict[str, str] = {}
    for col in cols:
        same = next((c for c in labels if series[c] == series[col]), None)
        if same is None:
            labels[col] = col
        else:
            labels[same] += f" = {col}"
    return labels


def training_figures(series: dict[str, list[tuple[int, float]]]) -> dict[str, object]:
    """{stem: matplotlib Figure} of the training curves, one per group of TRAIN_GROUPS the CSV has columns for,
    then one per other non-constant train/* column (what a future loss term logs shows up without code here)."""
    taken: set[str] = set(constant_columns(series))
    groups = []
    for stem, title, ylabel, match in TRAIN_GROUPS:
        cols = [c for c in sorted(series) if c not in taken and match(c)]
        taken.update(cols)
        if cols:
            groups.append((stem, title, ylabel, cols))
    for col in sorted(c for c in series if c.startswith("train/") and c not in taken):
        groups.append((col.split("/", 1)[1], col, "value", [col]))
    figures = {}
    for stem, title, ylabel, cols in groups:
        fig, ax = _figure(title)
        labels = _merge_identical(series, cols)
        for col in labels:
            steps, values = zip(*series[col])
            if len(values) > 20:  # noisy per-step curves: faint raw line + EMA
                (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _ema(list(values)), color=line.get_color(), label=f"{labels[col]} (EMA 0.1)")
            else:
                ax.plot(steps, values, marker=".", label=labels[col])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures[f"train_{stem}"] = fig
    return figures


def key_metric_names(history: list[dict]) -> list[str]:
    """The metrics worth a column: <set>/ndcg@10, recall@100, mrr@10, spearman (all metrics if none match)."""
    names = sorted({name for entry in history for name in entry["metrics"]})
    keys = [n for n in names if n.rsplit("/", 1)[-1] in KEY_METRICS]
    return keys or names


def eval_figure(history: list[dict]):
    fig, ax = _figure("Evaluation over training")
    steps = [entry["step"] for entry in history]
    for name in key_metric_names(history):
        values = [entry["metrics"].get(name) for entry in history]
        ax.plot(steps, values, marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("metric")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sweep_figures(sweep: dict) -> dict[str, object]:
    """Metric vs Matryoshka dim, and metric vs bytes per document for each precision."""
    figures = {}
    rows = sweep.get("matryoshka") or []
    if rows:
        fig, ax = _figure("Matryoshka: metric vs embedding dim (fp32)")
        for name in sorted({r["set"] for r in rows}):
            mine = sorted((r for r in rows if r["set"] == name), key=lambda r: r["dim"])
            for metric, style in (("ndcg@10", "-o"), ("recall@100", "--s")):
                ax.plot([r["dim"] for r in mine], [r[metric] for r in mine], style, label=f"{name}/{metric}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["dim"] for r in rows}), [str(d) for d in sorted({r["dim"] for r in rows})])
        ax.set_xlabel("dim")
        ax.set_ylabel("metric")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures["sweep_matryoshka"] = fig
    rows = sweep.get("quantization") or []
    if rows:
        fig, ax = _figure("Quantisation: NDCG@10 vs index bytes per document")
        for r in rows:
            marker = SWEEP_MARKERS.get(r["precision"], "x")
            ax.scatter(r["bytes_per_doc"], r["ndcg@10"], marker=marker, s=40)
            ax.annotate(f"{r['precision']} d{r['dim']}", (r["bytes_per_doc"], r["ndcg@10"]), fontsize=7,
                        xytext=(5, -3), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.margins(x=0.25, y=0.1)
        ax.set_xlabel("bytes per document in the index (log2)")
        ax.set_ylabel("ndcg@10")
        fig.tight_layout()
        figures["sweep_quantization"] = fig
    return figures


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _eval_tables(history: list[dict]) -> str:
    keys = key_metric_names(history)
    rows = [[e.get("tag", ""), e["step"], *(e["metrics"].get(k, "-") for k in keys)] for e in history]
    out = _table(["tag", "step", *keys], rows)
    names = sorted({n for e in history for n in e["metrics"]})
    if len(names) > len(keys):
        every = [[e.get("tag", ""), e["step"], *(e["metrics"].get(n, "-") for n in names)] for e in history]
        out += f"<details><summary>all {len(names)} metrics</summary>{_table(['tag', 'step', *names], every)}</details>"
    return out


def _sweep_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    return _table(cols, [[r[c] for c in cols] for r in rows])


def _img(stem: str) -> str:
    return f'<figure><img src="{stem}.png" alt="{stem}"><figcaption>{stem}.png</figcaption></figure>'


STYLE = """body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{font-size:22px}h3{font-size:14px;margin-bottom:2px}
h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
.grid{display:grid;grid-template-columns:repeat(3,1fr);gap:8px}figure{margin:0}img{width:100%}
figcaption{font-size:11px;color:#888}table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
.meta td{text-align:left}.note{color:#666;font-size:13px}"""


def _meta_rows(rec: RunRecord) -> list[list]:
    s = rec.summary
    train = s.get("train") or {}
    rows = [["run directory", str(rec.run_dir)], ["initial model", s.get("model", "-")]]
    for key in ("optimizer_steps", "global_batch_size", "batch_size_per_rank", "fit_seconds"):
        if train.get(key) is not None:
            rows.append([key, train[key]])
    if s.get("wall_seconds") is not None:
        rows.append(["wall_seconds", s["wall_seconds"]])
    if rec.sweep:
        rows.append(["sweep model", rec.sweep.get("model", "-")])
    return [[name, value if isinstance(value, str) else f"{value:g}"] for name, value in rows]


def render_html(rec: RunRecord, stems: dict[str, list[str]]) -> str:
    """The page: run facts, training curves, evaluation table + plot, sweep tables + plots."""
    parts = [f"<h1>embedscale report: {html.escape(rec.run_dir.name)}</h1>"]
    parts.append(_table(["", ""], _meta_rows(rec)).replace("<table>", '<table class="meta">', 1))
    parts.append("<h2>Training curves</h2>")
    missing = [title for stem, title, _, _ in TRAIN_GROUPS if f"train_{stem}" not in stems["train"]]
    if stems["train"]:
        parts.append('<div class="grid">' + "".join(_img(s) for s in stems["train"]) + "</div>")
    constant = ", ".join(f"{c} = {v:g}" for c, v in constant_columns(rec.series).items())
    if constant:
        parts.append(f'<p class="note">Constant over the run: {html.escape(constant)}.</p>')
    if missing:
        parts.append(f'<p class="note">Not in this run\'s logs/metrics.csv: {html.escape(", ".join(missing))}.</p>')
    parts.append("<h2>Evaluation over steps</h2>")
    if rec.eval_history:
        parts.append(_eval_tables(rec.eval_history))
        parts.append('<div class="grid">' + "".join(_img(s) for s in stems["eval"]) + "</div>")
    else:
        parts.append('<p class="note">No evaluation in metrics.json or the CSV.</p>')
    parts.append("<h2>Matryoshka and quantisation sweeps</h2>")
    if rec.sweep:
        for kind in ("matryoshka", "quantization"):
            if rec.sweep.get(kind):
                parts.append(f"<h3>{kind}</h3>{_sweep_table(rec.sweep[kind])}")
        parts.append('<div class="grid">' + "".join(_img(s) for s in stems["sweep"]) + "</div>")
    else:
        parts.append('<p class="note">No sweep.json: <code>embedscale sweep model.name_or_path=RUN_DIR/model '
                     "sweep.output=RUN_DIR/sweep.json</code> adds one.</p>")  # fmt: skip
    body = "\n".join(parts)
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>embedscale report: '
        f"{html.escape(rec.run_dir.name)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write <out_dir or RUN_DIR/report>/index.html and its PNGs; returns the HTML path."""
    import matplotlib.pyplot as plt

    rec = load_run(Path(run_dir))
    out_dir = Path(out_dir) if out_dir else rec.run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"train": training_figures(rec.series), "eval": {}, "sweep": {}}
    if rec.eval_history:
        figures["eval"] = {"eval_over_steps": eval_figure(rec.eval_history)}
    if rec.sweep:
        figures["sweep"] = sweep_figures(rec.sweep)
    for group in figures.values():
        for stem, fig in group.items():
            fig.savefig(out_dir / f"{stem}.png")
            plt.close(fig)
    page = out_dir / "index.html"
    page.write_text(render_html(rec, {k: list(v) for k, v in figures.items()}))
    return page


def _wandb_run_id(run_dir: Path) -> str | None:
    """The id of the wandb run that WandbLogger(save_dir=RUN_DIR) created (wandb/*run-<id>/)."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def _wandb_project(run_dir: Path) -> str:
    """logger.project of the run (metrics.json's config), so that resuming finds the run in its project."""
    path = run_dir / "metrics.json"
    config = json.loads(path.read_text()).get("config", {}) if path.is_file() else {}
    return (config.get("logger") or {}).get("project") or "embedscale"


def log_report_to_wandb(run_dir: Path, *, resume: bool = False) -> bool:
    """Log the report's PNGs (as wandb.Image under report/) and its tables to the active wandb run.

    Without an active run: with `resume`, re-open the run found under RUN_DIR/wandb (the run's own page;
    $WANDB_MODE applies), else do nothing. Returns whether anything was logged. Call `write_report` first."""
    import wandb

    run_dir = Path(run_dir)
    report = run_dir / "report"
    pngs = sorted(report.glob("*.png"))
    if not pngs:
        raise ValueError(f"{report} has no PNGs: run `embedscale report {run_dir}` (write_report) first")
    own = False
    if wandb.run is None:
        if not resume:
            log.info("no active wandb run: report not logged to wandb")
            return False
        run_id = _wandb_run_id(run_dir)
        if run_id is None:
            raise ValueError(f"{run_dir}/wandb holds no wandb run: --wandb needs a run trained with logger=wandb")
        wandb.init(id=run_id, resume="allow", dir=str(run_dir), project=_wandb_project(run_dir))
        own = True
    rec = load_run(run_dir)
    payload: dict = {f"report/{png.stem}": wandb.Image(str(png)) for png in pngs}
    for kind in ("matryoshka", "quantization"):
        rows = (rec.sweep or {}).get(kind) or []
        if rows:
            payload[f"report/sweep_{kind}_table"] = wandb.Table(
                columns=list(rows[0]), data=[list(r.values()) for r in rows]
            )
    if rec.eval_history:
        keys = key_metric_names(rec.eval_history)
        data = [[e["step"], *(e["metrics"].get(k) for k in keys)] for e in rec.eval_history]
        payload["report/eval_table"] = wandb.Table(columns=["step", *keys], data=data)
    wandb.run.log(payload)
    if own:
        wandb.finish()
    return True
