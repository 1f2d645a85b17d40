"""`embedscale pipeline`: the iterative recipe (train -> mine with that model -> train from its export)
end to end on a tiny BERT, lineage files, resume skipping finished stages, reference errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import as_list as _as_list
from helpers import clean_env
from helpers import tiny_pipeline_overrides as _tiny

from embedscale.lineage import resolve_overrides


@pytest.mark.slow  # the real MiniLM
def test_iterative_recipe_end_to_end(tiny_bert, tiny_data, tmp_path):
    args = [sys.executable, "-m", "embedscale.cli", "pipeline", *_tiny(tiny_bert, tiny_data, tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = tmp_path / "pipe"
    lineage = {s: json.loads((pipe / s / "lineage.json").read_text()) for s in ("round1", "mine1", "round2")}
    assert all(v["status"] == "done" for v in lineage.values())
    assert lineage["mine1"]["parents"] == {"round1": str(pipe / "round1")}
    assert lineage["round2"]["parents"] == {"round1": str(pipe / "round1"), "mine1": str(pipe / "mine1")}
    # mining used round 1's fine-tuned export, and round 2 read those shards
    mined = json.loads((pipe / "mine1" / "shards" / "manifest.json").read_text())
    assert mined["mining"]["model"]["name_or_path"] == str(pipe / "round1" / "model")
    assert lineage["round2"]["data_manifests"][0]["path"] == str(pipe / "mine1" / "shards")
    assert lineage["round2"]["config"]["model"]["name_or_path"] == str(pipe / "round1" / "model")
    assert lineage["round2"]["produced"]["train"]["optimizer_steps"] == 2
    assert (pipe / "round2" / "model" / "model.safetensors").is_file()
    assert json.loads((pipe / "pipeline.json").read_text())["stages"][2]["stage"] == "round2"

    again = subprocess.run(args, capture_output=True, text=True, env=clean_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, skipped") == 3


def test_references_must_point_backwards(tmp_path):
    dirs = {"a": tmp_path / "a", "b": tmp_path / "b"}
    resolved, parents = resolve_overrides(["x={a}/model", "y={self}/out", "z=[{path:p}]"], dirs, "b")
    assert resolved == [f"x={tmp_path / 'a'}/model", f"y={tmp_path / 'b'}/out", "z=[{path:p}]"] and parents == ["a"]
    with pytest.raises(ValueError, match="runs after it"):
        resolve_overrides(["x={b}/model"], dirs, "a")


@pytest.mark.slow  # the real MiniLM
def test_four_stage_recipe_on_the_shared_data(tiny_bert, shared_data, tmp_path):
    """recipe=four_stage_cpu as shipped (pretrain on the SciFact corpus -> weak on MedQuAD -> mine -> fine-tune
    with the mined negatives -> shard MedQuAD -> instruct on the mixture), on the real data, with a tiny BERT and
    2 steps per training stage: every stage done, each starting from the last, the metrics table written."""
    import os

    common = ["trainer.max_steps=2", "logger.loggers=[csv]", "trainer.progress=off"]
    common += [f"eval.cache_dir={tmp_path / 'cache'}", "model.query_max_length=32"]
    train = [f"model.name_or_path={tiny_bert}", "data.max_samples=400", *common]
    args = [sys.executable, "-m", "embedscale.cli", "pipeline", "recipe=four_stage_cpu"]
    args += [f"pipeline.output={tmp_path / 'pipe'}", "+pipeline.overrides.train=" + _as_list(train)]
    args += [f"+pipeline.overrides.mine=['mine.cache_dir={tmp_path / 'cache'}']"]
    env = {**clean_env(), "EMBEDSCALE_DATA": str(shared_data)}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = tmp_path / "pipe"
    stages = ["pretrain", "weak", "mine", "finetune", "medquad", "instruct"]
    lineage = {s: json.loads((pipe / s / "lineage.json").read_text()) for s in stages}
    assert all(v["status"] == "done" for v in lineage.values())
    # each training stage starts from its parent's export, recorded with the parent's metrics
    for stage, parent in (("weak", "pretrain"), ("finetune", "weak"), ("instruct", "finetune")):
        init = lineage[stage]["produced"]["init_from"]
        assert (
            init["path"] == str(pipe / parent / "model")
            and init["eval"] == lineage[parent]["produced"]["eval"]["after"]
        )
        assert parent in lineage[stage]["parents"]
    assert lineage["pretrain"]["config"]["data"]["format"] == "corpus"
    assert lineage["mine"]["config"]["model"]["name_or_path"] == str(pipe / "weak" / "model")
    assert lineage["finetune"]["data_manifests"][0]["path"] == str(pipe / "mine" / "shards")
    sources = lineage["instruct"]["config"]["data"]["sources"]
    assert [s["name"] for s in sources] == ["scifact", "medquad"] and sources[0]["query_prefix"].startswith(
        "Instruct: "
    )
    assert {m["path"] for m in lineage["instruct"]["data_manifests"]} == {
        str(pipe / "mine" / "shards"),
        str(pipe / "medquad" / "shards"),
    }
    table = json.loads((pipe / "pipeline.json").read_text())["metrics"]
    assert [r["stage"] for r in table] == ["start (pretrain before)", "pretrain", "weak", "finetune", "instruct"]
    assert all({"scifact/ndcg@10", "scifact/recall@100", "stsb/spearman"} <= set(r) for r in table)
    assert "metrics after each stage" in proc.stdout
    # every stage wrote under pipeline.output (Hydra's own run directory keeps only the pipeline's config and log)
    assert not any(os.path.exists(tmp_path / "runs" / job) for job in ("train", "mine", "shard"))
