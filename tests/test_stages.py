"""Recipe stages (conf/stage/): each composes as a small diff over the train defaults, required values fail at
compose time naming the key, `init_from` starts from an earlier run's export, a pipeline stage's nested
`config` merges with `{stage}` references, and evaluation sets carry their own query instruction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from embedscale.config import DataFormat
from embedscale.jobs.launch import compose as compose_stage
from embedscale.lineage import metrics_table, resolve_refs


def test_stages_are_small_diffs_over_the_defaults():
    base = compose_stage("train", [])
    pre = compose_stage("train", ["stage=pretrain"])
    assert pre.data.format is DataFormat.corpus and pre.data.global_batch_size == 1024
    assert pre.loss.symmetric_weight == 1.0 and pre.gradcache.chunk_size == 64
    weak = compose_stage("train", ["stage=weak", "init_from=/runs/pretrain"])
    assert weak.data.path == "medquad/pairs.jsonl.gz" and weak.data.num_hard_negatives == 0
    assert (
        weak.data.global_batch_size == 4096 and weak.gradcache.chunk_size == 128 and weak.init_from == "/runs/pretrain"
    )
    fine = compose_stage("train", ["stage=finetune", "data.path=/mined/shards"])
    assert fine.data.format is DataFormat.shards and fine.data.num_hard_negatives == 3
    # everything a stage does not mention stays the default
    for cfg in (pre, weak, fine):
        assert cfg.model == base.model and cfg.trainer == base.trainer and cfg.eval == base.eval
    assert compose_stage("reranker", ["stage=reranker", "reranker.data=[/x]"]).reranker.num_negatives == 3


@pytest.mark.parametrize(("stage", "key"), [("finetune", "data.path"), ("instruct", "data.sources")])
def test_a_stage_names_the_value_it_needs(stage, key):
    with pytest.raises(Exception, match=f"required value missing: {key}") as err:
        compose_stage("train", [f"stage={stage}"])
    assert key in str(err.value)


def test_stage_config_merges_nested_values_with_references(tmp_path):
    dirs = {"mine": tmp_path / "mine", "instruct": tmp_path / "instruct"}
    extra = {
        "data": {"sources": [{"path": "{mine}/shards", "query_prefix": "Instruct: find evidence\nQuery: "}]},
        "eval": {"beir": [{"path": "scifact", "query_prefix": "Instruct: find evidence\nQuery: "}]},
    }
    parents: list[str] = []
    resolved = resolve_refs(extra, dirs, "instruct", parents)
    assert parents == ["mine"] and resolved["data"]["sources"][0]["path"] == f"{tmp_path}/mine/shards"
    cfg = compose_stage("train", ["stage=instruct"], resolved)
    assert cfg.data.sources[0].path == f"{tmp_path}/mine/shards"
    assert cfg.data.sources[0].query_prefix == "Instruct: find evidence\nQuery: "  # a real newline
    assert cfg.eval.beir[0].query_prefix == "Instruct: find evidence\nQuery: "
    with pytest.raises(ValueError, match="data.sourcez"):
        compose_stage("train", ["stage=instruct"], {"data": {"sourcez": []}})


def test_init_from_takes_a_run_directory_or_an_export(tmp_path):
    from embedscale.export import resolve_init_from

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "embedscale.json").write_text("{}")
    after = {"scifact/ndcg@10": 0.7}
    (run / "metrics.json").write_text(json.dumps({"model": "base", "eval": {"after": after}}))
    path, parent = resolve_init_from(str(run))
    assert path == str(run / "model") and parent["eval"] == after and parent["run_dir"] == str(run)
    assert resolve_init_from(str(run / "model"))[0] == str(run / "model")
    with pytest.raises(ValueError, match=r"init_from=.*no embedscale.json"):
        resolve_init_from(str(tmp_path))


def test_metrics_table_rows_per_stage():
    summary = [
        {
            "stage": "a",
            "job": "train",
            "produced": {"eval": {"before": {"s/ndcg@10": 0.1, "s/mrr@10": 0.0}, "after": {"s/ndcg@10": 0.2}}},
        },
        {"stage": "m", "job": "mine", "produced": {"samples": 3}},
        {"stage": "b", "job": "train", "produced": {"eval": {"after": {"s/ndcg@10": 0.3, "sts/spearman": 0.5}}}},
    ]
    rows = metrics_table(summary)
    assert [r["stage"] for r in rows] == ["start (a before)", "a", "b"]
    assert rows[0] == {"stage": "start (a before)", "s/ndcg@10": 0.1} and rows[2]["sts/spearman"] == 0.5


def test_eval_query_instruction_replaces_the_model_prefix(tiny_bert):
    import dataclasses

    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import encode_texts, load_encoder

    encoder, tok = load_encoder(ModelConfig(name_or_path=str(tiny_bert), query_prefix="query: "))
    texts = ["a claim about cells", "another claim"]
    instructed = encode_texts(encoder, tok, texts, side="query", prefix="Instruct: find\nQuery: ")
    plain = dataclasses.replace(encoder.cfg, query_prefix="")
    encoder.cfg = plain
    by_hand = encode_texts(encoder, tok, ["Instruct: find\nQuery: " + t for t in texts], side="query")
    torch.testing.assert_close(instructed, by_hand)
    assert not torch.allclose(instructed, encode_texts(encoder, tok, texts, side="query"))


def test_recipe_files_compose(tmp_path):
    """Every recipe composes, and so does every stage of it: its job's config with the stage's overrides and
    config (references to earlier stages resolved), as `embedscale pipeline` composes it before running it."""
    from hydra import compose, initialize_config_dir

    from embedscale.config import PipelineJobConfig, register_configs, to_config
    from embedscale.jobs.launch import compose as compose_job
    from embedscale.jobs.launch import conf_dir
    from embedscale.lineage import resolve_overrides, resolve_refs

    register_configs()
    for recipe in sorted(p.stem for p in (Path(conf_dir()) / "recipe").glob("*.yaml")):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = to_config(compose(config_name="pipeline", overrides=[f"recipe={recipe}"]), PipelineJobConfig)
        assert cfg.pipeline.stages, recipe
        dirs = {s.name: tmp_path / recipe / s.name for s in cfg.pipeline.stages}
        for stage in cfg.pipeline.stages:
            resolved, parents = resolve_overrides(list(stage.overrides), dirs, stage.name)
            composed = compose_job(stage.job, resolved, resolve_refs(dict(stage.config), dirs, stage.name, parents))
            assert composed is not None, (recipe, stage.name)
