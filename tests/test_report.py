"""Quantisation with known answers, Matryoshka/precision sweeps on a tiny model, the report of a tiny
training run (HTML + PNGs, wandb offline), and MTEB result files read back by mteb."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from embedscale.config import SweepJobConfig, TrainConfig, register_configs, to_config
from embedscale.jobs.launch import conf_dir
from embedscale.retrieval.evaluator import exact_search
from embedscale.retrieval.quantize import (
    PRECISIONS,
    bytes_per_doc,
    calibrate_int8,
    default_dims,
    dequantize_int8,
    quantize_int8,
    quantized_search,
)


def _compose(name, schema, overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return to_config(compose(config_name=name, overrides=overrides), schema)


def test_binary_search_of_pm1_vectors_equals_exact_search():
    g = torch.Generator().manual_seed(0)
    dim = 64
    docs_ND = (torch.randint(0, 2, (300, dim), generator=g).float() * 2 - 1) / math.sqrt(dim)
    q_QD = (torch.randint(0, 2, (12, dim), generator=g).float() * 2 - 1) / math.sqrt(dim)
    scores_QK, idx_QK, size = quantized_search(q_QD, docs_ND, "binary", 10)
    exact_QK, _ = exact_search(q_QD, docs_ND, 10)
    torch.testing.assert_close(scores_QK, exact_QK)  # sign bits lose nothing on +-1 vectors
    torch.testing.assert_close((q_QD @ docs_ND.T).gather(1, idx_QK), exact_QK)  # the right documents (up to ties)
    assert size == dim // 8


def test_int8_error_is_at_most_half_a_step_and_out_of_range_values_clip():
    g = torch.Generator().manual_seed(1)
    docs_ND = torch.nn.functional.normalize(torch.randn(500, 48, generator=g), dim=-1)
    cal = calibrate_int8(docs_ND)
    codes_ND = quantize_int8(docs_ND, cal)
    assert codes_ND.dtype == torch.int8 and codes_ND.min() == -128 and codes_ND.max() == 127
    error_ND = (dequantize_int8(codes_ND, cal) - docs_ND).abs()
    assert (error_ND <= cal.step_D / 2 + 1e-6).all()
    far_1D = docs_ND.max(dim=0).values[None] + 1.0
    assert (quantize_int8(far_1D, cal) == 127).all()


def _planted(seed=2, dim=256, num_queries=20):
    """Random documents plus, per query, 5 noisy copies of it at well separated noise levels."""
    g = torch.Generator().manual_seed(seed)
    q_QD = torch.nn.functional.normalize(torch.randn(num_queries, dim, generator=g), dim=-1)
    docs = [torch.nn.functional.normalize(torch.randn(2000, dim, generator=g), dim=-1)]
    for level in (0.02, 0.4, 0.8, 1.2, 1.6):
        noisy = q_QD + level * torch.randn(num_queries, dim, generator=g) / math.sqrt(dim)
        docs.append(torch.nn.functional.normalize(noisy, dim=-1))
    return q_QD, torch.cat(docs)


def test_rescoring_recovers_the_exact_top_k_on_an_easy_case():
    q_QD, docs_ND = _planted()
    _, exact_QK = exact_search(q_QD, docs_ND, 5)
    _, int8_QK, _ = quantized_search(q_QD, docs_ND, "int8", 5)
    _, rescored_QK, size = quantized_search(q_QD, docs_ND, "binary_rescore_int8", 5, rescore_multiplier=4)
    _, signs_QK, _ = quantized_search(q_QD, docs_ND, "binary_rescore", 5, rescore_multiplier=4)
    assert torch.equal(int8_QK, exact_QK)
    assert torch.equal(rescored_QK, exact_QK) and size == 256 // 8
    assert torch.equal(signs_QK.sort(dim=1).values, exact_QK.sort(dim=1).values)  # the same 5 documents


def test_bytes_per_doc_and_default_dims():
    assert [bytes_per_doc(p, 33) for p in PRECISIONS] == [132, 33, 5, 5, 5]  # bits padded to whole bytes
    assert default_dims(384) == [32, 64, 128, 256, 384]
    assert default_dims(1024) == [32, 64, 128, 256, 512, 1024]
    assert default_dims(16) == [16]
    with pytest.raises(ValueError, match="precision"):
        quantized_search(torch.zeros(1, 8), torch.zeros(2, 8), "fp16", 1)


def test_sweep_config_checks_name_the_key():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:  # an enum: refused while composing, naming the key
        _compose("sweep", SweepJobConfig, ["sweep.precisions=[fp16]"])
    assert "sweep.precisions" in str(err.value.__cause__)
    with pytest.raises(ValueError, match="eval.sts"):
        _compose("sweep", SweepJobConfig, ["eval=scifact_stsb"])
    cfg = _compose("sweep", SweepJobConfig, [])
    assert cfg.sweep.dims == [] and list(cfg.sweep.precisions) == list(PRECISIONS)


def _sweep_cfg(tiny_bert, tiny_data, tmp_path, output, *extra):
    return _compose(
        "sweep",
        SweepJobConfig,
        [
            f"model.name_or_path={tiny_bert}",
            "model.document_max_length=32",
            f"data_root={tiny_data}",
            "eval.beir.0.path=tiny",
            f"eval.cache_dir={tmp_path / 'cache'}",
            f"sweep.output={output}",
            *extra,
        ],
    )


def test_sweeps_encode_once_and_give_a_row_per_setting(tiny_bert, tiny_data, tmp_path, monkeypatch):
    from embedscale.jobs.sweep import run
    from embedscale.retrieval.evaluator import RetrievalEvaluator

    calls = []
    embeddings = RetrievalEvaluator.embeddings
    monkeypatch.setattr(RetrievalEvaluator, "embeddings", lambda self, *a: calls.append(1) or embeddings(self, *a))
    out = tmp_path / "sweep.json"
    cfg = _sweep_cfg(tiny_bert, tiny_data, tmp_path, out, "sweep.dims=[8,16,32]", "sweep.quantization_dims=[16,32]")
    result = run(cfg, run_dir=tmp_path)
    assert len(calls) == 1  # one encoding for 3 dims x 5 precisions x 2 dims
    assert json.loads(out.read_text())["matryoshka"] == result["matryoshka"]
    mat, quant = result["matryoshka"], result["quantization"]
    assert [r["dim"] for r in mat] == [8, 16, 32] and [r["bytes_per_doc"] for r in mat] == [32, 64, 128]
    assert [(r["dim"], r["precision"]) for r in quant] == [(d, p) for d in (16, 32) for p in PRECISIONS]
    for dim in (16, 32):
        sizes = [r["bytes_per_doc"] for r in quant if r["dim"] == dim]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] == 4 * dim and sizes[-1] == dim // 8
    assert all(0 <= r["ndcg@10"] <= 1 and 0 <= r["recall@100"] <= 1 for r in mat + quant)
    # the fp32 rows at full dim are the evaluator's own numbers
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder

    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(tiny_bert), document_max_length=32))
    ev = RetrievalEvaluator.from_beir(tiny_data / "tiny", "test", max_length=32, cache_dir=tmp_path / "cache")
    reference = ev(encoder, tokenizer)
    for row in (mat[-1], quant[-len(PRECISIONS)]):
        assert row["dim"] == 32 and row["precision"] == "fp32"
        assert row["ndcg@10"] == pytest.approx(reference["tiny/ndcg@10"], abs=1e-6)
        assert row["recall@100"] == pytest.approx(reference["tiny/recall@100"], abs=1e-6)


@pytest.fixture(scope="module")
def tiny_run(tiny_bert, tiny_data, tmp_path_factory):
    """A 6-step training run with evaluations every 2 steps, and a sweep of its export in sweep.json."""
    from embedscale.jobs.sweep import run as sweep
    from embedscale.jobs.train import run as train

    tmp = tmp_path_factory.mktemp("report")
    run_dir = tmp / "run"
    cfg = _compose(
        "train",
        TrainConfig,
        [
            f"model.name_or_path={tiny_bert}",
            "model.document_max_length=32",
            "model.query_max_length=16",
            f"data.root={tiny_data}",
            "data.path=tiny",
            "data.batch_size_per_rank=4",
            "eval.beir.0.path=tiny",
            f"eval.cache_dir={tmp / 'cache'}",
            "eval.every_n_steps=2",
            "trainer.max_steps=6",
            "trainer.log_every_n_steps=1",
            "trainer.progress=off",
            "logger=csv",
            f"run_dir={run_dir}",
        ],
    )
    train(cfg)
    sweep(_sweep_cfg(run_dir / "model", tiny_data, tmp, run_dir / "sweep.json", "sweep.dims=[8,16,32]"))
    return run_dir


def test_report_writes_the_page_and_every_plot(tiny_run):
    from embedscale.jobs.report import main

    assert main([str(tiny_run)]) == 0
    report = tiny_run / "report"
    page = (report / "index.html").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    for stem in ("train_loss", "train_temperature", "train_learning_rate", "train_grad_norm", "train_throughput"):
        assert f"{stem}.png" in pngs, stem
    assert {"eval_over_steps.png", "sweep_matryoshka.png", "sweep_quantization.png"} <= set(pngs)
    for name in pngs:
        assert f'src="{name}"' in page, name
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("before", "step2", "step4", "after", "binary_rescore", "tiny/ndcg@10"):
        assert text in page, text
    assert "Not in this run" not in page  # every training curve of the issue was logged


def test_report_without_a_run_names_the_fix(tmp_path):
    from embedscale.reporting import write_report

    with pytest.raises(ValueError, match="metrics.csv"):
        write_report(tmp_path)


@pytest.mark.slow  # wandb's service process
def test_report_figures_go_to_an_active_wandb_run_and_to_a_finished_one(tiny_run, monkeypatch):
    import wandb

    from embedscale.jobs.report import main
    from embedscale.reporting import log_report_to_wandb, write_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    write_report(tiny_run)
    if wandb.run is not None:  # left open by an earlier in-process training with logger=wandb
        wandb.finish()
    assert log_report_to_wandb(tiny_run) is False  # no active run: nothing logged, nothing started
    with pytest.raises(ValueError, match="logger=wandb"):
        main([str(tiny_run), "--wandb"])  # no wandb run in the run directory to resume
    run = wandb.init(mode="offline", dir=str(tiny_run), project="embedscale-test")  # as WandbLogger(save_dir=)
    try:
        assert log_report_to_wandb(tiny_run) is True
    finally:
        wandb.finish()
    assert main([str(tiny_run), "--wandb"]) == 0  # re-opens that run by its id
    run_dirs = sorted((tiny_run / "wandb").glob(f"offline-run-*-{run.id}"))
    assert len(run_dirs) == 2
    pngs = {p.stem for p in (tiny_run / "report").glob("*.png")}
    for run_dir in run_dirs:
        media = run_dir / "files" / "media"
        logged = {p.name.rsplit("_", 2)[0] for p in (media / "images" / "report").glob("*.png")}
        assert logged == pngs  # every figure of the page
        tables = {p.name.rsplit("_", 2)[0] for p in (media / "table" / "report").glob("*.table.json")}
        assert tables == {"eval_table", "sweep_matryoshka_table", "sweep_quantization_table"}


def test_evaluate_writes_mteb_results_that_mteb_loads(tiny_bert, tiny_data, tmp_path):
    from embedscale.config import EvaluateConfig
    from embedscale.jobs.evaluate import run

    out = tmp_path / "mteb"
    cfg = _compose(
        "evaluate",
        EvaluateConfig,
        [
            f"model.name_or_path={tiny_bert}",
            "model.document_max_length=32",
            f"data_root={tiny_data}",
            "eval.beir.0.path=tiny",
            "eval.beir.0.name=scifact",  # the tiny set stands in for SciFact, STS for STS-B
            "eval.sts.0.path=sts/test.tsv",
            f"eval.cache_dir={tmp_path / 'cache'}",
            f"output={tmp_path / 'metrics.json'}",
            f"mteb_output={out}",
        ],
    )
    metrics = run(cfg, run_dir=tmp_path)
    (revision_dir,) = (out / "local__tiny_bert0").iterdir()
    scifact = json.loads((revision_dir / "SciFact.json").read_text())
    assert scifact["scores"]["test"][0]["main_score"] == pytest.approx(metrics["scifact/ndcg@10"])
    assert scifact["scores"]["test"][0]["recall_at_100"] == pytest.approx(metrics["scifact/recall@100"])
    sts = json.loads((revision_dir / "STSBenchmark.json").read_text())
    assert sts["scores"]["test"][0]["cosine_spearman"] == pytest.approx(metrics["stsb/spearman"])
    assert json.loads((revision_dir / "model_meta.json").read_text())["name"] == "local/tiny_bert0"

    mteb = pytest.importorskip("mteb")
    for task_name, key in (("SciFact", "scifact/ndcg@10"), ("STSBenchmark", "stsb/spearman")):
        result = mteb.TaskResult.from_disk(revision_dir / f"{task_name}.json")
        result = result.validate_and_filter_scores(task=mteb.get_task(task_name))  # splits, subsets, languages
        assert result.task_name == task_name and result.get_score() == pytest.approx(metrics[key])
    loaded = mteb.ResultCache(cache_path=tmp_path / "cache_root").load_results(include_remote=False)
    assert loaded.model_results == []  # an empty cache root reads nothing ...
    root = tmp_path / "cache_root" / "results"
    root.parent.mkdir(exist_ok=True)
    out.rename(root)  # ... and our directory as mteb's results/ folder reads as one model with two tasks
    loaded = mteb.ResultCache(cache_path=tmp_path / "cache_root").load_results(include_remote=False)
    (model,) = loaded.model_results
    assert model.model_name == "local/tiny_bert0"
    assert sorted(r.task_name for r in model.task_results) == ["STSBenchmark", "SciFact"]
