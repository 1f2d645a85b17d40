"""Fault injection: every class of fault a user meets ends in an error that names the problem and the fix (or, where
the user asked for it, a counted skip) -- never a silent exit 0, never a lost or mixed-up result (docs/reliability.md).

Classes: a diverging run; shards modified after they were written; bad config values; overwrites that would
delete or mix data; an untrusted checkpoint; a damaged embedding cache; bad records in every input format; a
stalled rank and an orphaned worker; too many skipped samples; the module-form CLI relaunching ranks. Every
corruption is made here, on tiny models and data.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clean_env, compose_train, tiny_overrides

from embedscale.config import ShardConfig, ShardJobConfig
from embedscale.data.shards import ShardedDataset

# -- helpers -------------------------------------------------------------------------------------------------------


def _run(overrides: list[str]):
    from embedscale.jobs.train import run

    return run(compose_train(overrides))


def _base(tiny_bert, tiny_data, tmp_path, *extra) -> list[str]:
    return [
        *(o for o in tiny_overrides(tiny_bert, tiny_data, tmp_path) if not o.startswith("eval.")),
        "eval=none",
        "logger=none",
        "trainer.progress=off",
        f"run_dir={tmp_path / 'run'}",
        *extra,
    ]


def _shard(tmp_path: Path, n: int = 40, *, name: str = "pairs", per_shard: int = 10) -> ShardedDataset:
    from embedscale.jobs.shard import run as shard_run

    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"query": f"query {i}", "positive": f"document {i}"}) + "\n" for i in range(n)))
    out = tmp_path / "shards" / name
    cfg = ShardConfig(inputs=[str(src)], name=name, output=str(out), samples_per_shard=per_shard, target_mb=0)
    shard_run(ShardJobConfig(shard=cfg))
    return ShardedDataset.open(out)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDSCALE_CACHE", str(tmp_path / "cache"))  # verification and embedding caches


# -- 1. a diverging run ---------------------------------------------------------------------------------------------


def test_diverging_run_stops_at_the_first_nonfinite_step_and_exports_nothing(
    tiny_bert, tiny_data, tmp_path, monkeypatch
):
    from embedscale.contrastive.guard import NonFiniteError
    from embedscale.contrastive.module import ContrastiveModule

    compute = ContrastiveModule.compute_loss

    def overflowing(self, batch):  # a weight overflows before the third step (as an fp16 overflow would)
        if self.trainer.global_step == 2:
            with torch.no_grad():
                weights = dict(self.encoder.named_parameters())
                weights["query_backbone.encoder.layer.0.attention.self.query.weight"].view(-1)[0] = float("inf")
        return compute(self, batch)

    monkeypatch.setattr(ContrastiveModule, "compute_loss", overflowing)
    with pytest.raises(NonFiniteError) as err:
        _run(_base(tiny_bert, tiny_data, tmp_path, "trainer.max_steps=20", "trainer.max_epochs=20"))
    message = str(err.value)
    for part in ("non-finite training at step 3", "last finite loss", "at step 2", "learning rate", "lower optim.lr"):
        assert part in message, message
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_skip_nonfinite_steps_skips_counts_and_keeps_weights_finite(tiny_bert, tiny_data, tmp_path, monkeypatch):
    from embedscale.contrastive.module import ContrastiveModule

    compute = ContrastiveModule.compute_loss

    def poisoned(self, batch):  # one NaN loss, at the second step
        loss, metrics = compute(self, batch)
        return (loss * float("nan"), metrics) if self.trainer.global_step == 1 else (loss, metrics)

    monkeypatch.setattr(ContrastiveModule, "compute_loss", poisoned)
    result = _run(_base(tiny_bert, tiny_data, tmp_path, "trainer.skip_nonfinite_steps=1", "trainer.max_steps=4"))
    assert result["train"]["nonfinite"]["skipped_steps"] == 1
    assert result["train"]["nonfinite"]["skipped"][0]["step"] == 2
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_guard_skips_within_its_budget_and_says_why_a_strategy_cannot_skip():
    from embedscale.contrastive.guard import FiniteGuard, NonFiniteError

    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    guard = FiniteGuard(skip_budget=1)
    assert guard.check(step=1, loss=one, grad_norm=one, lr=1e-4, temperature=0.05)
    assert not guard.check(step=2, loss=one, grad_norm=nan, lr=1e-4, temperature=0.05)  # skipped: budget 1
    with pytest.raises(NonFiniteError, match=r"step 3 .*last finite loss 1 at step 1.*1 skipped so far"):
        guard.check(step=3, loss=nan, grad_norm=one, lr=1e-4, temperature=0.05)
    assert guard.summary()["skipped_steps"] == 1
    engine_owned = FiniteGuard(skip_budget=5, cannot_skip="the engine owns the gradients")
    with pytest.raises(NonFiniteError, match="this strategy cannot skip a step: the engine owns the gradients"):
        engine_owned.check(step=1, loss=nan, grad_norm=None, lr=1e-4, temperature=0.05)


def test_export_refuses_nonfinite_weights(tiny_bert, tmp_path):
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.export import export_model

    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(tiny_bert)))
    with torch.no_grad():
        next(encoder.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="refusing to export .* NaN or inf"):
        export_model(encoder, tokenizer, tmp_path / "model")
    assert not (tmp_path / "model").exists()


# -- 2. shards modified after they were written --------------------------------------------------------------------


def test_same_length_text_edit_in_a_tar_is_caught_by_sha256(tmp_path):
    ds = _shard(tmp_path)
    tar = Path(ds.root) / ds.shards[1]["file"]
    data = tar.read_bytes()
    tar.write_bytes(data.replace(b"document 12", b"document XX", 1))  # same length: only the hash sees it
    with pytest.raises(ValueError, match=r"sha256 differs from the manifest.*re-shard"):
        ShardedDataset.open(ds.root)
    ShardedDataset.open(ds.root, verify="size")  # the user's explicit choice: sizes only


def test_rewritten_index_sidecar_is_caught_with_or_without_hashing(tmp_path):
    ds = _shard(tmp_path)
    index_path = Path(ds.root) / (ds.shards[0]["file"].removesuffix(".tar") + ".idx.npy")
    index = np.load(index_path)
    index[1:] = index[0]  # one sample 10 times, the others never: same shape, same size
    np.save(index_path, index)
    with pytest.raises(ValueError, match="sha256 differs"):
        ShardedDataset.open(ds.root)
    unverified = ShardedDataset.open(ds.root, verify="off")  # even unhashed, reading checks the offsets
    with pytest.raises(ValueError, match="does not index"):
        unverified.index(0)


def test_manifest_may_not_point_outside_its_directory(tmp_path):
    ds = _shard(tmp_path)
    manifest = json.loads((Path(ds.root) / "manifest.json").read_text())
    for name in ("../elsewhere.tar", "/etc/passwd", "s3://bucket/x.tar"):
        manifest["shards"][0]["file"] = name
        (Path(ds.root) / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="not a plain file name inside the dataset directory"):
            ShardedDataset.open(ds.root, verify="off")


def test_manifest_count_larger_than_the_shard_is_an_error_not_an_index_error(tmp_path):
    ds = _shard(tmp_path)
    manifest = json.loads((Path(ds.root) / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 5
    (Path(ds.root) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"the manifest says 15 samples.*index holds \(10, 2\)"):
        ShardedDataset.open(ds.root).read(0, [0])


def test_truncated_tar_fails_in_size_mode(tmp_path):
    ds = _shard(tmp_path)
    tar = Path(ds.root) / ds.shards[2]["file"]
    tar.write_bytes(tar.read_bytes()[:-700])
    with pytest.raises(ValueError, match="bytes, the manifest says .* truncated or replaced"):
        ShardedDataset.open(ds.root, verify="size")


def test_verification_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    from embedscale.data.integrity import verify_dataset

    ds = _shard(tmp_path)
    monkeypatch.setenv("EMBEDSCALE_CACHE", str(tmp_path / "fresh-cache"))  # opening the shards verified them already
    first = verify_dataset(ds)
    second = verify_dataset(ds)
    assert first["hashed"] == 8 and first["cached"] == 0  # 4 tars + 4 index sidecars
    assert second["hashed"] == 0 and second["cached"] == 8
    tar = Path(ds.root) / ds.shards[0]["file"]
    os.utime(tar, ns=(time.time_ns(), time.time_ns()))  # touched: hashed again
    assert verify_dataset(ds)["hashed"] == 1


def test_ranks_share_the_hashing_and_every_rank_reuses_it(tmp_path, monkeypatch):
    import embedscale.distributed as distributed
    from embedscale.data.integrity import verify_dataset

    ds = _shard(tmp_path)
    monkeypatch.setenv("EMBEDSCALE_CACHE", str(tmp_path / "fresh-cache"))
    hashed = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        hashed.append(verify_dataset(ds)["hashed"])
    assert hashed == [4, 4]  # 8 files, half each
    monkeypatch.setattr(distributed, "world", lambda: (0, 1))
    assert verify_dataset(ds) | {"seconds": 0} == {"checked": 8, "hashed": 0, "cached": 8, "seconds": 0}


# -- 3. config values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
        ("optim.lr=1e10", "optim.lr"),  # the diverging run: a typo (2e5 for 2e-5) is refused before it runs
        ("optim.weight_decay=1e6", "optim.weight_decay"),  # lr x weight_decay >= 1: every weight flips sign
        ("trainer.collective_timeout=1e300", "trainer.collective_timeout"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("data.max_samples=-3", "data.max_samples"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("loss.max_inverse_temperature=0", "loss.max_inverse_temperature"),
        ("loss.temperature=inf", "loss.temperature"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("seed=-1", "seed"),
    ],
)
def test_out_of_range_values_are_refused_at_compose_time(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        compose_train([override])


def test_token_budget_above_the_backbone_positions_is_refused_naming_the_key(tiny_bert, tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"model\.document_max_length=600 is above the 512 positions"):
        _run(_base(tiny_bert, tiny_data, tmp_path, "model.document_max_length=600"))


# -- 4. overwrites -------------------------------------------------------------------------------------------------


def test_shard_overwrite_removes_only_the_files_its_manifest_lists(tmp_path):
    from embedscale.jobs.shard import run as shard_run

    ds = _shard(tmp_path)
    keep = Path(ds.root) / "my_notes.txt"
    keep.write_text("the user's own file")
    src = tmp_path / "pairs.jsonl"
    cfg = ShardConfig(inputs=[str(src)], name="pairs", output=str(ds.root), samples_per_shard=25, overwrite=True)
    shard_run(ShardJobConfig(shard=cfg))
    assert keep.read_text() == "the user's own file"
    assert sorted(p.name for p in Path(ds.root).glob("*.tar")) == ["pairs-000-000000.tar", "pairs-000-000001.tar"]


def test_overwrite_refuses_a_directory_whose_manifest_is_not_ours(tmp_path):
    from embedscale.jobs.shard import run as shard_run

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"name": "someone else's", "files": ["a.bin"]}))
    (foreign / "a.bin").write_bytes(b"precious")
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    cfg = ShardConfig(inputs=[str(src)], name="p", output=str(foreign), overwrite=True)
    with pytest.raises(ValueError, match="was not written by embedscale"):
        shard_run(ShardJobConfig(shard=cfg))
    assert (foreign / "a.bin").read_bytes() == b"precious"


def test_reusing_a_run_directory_is_refused_unless_resumed_or_overwritten(tiny_bert, tiny_data, tmp_path):
    _run(_base(tiny_bert, tiny_data, tmp_path, "trainer.max_steps=1"))
    with pytest.raises(ValueError, match=r"already holds a training run.*trainer\.resume=last.*overwrite=true"):
        _run(_base(tiny_bert, tiny_data, tmp_path, "trainer.max_steps=1"))
    (tmp_path / "run" / "notes.txt").write_text("mine")
    # overwrite without an export: the first run's model/ must not stay behind as if this run had made it
    _run(_base(tiny_bert, tiny_data, tmp_path, "trainer.max_steps=1", "overwrite=true", "export=false"))
    assert not (tmp_path / "run" / "model").exists() and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    _run(_base(tiny_bert, tiny_data, tmp_path, "trainer.max_steps=2", "trainer.resume=last"))


def test_an_export_interrupted_midway_leaves_the_previous_export_whole(tiny_bert, tmp_path, monkeypatch):
    import embedscale.export as export
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder

    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(tiny_bert)))
    out = export.export_model(encoder, tokenizer, tmp_path / "model", metrics={"v": 1.0})
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_model_card", disk_full)  # fails after the weights were written
    with pytest.raises(OSError, match="No space left"):
        export.export_model(encoder, tokenizer, tmp_path / "model", metrics={"v": 2.0})
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no half-written directory left beside it


def test_a_checkpoint_write_that_fails_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Lightning writes checkpoints through an fsspec transaction (a temporary file renamed when complete)."""
    import fsspec.implementations.local as local
    from lightning.fabric.utilities.cloud_io import _atomic_save

    path = tmp_path / "last.ckpt"
    _atomic_save({"step": 1, "w": torch.ones(4)}, path)
    write = local.LocalFileOpener.write

    def disk_full(self, data):
        write(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local.LocalFileOpener, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _atomic_save({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


# -- 5. untrusted checkpoints --------------------------------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def test_a_crafted_mine_checkpoint_does_not_run_code(tiny_bert, tmp_path, monkeypatch):
    from embedscale.config import MineJobConfig, ModelConfig
    from embedscale.retrieval.miner import load_biencoder

    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Exploit()}, f)
    cfg = MineJobConfig(model=ModelConfig(name_or_path=str(tiny_bert)))
    cfg.mine.checkpoint = str(ckpt)
    with pytest.raises(ValueError, match="mine.checkpoint=.*could run code.*is refused"):
        load_biencoder(cfg)
    assert not (tmp_path / "EXPLOITED").exists()


# -- 6. a damaged embedding cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "tampered"])
def test_damaged_embedding_cache_is_reencoded_with_a_warning(tiny_bert, tmp_path, damage, caplog):
    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder
    from embedscale.retrieval.encode import encode_corpus

    encoder, tokenizer = load_encoder(ModelConfig(name_or_path=str(tiny_bert)))
    ids, texts = [f"d{i}" for i in range(6)], [f"document number {i}" for i in range(6)]
    fresh = encode_corpus(encoder, tokenizer, ids, texts, cache_dir=tmp_path / "c")
    (path,) = (tmp_path / "c").glob("*.pt")
    record = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "wrong_shape":
        record["x"] = record["x"][:3]
        torch.save(record, path)
    else:
        record["x"] = record["x"] * 1.01  # same shape, other values, stale hash
        torch.save(record, path)
    with caplog.at_level(logging.WARNING):
        again = encode_corpus(encoder, tokenizer, ids, texts, cache_dir=tmp_path / "c")
    assert "encoding again" in caplog.text
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    torch.testing.assert_close(encode_corpus(encoder, tokenizer, ids, texts, cache_dir=tmp_path / "c"), fresh)


# -- 7. bad records ------------------------------------------------------------------------------------------------


def _beir(root: Path) -> Path:
    d = root / "b"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": f"doc {i}"}) + "\n" for i in range(3)))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"q {i}"}) + "\n" for i in range(3)))
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    return d


def test_every_bad_record_is_named_by_file_and_line(tmp_path):
    from embedscale.data.records import Fields, jsonl_pairs, read_corpus, read_qrels, read_queries, read_sts

    bad_utf8 = tmp_path / "train.jsonl"
    bad_utf8.write_bytes(b'{"query": "q", "positive": "p"}\n{"query": "\xff\xfe", "positive": "p"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: invalid UTF-8"):
        list(jsonl_pairs(bad_utf8, Fields()))
    gz = tmp_path / "train.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(2000)))
    gz.write_bytes(gz.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"train\.jsonl\.gz:\d+: the compressed file ends or breaks here"):
        list(jsonl_pairs(gz, Fields()))
    d = _beir(tmp_path)
    (d / "corpus.jsonl").write_bytes(b'{"_id": "d0", "text": "ok"}\n{"_id": "d1", "text": "\xc3\x28"}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: invalid UTF-8"):
        read_corpus(d)
    (d / "corpus.jsonl").write_text('{"_id": "d0", "text": "a"}\n{"_id": "d0", "text": "b"}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: document id 'd0' occurs again \(first at line 1\)"):
        read_corpus(d)
    (d / "queries.jsonl").write_text('{"_id": "q0", "text": "a"}\n{"text": "no id"}\n')
    with pytest.raises(ValueError, match=r"queries\.jsonl:2: a query needs '_id'"):
        read_queries(d)
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\tyes\n")
    with pytest.raises(ValueError, match=r"test\.tsv:2: score 'yes' is not a number"):
        read_qrels(d, "test")
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na\tb\t4.0\nc\td\thigh\n")
    with pytest.raises(ValueError, match=r"sts\.tsv:3: score 'high' is not a number"):
        read_sts(sts)


def test_qrels_judging_missing_documents_raise_or_warn(tmp_path, caplog):
    from embedscale.retrieval.evaluator import RetrievalEvaluator

    d = _beir(tmp_path)
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td9\t1\n")
    with pytest.raises(ValueError, match=r"judges 1 document\(s\) missing from corpus\.jsonl.*missing_documents=warn"):
        RetrievalEvaluator.from_beir(d, "test")
    with caplog.at_level(logging.WARNING):
        ev = RetrievalEvaluator.from_beir(d, "test", missing_documents="warn")
    assert "d9" in caplog.text and ev.qrels["q1"] == {"d9": 1}


def test_an_empty_input_is_never_written_as_a_dataset(tmp_path):
    from embedscale.jobs.shard import run as shard_run

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="holds no records"):
        shard_run(ShardJobConfig(shard=ShardConfig(inputs=[str(empty)], name="e", output=str(out))))
    assert not (out / "manifest.json").exists()


# -- 8. skipped samples, stalled ranks, orphans, the module-form CLI -------------------------------------------------


def test_skipped_samples_are_logged_once_per_reason_and_capped(tiny_bert, tmp_path, caplog):
    ds = _shard(tmp_path, n=64, per_shard=16)
    tar = Path(ds.root) / ds.shards[0]["file"]
    data = bytearray(tar.read_bytes())
    index = ds.index(0)
    for offset, _ in index[:4]:  # 4 samples of 64 that are no longer JSON
        data[int(offset)] = ord("#")
    tar.write_bytes(bytes(data))
    common = [
        f"model.name_or_path={tiny_bert}",
        "model.query_max_length=16",
        "model.document_max_length=16",
        "data.format=shards",
        f"data.path={ds.root}",
        "data.verify=off",  # the corruption is the point here
        "data.on_error=skip",
        "data.batch_size_per_rank=8",
        "trainer.max_epochs=1",
        "eval=none",
        "logger=none",
        "export=false",
        "trainer.progress=off",
    ]
    from embedscale.jobs.train import run

    with caplog.at_level(logging.WARNING):
        result = run(compose_train([*common, f"run_dir={tmp_path / 'a'}", "data.max_skipped_fraction=0.1"]))
    assert result["train"]["skipped_samples"] == {"corrupt sample": 4}
    assert caplog.text.count("data.on_error=skip: skipping samples (corrupt sample)") == 1
    too_many = r"bad sample\(s\) skipped on rank 0 .*more than data\.max_skipped_fraction=0\.01"
    with pytest.raises(ValueError, match=too_many):
        run(compose_train([*common, f"run_dir={tmp_path / 'b'}", "data.max_skipped_fraction=0.01"]))


_STALL = """
import sys, time
import lightning as L
import embedscale.contrastive.trainer as T
from embedscale.jobs import train

class Stall(L.Callback):  # rank 1 stops responding at its third step
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            time.sleep(600)

build = T.build_trainer
T.build_trainer = lambda t, logger, run_dir, callbacks, **kw: build(t, logger, run_dir, [*callbacks, Stall()], **kw)
train.main()
"""


@pytest.mark.slow  # 2 ranks
def test_a_stalled_rank_is_named_within_the_collective_timeout(tiny_bert, tiny_data, tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(_STALL)
    args = _base(tiny_bert, tiny_data, tmp_path, "trainer=ddp_cpu", "trainer.collective_timeout=10")
    args += ["trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=clean_env(), timeout=300
    )
    seconds = time.perf_counter() - start
    assert proc.returncode != 0
    assert "rank(s) [1] stopped responding" in proc.stderr, proc.stderr[-3000:]
    assert "trainer.collective_timeout=10" in proc.stderr
    assert seconds < 120, seconds  # the timeout, not torch's 30 minutes


@pytest.mark.slow  # torchrun, 2 ranks
def test_workers_exit_when_their_torchrun_agent_dies(tiny_bert, tiny_data, tmp_path):
    args = _base(tiny_bert, tiny_data, tmp_path, "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2")
    args += ["trainer.num_threads=1", "trainer.max_steps=100000", "trainer.max_epochs=100000"]
    args = [a for a in args if not a.startswith("trainer.max_steps=3")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    agent = subprocess.Popen(
        [*cmd, "-m", "embedscale.jobs.train", *args],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        workers = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (tmp_path / "run" / "logs").exists() and len(workers) < 2:
            time.sleep(1)
            children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children")
            workers = [int(p) for p in children.read_text().split()] if children.exists() else []
        time.sleep(8)  # both workers past start-up (the guard is armed in start_run)
        assert len(workers) == 2, workers
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.5)
        alive = [w for w in workers if Path(f"/proc/{w}").exists() and "zombie" not in _state(w)]
        assert not alive, f"workers {alive} kept running after their launcher died"
    finally:
        for w in workers if "workers" in dir() else []:
            subprocess.run(["kill", "-9", str(w)], capture_output=True)
        agent.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


@pytest.mark.slow  # 2 ranks through the module-form CLI
def test_module_form_cli_relaunches_its_ranks(tiny_bert, tiny_data, tmp_path):
    args = [
        *_base(tiny_bert, tiny_data, tmp_path, "trainer=ddp_cpu", "export=false"),
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "embedscale.cli", "train", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["optimizer_steps"] == 3


def test_the_allocator_is_pinned_unless_the_user_chose(monkeypatch):
    """Every job pins glibc's mmap threshold (embedscale/runtime.py), so that a GradCache step's freed chunks leave
    the resident set; a threshold the user set in the environment, or EMBEDSCALE_MALLOC=default, is left alone."""
    import platform

    from embedscale.runtime import MMAP_THRESHOLD_BYTES, tune_allocator

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("EMBEDSCALE_MALLOC", raising=False)
    if platform.libc_ver()[0] == "glibc":
        assert tune_allocator() == f"mmap threshold {MMAP_THRESHOLD_BYTES} B"
    else:
        assert tune_allocator() == "unchanged (not glibc)"
    assert tune_allocator("glibc").startswith("glibc default")
    with pytest.raises(ValueError, match="trainer.host_allocator='fast'"):
        tune_allocator("fast")
    monkeypatch.setenv("EMBEDSCALE_MALLOC", "default")
    assert tune_allocator().startswith("glibc default")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_allocator() == "MALLOC_MMAP_THRESHOLD_=65536 (environment)"


def test_a_guide_model_with_another_tokenizer_is_refused(tiny_bert, tmp_path):
    """loss.guide_model encodes the trained model's tokens: a guide with another vocabulary fails by name."""
    from helpers import make_tiny_mistral

    from embedscale.config import ModelConfig
    from embedscale.encoder.biencoder import load_encoder, load_guide

    cfg = ModelConfig(name_or_path=str(tiny_bert))
    _, tokenizer = load_encoder(cfg)
    guide = load_guide(cfg, str(tiny_bert), tokenizer)
    assert not any(p.requires_grad for p in guide.parameters()) and not guide.training
    mistral = make_tiny_mistral(tmp_path / "mistral")
    with pytest.raises(ValueError, match=r"loss.guide_model=.*mistral has another tokenizer than model.name_or_path"):
        load_guide(cfg, str(mistral), tokenizer)
