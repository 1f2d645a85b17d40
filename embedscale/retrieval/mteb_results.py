"""MTEB-compatible result files from embedscale's own BEIR/STS evaluation: no hub access, no `mteb` needed.

Why result files and not `mteb.evaluate`: mteb's tasks download their data from the Hugging Face hub,
which this machine (like many clusters) cannot reach, while embedscale's evaluators already compute the
same numbers on the same splits with trec_eval semantics (all-MiniLM-L6-v2 on SciFact test: NDCG@10
0.6451 here, 0.645 on the MTEB leaderboard). So `embedscale evaluate ... mteb_output=DIR` writes what
`mteb` itself writes after a run -- one TaskResult JSON per task at
DIR/<model name, "/" -> "__">/<revision>/<TaskName>.json, next to a model_meta.json -- which mteb's
`TaskResult.from_disk`, `ResultCache(DIR).load_results()` and the leaderboard tooling read
(tests/test_report.py loads them with mteb when it is installed).

What is written: the metrics embedscale computes, renamed to mteb's keys (`ndcg@10` -> `ndcg_at_10`, likewise
map, recall, mrr; STS `spearman` -> `cosine_spearman`), `main_score` = ndcg_at_10 (retrieval) or
cosine_spearman (STS), as mteb's task metadata says; hf_subset "default", languages ["eng-Latn"]. Not
written: the metrics mteb adds that embedscale does not compute (precision_at_k, nAUC, pearson...).
`dataset_revision` is that of mteb's task (the numbers come from a local copy of the same split, recorded
under "embedscale", a key TaskResult ignores when loading); `mteb_version` is null (mteb did not run).
Sets without an MTEB task in `MTEB_TASKS` are skipped, and the log names them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

# our set name (BEIR directory / STS set name, lower case) -> (MTEB task, dataset revision, main score), from mteb 2.x
MTEB_TASKS = {
    "scifact": ("SciFact", "d56462d0e63a25450459c4f213e49ffdb866f7f9", "ndcg_at_10"),
    "nfcorpus": ("NFCorpus", "ec0fa4fe99da2ff19ca1214b7966684033a58814", "ndcg_at_10"),
    "fiqa": ("FiQA2018", "27a168819829fe9bcd655c2df245fb19452e8e06", "ndcg_at_10"),
    "arguana": ("ArguAna", "c22ab2a51041ffd869aaddef7af8d8215647e41a", "ndcg_at_10"),
    "scidocs": ("SCIDOCS", "f8c2fcf00f625baaa80f62ec5bd9e1fff3b8ae88", "ndcg_at_10"),
    "trec-covid": ("TRECCOVID", "bb9466bac8153a0349341eb1b22e06409e78ef4e", "ndcg_at_10"),
    "webis-touche2020": ("Touche2020", "a34f9a33db75fa0cbb21bb5cfc3dae8dc8bec93f", "ndcg_at_10"),
    "quora": ("QuoraRetrieval", "e4e08e0b7dbe3c8700f0daef558ff32256715259", "ndcg_at_10"),
    "nq": ("NQ", "b774495ed302d8c44a3a7ea25c90dbce03968f31", "ndcg_at_10"),
    "hotpotqa": ("HotpotQA", "ab518f4d6fcca38d87c25209f94beba119d02014", "ndcg_at_10"),
    "fever": ("FEVER", "bea83ef9e8fb933d90a2f1d5515737465d613e12", "ndcg_at_10"),
    "climate-fever": ("ClimateFEVER", "47f2ac6acb640fc46020b02a5b59fdda04d39380", "ndcg_at_10"),
    "dbpedia-entity": ("DBPedia", "c0f706b76e590d620bd6618b3ca8efdd34e2d659", "ndcg_at_10"),
    "msmarco": ("MSMARCO", "c5a29a104738b98a9e76336939199e264163d4a0", "ndcg_at_10"),
    "stsb": ("STSBenchmark", "b0fddb56ed78048fa8b90373c8a3cfc37b684831", "cosine_spearman"),
    "sick-r": ("SICK-R", "20a6d6f312dd54037fe07a32d58e5e168867909d", "cosine_spearman"),
    "biosses": ("BIOSSES", "d3fb88f8f02e40887cd149695127462bbcf29b4a", "cosine_spearman"),
}


def mteb_scores(metrics: dict[str, float], main_score: str) -> dict[str, float]:
    """One set's metrics ({"ndcg@10": ...} or {"spearman": ...}) under mteb's names, with main_score."""
    scores = {}
    for name, value in metrics.items():
        if name == "spearman":
            scores["cosine_spearman"] = value
        elif "@" in name:
            metric, k = name.split("@")
            scores[f"{metric}_at_{k}"] = value
    if main_score not in scores:
        raise ValueError(f"the metrics {sorted(metrics)} lack mteb's main score {main_score}: add 10 to eval.k_values")
    return {**scores, "main_score": scores[main_score], "hf_subset": "default", "languages": ["eng-Latn"]}


def mteb_model_name(name_or_path: str) -> str:
    """A hub id stays itself; a local directory becomes local/<its name> (<run dir name> for <run>/model)."""
    path = Path(name_or_path)
    if not path.exists():
        return name_or_path
    path = path.resolve()
    return f"local/{path.parent.name if path.name == 'model' else path.name}"


def evaluated_sets(eval_cfg, evaluators: list) -> list[tuple[str, str, str]]:
    """(name, split, path) of each evaluator built by `build_evaluators(eval_cfg)` (BEIR sets, then STS files;
    an STS file's split is its stem: stsb/test.tsv -> test)."""
    specs = [(s.split, s.path) for s in eval_cfg.beir] + [(Path(s.path).stem, s.path) for s in eval_cfg.sts]
    return [(ev.name, split, path) for ev, (split, path) in zip(evaluators, specs, strict=True)]


def write_mteb_results(
    metrics: dict[str, float],
    sets: list[tuple[str, str, str]],
    out_dir: Path,
    *,
    model_name: str,
    revision: str,
) -> list[Path]:
    """Write one TaskResult JSON per set MTEB knows, plus model_meta.json; returns the task files.

    Args:
        metrics: evaluate_all's {"<set>/<metric>": value}.
        sets: (set name, split, data path) of each evaluated set; the split becomes the scores' key.
        out_dir: the results root (mteb's layout below it).
        model_name: e.g. sentence-transformers/all-MiniLM-L6-v2 or local/<run>; "/" becomes "__" in the path.
        revision: the model's revision (embedscale: the weights' fingerprint).
    """
    target = Path(out_dir) / model_name.replace("/", "__").replace(" ", "_") / revision
    written, skipped = [], []
    for name, split, data in sets:
        task = MTEB_TASKS.get(name.lower())
        if task is None:
            skipped.append(name)
            continue
        task_name, dataset_revision, main_score = task
        mine = {key.split("/", 1)[1]: v for key, v in metrics.items() if key.split("/", 1)[0] == name}
        result = {
            "dataset_revision": dataset_revision,
            "task_name": task_name,
            "mteb_version": None,
            "scores": {split: [mteb_scores(mine, main_score)]},
            "evaluation_time": None,
            "kg_co2_emissions": None,
            "date": time.time(),
            "embedscale": {"set": name, "data": data, "note": "computed by embedscale's evaluator on a local copy"},
        }
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{task_name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        written.append(path)
    if skipped:
        log.warning("MTEB results: no MTEB task for set(s) %s (known: %s); not written", skipped, sorted(MTEB_TASKS))
    if written:
        (target / "model_meta.json").write_text(json.dumps({"name": model_name, "revision": revision}, indent=2) + "\n")
    return written
