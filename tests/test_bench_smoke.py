"""Every bench/ script (each bench/*.py but common.py) run as its own process in its smallest configuration, so
that a refactor that breaks a benchmark fails here instead of on the next machine that runs it.

Each case asserts the exit code and on what the script wrote: $EMBEDSCALE_BENCH_RESULTS points the scripts at a
tmp directory, so the committed bench/results/ are never overwritten. The figures of a smoke run mean nothing
(tiny random models from tests/conftest.py, tiny data, one or two steps); the code paths are the real ones.

Two scripts only get `--help` (they import and parse their arguments, nothing more):
- bench/docker_resolve.py asks the public package index (PyPI) to resolve docker/requirements-gpu.txt for the
  image's platform: it needs the network, which test machines do not have;
- bench/install_time.py downloads every package of the lock into fresh venvs with empty caches, round after
  round: it needs the network and takes minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_tiny_beir
from helpers import clean_env, tiny_overrides

pytestmark = pytest.mark.slow  # every test here starts processes (tests/conftest.py: tiers)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "common")
TIMEOUT = 300


@dataclass
class Ctx:
    bert: Path
    """tiny random BERT (at least 128 positions: the bench texts of exactly 128 tokens fit)"""
    data: Path
    """tiny BEIR root, set `tiny` (what tiny_overrides trains on)"""
    scifact: Path
    """tiny BEIR root, set `scifact`: the SciFact scripts name their metrics scifact/..."""
    run: Path | None
    """a finished tiny `embedscale train` run (model/ export, runs/*.json)"""
    tmp: Path
    results: Path

    def json(self, name: str) -> dict:
        return json.loads((self.results / f"{name}.json").read_text())


@dataclass
class Case:
    args: str
    """the script's arguments, split at spaces; each then formatted with the Ctx's fields ({bert}, {run}, ...)"""
    check: Callable[[Ctx, subprocess.CompletedProcess], None]

    def argv(self, ctx: Ctx) -> list[str]:
        return [a.format(**vars(ctx)) for a in self.args.split()]


TINY_MODEL = "model.name_or_path={bert} model.document_max_length=32 model.query_max_length=16"
TINY_TRAIN = f"{TINY_MODEL} data.root={{scifact}} data.batch_size_per_rank=4 trainer.max_epochs=1 trainer.progress=off"
"""Hydra overrides of the train config: the tiny BERT, 4 steps on the tiny `scifact` (16 pairs), one epoch."""


def rows(ctx: Ctx, name: str) -> list[dict]:
    out = ctx.json(name)["rows"]
    assert out, name
    return out


def _help(option: str) -> Case:
    def check(ctx, proc):
        assert "usage:" in proc.stdout and option in proc.stdout, proc.stdout
        assert not any(ctx.results.iterdir())  # --help must not have measured anything

    return Case("--help", check)


def _code_metrics(ctx, proc):
    out = ctx.json("code_metrics_smoke")
    assert out["modules"] > 10 and out["lines_total"] > 1000 and out["largest_functions"]
    assert "| measure | value |" in proc.stdout


def _export_roundtrip(ctx, proc):
    for row in rows(ctx, "export_roundtrip"):  # the same export encoded three ways: the same embeddings
        assert row["min cos(embedscale, SentenceTransformer)"] > 0.9999, row
        assert row["min cos(embedscale, AutoModel+pool)"] > 0.9999, row


def _colbert_recipe(ctx, proc):
    out = ctx.json("colbert_recipe_smoke")
    assert [r["model"] for r in out["rows"]] == [
        "zero-shot bi-encoder",
        "bi-encoder (quickstart)",
        "bi-encoder",
        "ColBERT (128-dim tokens)",
    ]
    assert all(0 <= r["ndcg@10"] <= 1 for r in out["rows"]) and [r["steps"] for r in out["rows"]] == [0, 2, 2, 2]
    dense, colbert = out["rows"][2]["index_bytes_per_doc"], out["rows"][3]["index_bytes_per_doc"]
    assert dense == 4 * 32 and colbert > 2 * 128  # the tiny BERT's 32-dim vector; >= 1 token x 128 dims x 2 B
    trip = out["round_trip"]
    assert trip["token_matrix_shapes_equal"] and trip["max_abs_token_vector_diff"] < 1e-4, trip
    assert out["mining"]["counts"] and out["recipe_seconds"]["mine + colbert stage"] > 0
    assert all(r["train_s"] > 0 for r in out["rows"][1:])
    assert out["configs"]["colbert"]["model"]["multivector"] and not out["configs"]["biencoder"]["model"]["multivector"]


def _domain_forgetting(ctx, proc):
    out = ctx.json("domain_forgetting_smoke")
    cells = {c["row"]: c for c in out["cells"]}
    rows = ["quickstart", "mix", "domain", "ict", "domain@0.8"]
    assert [(c["row"], c["seed"]) for c in out["cells"]] == [(r, 1) for r in rows]
    assert all(0 <= c["medquad/ndcg@10"] <= 1 and -1 <= c["stsb/spearman"] <= 1 for c in out["cells"])
    assert cells["domain@0.8"]["from"] == "mix" and "anchor.interpolation=0.8" in cells["domain@0.8"]["overrides"]
    assert [c["steps"] for c in out["cells"]] == [4, 2, 2, 2, 2] and set(out["zero_shot"]) == {
        "scifact/ndcg@10", "scifact/recall@100", "stsb/spearman", "medquad/ndcg@10"
    }  # fmt: skip
    # domain resumed mix's final checkpoint: no step of its own, its seconds include mix's
    assert cells["domain"]["from"] == "mix" and cells["domain"]["seconds"] > cells["mix"]["seconds"]
    assert "resuming in" in proc.stdout and "from" not in cells["mix"]
    goal = out["goal"]
    assert set(goal) == set(rows) and set(goal["domain"]["general_change"]) == {
        "stsb/spearman", "medquad/ndcg@10"
    }  # fmt: skip


def _generate_run(ctx, proc):
    out = ctx.json("generate_smoke")
    assert [r["filter_top_k"] for r in out["rows"]] == [1, 10, 100]
    n = out["generation"]["counts"]
    assert n["documents"] == 8 and n["generated"] == 16 and out["generation"]["lm"]["kind"] == "causal"
    assert n["generated"] == (
        n["empty"] + n["duplicates_in_document"] + n["duplicates_across_documents"] + n["filtered_out"] + n["kept"]
    )
    kept = [r["kept"] for r in out["rows"]]
    assert kept == sorted(kept) and kept[-1] == n["kept"] == n["filter_candidates"]  # the tiny corpus has < 100 docs
    assert out["seconds"]["total_s"] > 0 and out["generation"]["filter"]["model"]["name_or_path"] == str(ctx.bert)


def _gpu_check(ctx, proc):
    doctor, bert, llama = ctx.json("gpu_check_dryrun")["rows"]  # the three parts, each row its own process
    for row in (doctor, bert, llama):
        assert "error" not in row and "skipped" not in row, row
    assert doctor["backend"] == "gloo" and doctor["ok"] and doctor["report"]["checks"], doctor
    assert bert["model"] == "tiny-bert" and bert["batch"] == 256 and bert["optimizer_steps"] == 2, bert
    assert bert["tokens_per_s"] > 0 and bert["flops_per_step"] > 0 and bert["plan_total_MiB"] > 0, bert
    assert llama["optimizer_steps"] == 2 and llama["samples_per_s"] > 0 and llama["plan_total_MiB"] > 0, llama
    assert "| check |" in proc.stdout, proc.stdout


def _activation_bytes(ctx, proc):
    out = ctx.json("activation_bytes_smoke")
    assert [r["model"] for r in out["rows"]] == ["llama", "mistral", "bert"]
    assert all(0.95 <= r["ratio"] <= 1.05 for r in out["rows"]), out["rows"]
    assert len(out["h200_replan"]) == 8 and all(r["new_step_ratio"] > 0 for r in out["h200_replan"])


def _gpu_plan_check(ctx, proc):
    out = rows(ctx, "gpu_plan_check_dryrun")
    assert [r["model"] for r in out] == ["tiny-bert", "tiny-llama"]
    assert all(r["plan_step_MiB"] > 0 and r["meas_peak_MiB"] > 0 for r in out), out


def _gradcache_memory(ctx, proc):
    [row] = rows(ctx, "gradcache_memory_smoke")
    assert row["global_batch"] == 8 and row["peak_rss_MiB"] > 0 and row["growth_beyond_data"] == "+0.0%"


def _index_scale(ctx, proc):
    out = rows(ctx, "index_scale_smoke")
    assert [r["index"] for r in out] == ["flat", "ivf", "hnsw"]
    assert out[0]["recall@10_vs_flat"] == 1.0 and 0 < out[1]["recall@10_vs_flat"] <= 1.0


def _loader_throughput(ctx, proc):
    out = ctx.json("loader_throughput")
    assert out["samples"] > 10_000 and out["shards"] > 1  # all of MedQuAD sharded
    stream, jsonl = out["rows"][:2]
    assert stream["loader"].startswith("embedscale stream") and stream["samples/s"] > 0 and jsonl["samples/s"] > 0


def _local_loss_scale(ctx, proc):
    out = rows(ctx, "local_loss_scale")
    assert [(r["N"], r["score rows"], r["measured"]) for r in out[:2]] == [(8192, 128, "yes"), (256, 256, "yes")]
    assert out[2]["measured"].startswith("no: 256 x")  # the extrapolated full matrix


def _metrics_vs_pytrec(ctx, proc):
    out = rows(ctx, "metrics_vs_pytrec")
    assert sorted(r["run"] for r in out) == ["tiny-after.json", "tiny-before.json"]
    assert all(r["queries"] == 8 and r["metrics compared"] > 10 for r in out), out


def _plain_overhead(ctx, proc):
    out = rows(ctx, "plain_overhead_smoke")
    assert [r["pairs"] for r in out] == [2, 16] and out[1]["encoder_s"].endswith("(linear from 2)")


def _plan_vs_measured(ctx, proc):
    [row] = rows(ctx, "plan_vs_measured_smoke")
    assert (row["model"], row["chunk"], row["queries"]) == ("tiny", 8, 9) and row["plan_step"] > 0


def _scifact_sweep(ctx, proc):
    out = ctx.json("scifact_sweep_cpu")
    assert out["failed"] == {}  # the sweep goes on past a failed variant: its exit code does not say
    assert [r["variant"] for r in out["rows"]] == ["st", "es"]
    assert all(0 <= r["mean scifact/ndcg@10"] <= 1 for r in out["rows"])


def _st_equivalence(ctx, proc):
    out = ctx.json("st_equivalence")
    assert out["st_steps_logged"] == out["embedscale_steps"] == 2
    assert all(float(r["abs diff"]) < 1e-4 for r in out["rows"]), out["rows"]  # same batches, no dropout


def _st_mnrl_scifact(ctx, proc):
    out = rows(ctx, "st_mnrl_scifact")
    assert [r["system"] for r in out] == ["zero-shot all-MiniLM-L6-v2", "sentence-transformers MNRL", "embedscale"]
    assert all(0 <= r["scifact/ndcg@10"] <= 1 for r in out)


def _st_paired(ctx, proc):
    [pair] = ctx.json("st_paired_scifact")["pairs"]
    assert pair["same_batches_every_epoch"] and pair["steps"] == {"st": 4, "embedscale": 4, "per_epoch": 4}
    assert pair["max_abs_loss_diff"] < 1e-4, pair  # same batches, same dropout masks


def _step_throughput(ctx, proc):
    out = rows(ctx, "step_throughput_smoke")
    systems = "bare bare-chunks es-plain st-mnrl es-gc es-gc-tok st-cached st-cached-tok bare-gc bare-gc-tok".split()
    assert [r["system"] for r in out] == systems and all(r["pairs/s"] > 0 for r in out)
    assert all(0 < r["largest_chunk"] <= r["padded_tokens"] for r in out), out
    by = {r["system"]: r for r in out}  # one pass over the whole batch vs chunks of 2 rows of the same texts
    assert by["bare"]["largest_chunk"] > by["bare-chunks"]["largest_chunk"] == by["st-cached"]["largest_chunk"]
    full = ctx.json("step_throughput_smoke")
    assert full["dropout"] == 0.0 and full["allocator"] == "reuse"
    pairs = {(r["time_of"], r["over"]) for r in full["ratios"]}
    assert {("es-gc", "bare-chunks"), ("es-gc", "bare-gc"), ("es-gc-tok", "bare-gc-tok")} <= pairs, pairs
    assert {("st-cached", "es-gc"), ("st-cached-tok", "es-gc-tok")} <= pairs, pairs
    assert all(r["min"] <= r["median"] <= r["max"] and r["rounds"] == 1 for r in full["ratios"])


def _step_profile(ctx, proc):
    out = rows(ctx, "step_profile_smoke")
    assert [r["system"] for r in out] == ["es-gc", "st-cached", "bare-gc"], out
    for r in out:
        kinds = sum(r[f"{k} s"] for k in ("matmul", "dropout masks", "softmax", "other"))
        assert r["wall_s"] > 0 and abs(kinds - r["self_cpu_s"]) < 0.05, r
    es, st, bare = out
    # GradCache runs two forward passes per chunk (one kept), the bare limit one: more addmm, never fewer
    assert bare["addmm calls"] < es["addmm calls"] and bare["addmm calls"] < st["addmm calls"], out
    assert all(r["bernoulli_ calls"] == 0 for r in out)  # --dropout 0: no mask is drawn


def _sweeps(ctx, proc):
    out = rows(ctx, "sweeps_smoke")
    assert {r["sweep"] for r in out} == {"matryoshka", "quantization"}
    assert (ctx.tmp / "sweep.json").is_file()


def _allocator_numerics(ctx, proc):
    out = ctx.json("allocator_numerics_smoke")
    assert [r["allocator"] for r in out["rows"]] == ["lean", "reuse"] and out["reference"] == "lean"
    assert all(r["steps"] == 2 and r["losses identical"] and r["grad norms identical"] for r in out["rows"]), out
    assert all(r["weights max rel diff"] == 0 for r in out["rows"]) and len(out["losses"]["reuse"]) == 2


def _objective_quality(ctx, proc):
    out = ctx.json("objective_quality_smoke")
    assert [(c["row"], c["seed"]) for c in out["cells"]] == [("base", 1), ("margin", 1), ("cosent", 1)]
    assert all(0 <= c["scifact/ndcg@10"] <= 1 and -1 <= c["stsb/spearman"] <= 1 for c in out["cells"])
    assert [r["n"] for r in out["rows"][:3]] == [1, 1, 1] and out["cells"][2]["steps"] == 2
    paired = out["paired_vs_base"]["cosent"]  # cosent - base on the one seed: no std, no t
    delta = round(out["cells"][2]["scifact/ndcg@10"] - out["cells"][0]["scifact/ndcg@10"], 4)
    assert paired["seeds"] == [1] and paired["scifact/ndcg@10"] == {
        "deltas": [delta],
        "mean": delta,
        "std": None,
        "t": None,
    }
    (masked,) = out["masked_per_query"].items()  # only the guarded row; read from its run's CSV log
    assert masked[0] == "margin/1" and masked[1]["guard"] == "train/margin_guard_masked", masked
    assert masked[1]["logged_steps"] >= 1 and 0 <= masked[1]["min"] <= masked[1]["mean"] <= masked[1]["max"] <= 7
    again = subprocess.run(proc.args, capture_output=True, text=True, cwd=REPO, env=bench_env(ctx.tmp), timeout=TIMEOUT)
    assert again.returncode == 0 and again.stdout.count("already in the results: skipped") == 3, again.stdout[-2000:]
    # domain_forgetting's quickstart and mix rows are these cells: over the same work directory they are read back
    args = list(proc.args)
    args[1] = str(REPO / "bench" / "domain_forgetting.py")
    args[args.index("--rows") + 1], args[args.index("--name") + 1] = "quickstart,mix", "domain_forgetting_shared"
    shared = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=bench_env(ctx.tmp), timeout=TIMEOUT)
    assert shared.returncode == 0 and shared.stdout.count("already ran in") == 2, shared.stdout[-2000:]
    metrics = ("scifact/ndcg@10", "stsb/spearman", "medquad/ndcg@10")
    read_back = [[c[m] for m in metrics] for c in ctx.json("domain_forgetting_shared")["cells"]]
    assert read_back == [[c[m] for m in metrics] for c in out["cells"] if c["row"] != "margin"]


def _sts_source(ctx, proc):
    out = ctx.json("sts_source_smoke")
    assert [(c["row"], c["seed"], c["steps"]) for c in out["cells"]] == [("cosent@1e-4", 1, 2)], out["cells"]
    assert -1 <= out["cells"][0]["stsb/spearman"] <= 1 and set(out["zero_shot"]) == {"stsb/spearman"}
    assert "optim.lr=0.0001" in out["cells"][0]["overrides"]
    (plan,) = out["schedule"]  # the training stream's own draw of the 84-step mixture for seed 1
    assert plan["seed"] == 1 and 0 <= plan["stsb_steps_last_10"] <= min(plan["stsb_steps"], 10) <= 10
    assert 0 < plan["stsb_steps"] < 84 and plan["mix_stsb/spearman"] is None


def _nonfinite_cost(ctx, proc):
    out = ctx.json("nonfinite_cost")
    assert len(out["rows"]) == 5 and all(r["ms"] > 0 for r in out["rows"])
    assert out["ratio_on_over_off"] > 0 and len(out["interleaved_steps_s"]["on"]) == 1


def _scale_rehearsal(ctx, proc):
    out = ctx.json("scale_rehearsal_smoke")
    assert [(r["W"], r["ranks_seen"], r["steps"]) for r in out["rows"]] == [(2, 2, 2), (1, 1, 2)]
    assert out["rows"][0]["gathered_MiB_per_rank"] > 0 and out["rows"][0]["peak_rss_MiB_max_rank"] > 0
    assert all(e["max_rel_diff"] < 1e-5 for e in out["equivalence"] if e["case"].startswith("W="))


def _sharded_equivalence(ctx, proc):
    out = ctx.json("sharded_equivalence_smoke")
    assert len(out["rows"]) == 3 and all(r["within_1e-5"] for r in out["rows"])
    assert out["checkpoint_shards"] == ["__0_0.distcp", "__1_0.distcp"]


def _loss_equivalence(ctx, proc):
    out = ctx.json("loss_equivalence_smoke")
    assert [(r["case"], r["check"]) for r in out["rows"]] == [
        ("margin guard 0.02", "W=2 vs 1"),
        ("margin guard 0.02", "GradCache chunk 5 vs uncached"),
    ]
    assert all(r["max_rel_diff"] < 1e-10 and r["loss_abs_diff"] < 1e-10 for r in out["rows"]), out["rows"]
    assert all(r["counts"]["margin_guard_masked"] > 0 for r in out["rows"]), out["rows"]
    assert out["failures"] == [] and out["control_other_dropout_masks"]["max_rel_diff"] > 1e-3


def _late_interaction(ctx, proc):
    eq = ctx.json("late_interaction_smoke_equivalence")
    assert [r["check"] for r in eq["rows"]] == [
        "W=2 vs 1",
        "GradCache chunk 4 vs uncached",
        "MaxSim chunks 3x5 vs unchunked",
    ]
    assert all(r["case"] == "separate towers + distillation" for r in eq["rows"]), eq["rows"]
    assert all(max(r["max_rel_diff"], r["loss_abs_diff"], r["metrics_abs_diff"]) < 1e-10 for r in eq["rows"])
    assert all(r["distill_kl"] > 0 and r["negatives_per_query"] < 47 for r in eq["rows"]), eq["rows"]
    assert eq["failures"] == [] and eq["control_other_dropout_masks"]["max_rel_diff"] > 1e-3
    mem = rows(ctx, "late_interaction_smoke_memory")
    assert [r["row x doc chunk"] for r in mem] == ["32 x 128", "0 x 0 (unchunked)"]
    assert all(r["status"] == "ok" and r["peak_increase_MiB"] > 0 and r["bound_MiB"] > 0 for r in mem), mem


def _verify_cost(ctx, proc):
    out = ctx.json("verify_cost")
    assert out["dataset"]["pairs"] == 200 and out["dataset"]["shards"] == 4
    assert [r["open"].split(",")[0] for r in out["rows"][:4]] == ["full", "full", "size (sizes only)", "off"]


def _fault_table(ctx, proc):
    (row,) = rows(ctx, "fault_table_smoke")  # the one --only case: refused at compose time, naming the key
    assert row["exit"] == 1 and "trainer.max_steps=0" in row["message"], row


def _config_properties(ctx, proc):
    out = rows(ctx, "config_properties")
    tests = {r["test"] for r in out}
    assert {"test_any_numeric_value_is_refused_by_key_or_validates"} < tests, tests  # and the training one
    assert all(r["examples"] == 3 for r in out), out
    assert all(r["failing"] == 0 for r in out), out


def _plain_log(ctx, proc):
    out = ctx.json("plain_log")
    values = {r["what"]: r["value"] for r in out["rows"]}
    assert values["exit code"] == 0 and values["progress lines"] >= 1, out  # 2 steps: the last step's line
    assert values["other lines printed more than once"] == 0, out["repeated_lines"]
    assert out["load"]["load_report_lines"] == [] and out["excerpt"], out


def _onnx_export(ctx, proc):
    out = rows(ctx, "onnx_export")
    parity = [r for r in out if r["measure"].startswith("smallest cosine") and r["runtime"] == "onnx-fp32"]
    assert len(parity) == 2 and all(r["value"] >= 0.9999 for r in parity), parity
    speed = {r["runtime"] for r in out if r["measure"].startswith("docs/s")}
    assert speed == {"pytorch", "onnx-fp32", "onnx-int8"}, out
    assert any(r["measure"] == "SciFact test ndcg@10" for r in out), out


CASES: dict[str, Case] = {
    "allocator_numerics": Case(
        "--allocators lean,reuse --steps 2 --work {tmp}/alloc --name allocator_numerics_smoke --extra "
        "model.name_or_path={bert};model.document_max_length=32;model.query_max_length=16;data.root={scifact};"
        "data.batch_size_per_rank=4",
        _allocator_numerics,
    ),
    "activation_bytes": Case("--quick --name activation_bytes_smoke", _activation_bytes),
    "code_metrics": Case("--name code_metrics_smoke", _code_metrics),
    "docker_resolve": _help("--name"),
    "colbert_recipe": Case(
        "--model {bert} --data-root {scifact} --work {tmp}/colbert --round-trip-texts 4 --name colbert_recipe_smoke "
        "--extra-train trainer.max_steps=2;data.batch_size_per_rank=4",
        _colbert_recipe,
    ),
    "config_properties": Case("--examples 3", _config_properties),
    "domain_forgetting": Case(
        "--rows quickstart,mix,domain,ict,domain@0.8 --seeds 1 --model {bert} --data-root {scifact} "
        "--sts-train {data}/sts/test.tsv --sts-test {data}/sts/test.tsv --medquad medquad/pairs.jsonl "
        "--steps-per-epoch 2 --steps 2 "
        "--work {tmp}/df --name domain_forgetting_smoke --extra model.query_max_length=16;"
        "model.document_max_length=16;trainer.max_epochs=1;data.batch_size_per_rank=4;data.pretrain.min_words=4",
        _domain_forgetting,
    ),
    "export_roundtrip": Case("{run}/model --num-texts 4 --data-root {scifact}", _export_roundtrip),
    "fault_table": Case("--name fault_table_smoke --only trainer.max_steps=0", _fault_table),
    "generate_run": Case(
        "--data-root {scifact} --max-documents 8 --filter-model {bert} --lm-vocab 100 --work {tmp}/generate "
        "--name generate_smoke generate.max_new_tokens=4 model.document_max_length=32 model.query_max_length=16",
        _generate_run,
    ),
    "gpu_check": Case("--dry-run --warmup 1 --steps 1 --bert-steps 1", _gpu_check),
    "gpu_plan_check": Case("--dry-run", _gpu_plan_check),
    "gradcache_memory": Case(
        "--sizes 8 --chunk 4 --threads 1 --warmup-pairs 4 --model {bert} --name gradcache_memory_smoke",
        _gradcache_memory,
    ),
    "index_scale": Case(
        "--n 2000 --dim 16 --queries 50 --centres 20 --kinds flat,ivf,hnsw --nlist 8 --nprobe 2 --threads 1 "
        "--name index_scale_smoke",
        _index_scale,
    ),
    "install_time": _help("--rounds"),
    "loader_throughput": Case("--workers 1 --batch 4 --batches 2", _loader_throughput),
    "local_loss_scale": Case("--n 8192 --world 64 --dim 8 --full-n 256", _local_loss_scale),
    "late_interaction": Case(
        "--worlds 2 --cases distill --plans chunk4 --model {bert} --memory-sizes 8:16,8:16:0:0 --L 4 --M 16 --D 8 "
        "--threads 1 --name late_interaction_smoke",
        _late_interaction,
    ),
    "loss_equivalence": Case(
        "--worlds 2 --cases margin --chunks 5 --model {bert} --name loss_equivalence_smoke", _loss_equivalence
    ),
    "metrics_vs_pytrec": Case("{run} --data-root {data}", _metrics_vs_pytrec),
    "nonfinite_cost": Case("--pairs 4 --repeats 2 --rounds 1 --steps 1 --threads 1 --model {bert}", _nonfinite_cost),
    "plain_overhead": Case(
        "--sizes 2,16 --encoder-pairs 2 --encoder-repeats 1 --loss-repeats 1 --threads 1 --model {bert} "
        "--name plain_overhead_smoke",
        _plain_overhead,
    ),
    "onnx_export": Case(
        "--model {bert} --data-root {scifact} --texts 8 --speed-docs 4 --rounds 1 --threads 1 --max-length 32",
        _onnx_export,
    ),
    "plain_log": Case(
        f"--steps 2 {TINY_MODEL} data.root={{scifact}} data.batch_size_per_rank=4 trainer.progress=lines",
        _plain_log,
    ),
    "plan_vs_measured": Case("--only tiny --limit 1 --threads 1 --name plan_vs_measured_smoke", _plan_vs_measured),
    "scifact_sweep": Case(
        f"--out {{tmp}}/sweep --seeds 0 --variant st=st: --variant es=es:loss.symmetric_weight=0.5 {TINY_TRAIN}",
        _scifact_sweep,
    ),
    # the script sets the training itself (no shuffling, --steps x --batch pairs)
    "st_equivalence": Case(f"--steps 2 --batch 4 {TINY_MODEL} data.root={{scifact}}", _st_equivalence),
    "st_mnrl_scifact": Case(f"--out {{tmp}}/runs --seeds 1 {TINY_TRAIN}", _st_mnrl_scifact),
    "st_paired": Case(f"--out {{tmp}}/runs --seeds 1 {TINY_TRAIN}", _st_paired),
    "step_throughput": Case(  # every system in one process (--interleave): one start for all
        "--datasets fixed --global-batch 4 --chunk 2 --threads 1 --repeats 1 --interleave --model {bert} --systems "
        "bare,bare-chunks,es-plain,st-mnrl,es-gc,es-gc-tok,st-cached,st-cached-tok,bare-gc,bare-gc-tok "
        "--dropout 0 --allocator reuse --name step_throughput_smoke",
        _step_throughput,
    ),
    "step_profile": Case(
        "--dataset fixed --pairs 4 --chunk 2 --threads 1 --dropout 0 --model {bert} --name step_profile_smoke",
        _step_profile,
    ),
    "multinode": _help("--no-slurm"),  # its runs are tests/test_multinode.py's
    "scale_rehearsal": Case(
        "--sizes 64 --worlds 2 --allocators embedscale --allocators-at 64 --chunk 16 --row-chunk 16 "
        "--name scale_rehearsal_smoke",
        _scale_rehearsal,
    ),
    "sharded_equivalence": Case(
        "--world 2 --batch 16 --chunk 4 --steps 2 --no-lora --name sharded_equivalence_smoke", _sharded_equivalence
    ),
    "objective_quality": Case(
        "--rows base,margin,cosent --seeds 1 --model {bert} --data-root {scifact} --sts-train {data}/sts/test.tsv "
        "--sts-test {data}/sts/test.tsv --medquad medquad/pairs.jsonl --steps-per-epoch 2 --work {tmp}/oq "
        "--name objective_quality_smoke "
        "--extra model.query_max_length=16;model.document_max_length=16;trainer.max_epochs=1;"
        "data.batch_size_per_rank=4;trainer.log_every_n_steps=1",
        _objective_quality,
    ),
    "sts_source": Case(
        "--rows cosent@1e-4 --seeds 1 --model {bert} --data-root {scifact} --sts-train {data}/sts/test.tsv "
        "--sts-test {data}/sts/test.tsv --medquad medquad/pairs.jsonl --sts-steps 2 --work {tmp}/sts "
        "--no-mix-results --name sts_source_smoke --extra model.query_max_length=16;model.document_max_length=16;"
        "data.batch_size_per_rank=4",
        _sts_source,
    ),
    "verify_cost": Case("--rounds 1 --per-shard 50 --limit 200", _verify_cost),
    "sweeps": Case(f"--name sweeps_smoke {TINY_MODEL} data_root={{scifact}} sweep.output={{tmp}}/sweep.json", _sweeps),
}


def bench_env(tmp: Path) -> dict[str, str]:
    env = clean_env()  # no launcher variables; offline hub and W&B
    env.pop("OUT", None)  # gpu_check/gpu_plan_check also write to $OUT (set on device machines)
    env.update(
        OMP_NUM_THREADS="1",  # many short processes on 2 cores: threads only contend
        TOKENIZERS_PARALLELISM="false",
        EMBEDSCALE_BENCH_RESULTS=str(tmp / "results"),
        EMBEDSCALE_CACHE=str(tmp / "cache"),  # evaluation embedding caches: not ~/.cache
    )
    return env


@pytest.fixture(scope="module")
def tiny_scifact(tmp_path_factory) -> Path:
    """A tiny BEIR `scifact` and a tiny `medquad/pairs.jsonl` (question -> answer pairs) under one data root."""
    root = make_tiny_beir(tmp_path_factory.mktemp("scifact"), name="scifact")
    (root / "medquad").mkdir()
    rows = [{"query": f"what causes illness {i}?", "positive": f"illness {i} is caused by germ {i}"} for i in range(12)]
    (root / "medquad" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def train_run(tiny_bert, tiny_data, tmp_path_factory) -> Path:
    """One tiny `embedscale train` (3 steps): an export and ranked runs for the scripts that read a run."""
    tmp = tmp_path_factory.mktemp("train")
    run_dir = tmp / "run"
    args = tiny_overrides(tiny_bert, tiny_data, tmp)
    args += [f"run_dir={run_dir}", f"hydra.run.dir={tmp / 'hydra'}", "logger=none", "trainer.progress=off"]
    cmd = [sys.executable, "-m", "embedscale.jobs.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=bench_env(tmp), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "model" / "model.safetensors").is_file() and list((run_dir / "runs").glob("tiny-*.json"))
    return run_dir


def test_every_script_has_a_case():
    assert set(SCRIPTS) == set(CASES), "a bench script without a smoke case (or a case without a script)"


# the slowest cases first (measured in CI), so that two at a time finish together
SLOWEST = ["sharded_equivalence", "domain_forgetting", "gpu_check", "objective_quality", "late_interaction"]


@pytest.fixture(scope="module")
def script_runs(request, tiny_bert, tiny_data, tiny_scifact, tmp_path_factory) -> dict:
    """Every case this session selected, run once, two processes at a time (most of a case is an interpreter
    importing torch and Lightning on one core): {script: (ctx, process or the timeout)}. The committed
    bench/results/ must be untouched by all of them: {"results unchanged": bool}."""
    from concurrent.futures import ThreadPoolExecutor

    selected = [
        item.callspec.params["script"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bench_script" and item.module.__name__ == __name__
    ]
    selected = sorted(set(selected) & set(CASES), key=lambda s: (SLOWEST.index(s) if s in SLOWEST else len(SLOWEST), s))
    # only if a selected case reads a run, train it (module-scoped: once)
    run = request.getfixturevalue("train_run") if any("{run}" in CASES[s].args for s in selected) else None

    def one(script: str):
        tmp = tmp_path_factory.mktemp(script)
        ctx = Ctx(tiny_bert, tiny_data, tiny_scifact, run, tmp, tmp / "results")
        ctx.results.mkdir()
        cmd = [sys.executable, str(BENCH / f"{script}.py"), *CASES[script].argv(ctx)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=bench_env(tmp), timeout=TIMEOUT)
        except subprocess.TimeoutExpired as err:
            proc = err
        print(f"bench/{script}.py: {time.perf_counter() - start:.0f} s", flush=True)
        return ctx, proc

    before = {p: p.stat().st_mtime_ns for p in (BENCH / "results").iterdir()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(selected, pool.map(one, selected), strict=True))
    unchanged = {p: p.stat().st_mtime_ns for p in (BENCH / "results").iterdir()} == before
    return {"results unchanged": unchanged, **runs}


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script(script, script_runs):
    case = CASES.get(script)
    if case is None:
        pytest.fail(f"bench/{script}.py has no smoke case: add one to CASES")
    ctx, proc = script_runs[script]
    assert not isinstance(proc, subprocess.TimeoutExpired), f"{' '.join(proc.cmd)}: over {TIMEOUT} s"
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{proc.stderr[-3000:]}"
    assert script_runs["results unchanged"]  # committed results untouched
    case.check(ctx, proc)
