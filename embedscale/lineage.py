"""Pipelines of stages (train, mine, evaluate, shard, reranker), each from the last, with lineage per stage
(`embedscale pipeline`, embedscale/jobs/pipeline.py).

    embedscale pipeline                                  # recipe=iterative: train -> mine with it -> train
    embedscale pipeline recipe=iterative pipeline.output=runs/iter1
    embedscale pipeline pipeline.only=[round2]           # re-run one stage (earlier ones must be done)

A stage is a job name and Hydra overrides, composed exactly as `embedscale <job> <overrides>` would
be (same schemas, same compose-time errors). In overrides, `{name}` is the directory of stage `name`
and `{self}` this stage's own, so a stage starts from its parent's export (`model.name_or_path=
{round1}/model`) or mined shards (`data.sources=[{path:{mine1}/shards}]`).

Every stage directory gets `lineage.json`: the job, the overrides as written and as resolved, the
parent stages, the full resolved config, the data manifests it read, what it produced (metrics, export,
mined-negative provenance) and its wall time. A stage whose lineage.json says `done` is skipped when
the pipeline is run again (a crashed or preempted pipeline continues where it stopped).

Why in-process: each stage's `run(cfg)` is the same function the job's CLI calls; no shell glue, and a
failing stage stops the pipeline with its own error message.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from embedscale.config import PipelineConfig
from embedscale.jobs import JOBS

_REF = re.compile(r"\{([A-Za-z0-9_-]+)\}")


def resolve_overrides(overrides: list[str], dirs: dict[str, Path], stage: str) -> tuple[list[str], list[str]]:
    """Replace {name} / {self} by stage directories; (resolved overrides, parent stage names)."""
    parents: list[str] = []

    def sub(m: re.Match) -> str:
        ref = m.group(1)
        if ref == "self":
            return str(dirs[stage])
        if ref not in dirs:
            return m.group(0)  # not a stage reference (e.g. a Hydra dict literal): left as written
        if list(dirs).index(ref) >= list(dirs).index(stage):
            raise ValueError(f"pipeline stage {stage!r} refers to {{{ref}}}, which runs after it: reorder the stages")
        if ref not in parents:
            parents.append(ref)
        return str(dirs[ref])

    return [_REF.sub(sub, o) for o in overrides], parents


def resolve_refs(value: Any, dirs: dict[str, Path], stage: str, parents: list[str]) -> Any:
    """`resolve_overrides` through a nested stage `config` (strings in dicts and lists)."""
    if isinstance(value, str):
        (resolved,), found = resolve_overrides([value], dirs, stage)
        parents.extend(p for p in found if p not in parents)
        return resolved
    if isinstance(value, dict):
        return {k: resolve_refs(v, dirs, stage, parents) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_refs(v, dirs, stage, parents) for v in value]
    return value


def manifests_read(cfg) -> list[dict]:
    """Name, path and sha256 of the shard manifests a train stage reads (lineage of its data)."""
    from embedscale.data.records import resolve_data_root, resolve_path

    data = getattr(cfg, "data", None)
    if data is None or getattr(data.format, "value", None) != "shards":
        return []
    from embedscale.data.shards import MANIFEST, sha256_file

    root = resolve_data_root(data.root)
    paths = [s.path for s in data.sources] or [data.path]
    out = []
    for p in paths:
        manifest = resolve_path(p, root) / MANIFEST
        if manifest.exists():
            meta = json.loads(manifest.read_text())
            out.append(
                {
                    "path": str(manifest.parent),
                    "name": meta.get("name"),
                    "sha256": sha256_file(manifest),
                    "mining": meta.get("mining", {}).get("model"),
                }
            )
    return out


def produced(job: str, result: dict) -> dict:
    if job == "train":
        keys = ("eval", "export_dir", "train", "init_from")
        return {k: result.get(k) for k in keys}
    if job == "reranker":
        return {"eval": result.get("eval"), "model_dir": result.get("model_dir"), "biencoder": result.get("biencoder")}
    if job == "mine":
        mining = result.get("mining", {})
        return {"samples": result.get("num_samples"), "counts": mining.get("counts"), "model": mining.get("model")}
    if job == "evaluate":
        return {"metrics": result}
    return {"samples": result.get("num_samples")}


TABLE_METRICS = ("ndcg@10", "recall@100", "spearman")


def metrics_table(summary: list[dict]) -> list[dict]:
    """One row per evaluated stage: the start (the first evaluated stage's `before`), then every train or
    evaluate stage's final metrics (ndcg@10, recall@100 of each BEIR set; spearman of each STS set)."""
    rows: list[dict] = []
    for s in summary:
        produced = s.get("produced") or {}
        if s["job"] == "train":
            evals = produced.get("eval") or {}
            if not rows and evals.get("before"):
                rows.append({"stage": f"start ({s['stage']} before)", **evals["before"]})
            if evals.get("after"):
                rows.append({"stage": s["stage"], **evals["after"]})
        elif s["job"] == "evaluate" and produced.get("metrics"):
            rows.append({"stage": s["stage"], **produced["metrics"]})
    return [{k: v for k, v in row.items() if k == "stage" or k.rsplit("/", 1)[-1] in TABLE_METRICS} for row in rows]


def run_stages(p: PipelineConfig, out: Path) -> dict[str, Any]:
    """Run pipeline.stages in order under `out` (one directory per stage, lineage.json in each, pipeline.json at
    the end); stages done before are skipped when pipeline.resume. Returns {output, stages, metrics}."""
    import importlib

    from embedscale.export import to_jsonable
    from embedscale.jobs.launch import compose

    out.mkdir(parents=True, exist_ok=True)
    dirs = {s.name: out / s.name for s in p.stages}
    # Several tasks may run one stage (srun, torchrun): each runs the job, only the first writes lineage.
    lead = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
    summary: list[dict] = []
    for stage in p.stages:
        lineage_path = dirs[stage.name] / "lineage.json"
        if p.only and stage.name not in p.only:
            continue  # its directory is still what {name} resolves to for the stages that run
        if p.resume and lineage_path.exists() and json.loads(lineage_path.read_text()).get("status") == "done":
            print(f"[pipeline] {stage.name}: done before, skipped ({lineage_path})")
            summary.append(json.loads(lineage_path.read_text()))
            continue
        overrides = list(stage.overrides) + list(p.overrides.get(stage.job, []))
        if stage.job == "mine" and not any(o.startswith("mine.output=") for o in overrides):
            overrides.append("mine.output={self}/shards")
        if stage.job in ("train", "reranker") and not any(o.startswith("run_dir=") for o in overrides):
            overrides.append("run_dir={self}")
        if stage.job == "train" and not any(o.startswith(("overwrite=", "trainer.resume=")) for o in overrides):
            overrides.append("overwrite=true")  # the pipeline owns its stage directories: a re-run replaces the stage
        resolved, parents = resolve_overrides(overrides, dirs, stage.name)
        extra = resolve_refs(dict(stage.config), dirs, stage.name, parents)
        stage_cfg = compose(stage.job, resolved, extra)
        dirs[stage.name].mkdir(parents=True, exist_ok=True)
        lineage = {
            "stage": stage.name,
            "job": stage.job,
            "status": "running",
            "overrides": list(stage.overrides),
            "resolved_overrides": resolved,
            "stage_config": extra,
            "parents": {name: str(dirs[name]) for name in parents},
            "config": to_jsonable(stage_cfg),
            "data_manifests": manifests_read(stage_cfg),
        }
        if lead:
            lineage_path.write_text(json.dumps(lineage, indent=2) + "\n")
        print(f"[pipeline] {stage.name}: embedscale {stage.job} " + " ".join(resolved), flush=True)
        start = time.perf_counter()
        result = importlib.import_module(JOBS[stage.job].module).run(stage_cfg, run_dir=dirs[stage.name])
        lineage.update(
            status="done", seconds=round(time.perf_counter() - start, 1), produced=produced(stage.job, result)
        )
        if lead:
            lineage_path.write_text(json.dumps(to_jsonable(lineage), indent=2) + "\n")
        summary.append(lineage)
    table = [
        {"stage": s["stage"], "job": s["job"], "seconds": s.get("seconds"), "produced": s.get("produced")}
        for s in summary
    ]
    rows = metrics_table(summary)
    if lead:
        record = {"name": p.name, "stages": to_jsonable(table), "metrics": rows}
        (out / "pipeline.json").write_text(json.dumps(record, indent=2) + "\n")
    return {"output": str(out), "stages": summary, "metrics": rows, "lead": lead}
