"""Shards and streaming: converters round-trip, manifest, exact coverage and resume, mixtures."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from embedscale.config import ShardConfig, ShardFormat, ShardJobConfig
from embedscale.data.shards import ShardedDataset
from embedscale.data.stream import MixtureStream, Source
from embedscale.jobs.shard import run as shard_run


def write_jsonl(path: Path, n: int, *, prefix: str = "", negatives: int = 1) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {
                "q": f"{prefix}query {i} é",
                "p": f"{prefix}doc {i}",
                "n": [f"{prefix}neg {i}.{j}" for j in range(negatives)],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def shard(tmp_path: Path, inputs: list[Path], name: str, **kw) -> ShardedDataset:
    cfg = ShardConfig(
        inputs=[str(p) for p in inputs],
        name=name,
        output=str(tmp_path / "shards" / name),
        query_field="q",
        positive_field="p",
        negatives_field="n",
        **kw,
    )
    shard_run(ShardJobConfig(shard=cfg))
    return ShardedDataset.open(tmp_path / "shards" / name)


def all_samples(ds: ShardedDataset) -> list[dict]:
    return [s for i, sh in enumerate(ds.shards) for s in ds.read(i, range(sh["samples"]))]


@pytest.mark.slow  # a CLI process
def test_jsonl_round_trip_manifest_and_webdataset(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", 25, prefix="a ", negatives=2)
    b = write_jsonl(tmp_path / "b.jsonl", 13, prefix="b ", negatives=2)
    ds = shard(tmp_path, [a, b], "mix", samples_per_shard=10, target_mb=0, workers=2)
    m = ds.manifest
    assert m["num_samples"] == 38 and m["num_shards"] == 3 + 2
    assert [s["samples"] for s in ds.shards] == [10, 10, 5, 10, 3]
    assert m["schema"]["negatives_per_sample"] == [2, 2]
    assert [Path(s["path"]).name for s in m["sources"]] == ["a.jsonl", "b.jsonl"]
    assert all(len(s["sha256"]) == 64 for s in m["sources"] + m["shards"]) and ds.verify() == []
    got = all_samples(ds)
    assert [g["query"] for g in got[:25]] == [f"a query {i} é" for i in range(25)]
    assert got[30]["negatives"] == ["b neg 5.0", "b neg 5.1"] and got[30]["origin"] == "b.jsonl:6"
    assert len({g["key"] for g in got}) == 38

    import webdataset as wds  # the shards are ordinary WebDataset tars

    urls = [str(ds.root / s["file"]) for s in ds.shards]
    keys = [json.loads(s["json"])["key"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == [g["key"] for g in got]

    again = shard(tmp_path / "again", [a, b], "mix", samples_per_shard=10, target_mb=0)  # reproducible bytes
    assert [s["sha256"] for s in again.shards] == [s["sha256"] for s in ds.shards]


def test_target_size_and_tsv_csv_beir(tmp_path, tiny_data):
    tiny_beir = tiny_data / "tiny"
    a = write_jsonl(tmp_path / "a.jsonl", 200)
    ds = shard(tmp_path, [a], "sized", target_mb=0.01)  # ~10 KiB shards
    assert ds.manifest["num_shards"] > 3 and all(s["bytes"] <= 0.01 * 2**20 for s in ds.shards)
    assert len(all_samples(ds)) == 200

    tsv = tmp_path / "t.tsv.gz"
    with gzip.open(tsv, "wt", encoding="utf-8") as f:
        f.write("q\tp\tn1\tn2\n" + "".join(f"tq{i}\ttp{i}\ttn{i}a\ttn{i}b\n" for i in range(7)))
    t = shard(tmp_path, [tsv], "tsv", format=ShardFormat.tsv)
    assert all_samples(t)[3]["negatives"] == ["tn3a", "tn3b"]
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('q,p\n"a, comma",doc\n')
    assert all_samples(shard(tmp_path, [csv_path], "csv", format=ShardFormat.csv))[0]["query"] == "a, comma"

    beir = shard(tmp_path, [tiny_beir], "beir", format=ShardFormat.beir, split="train")
    from embedscale.data.records import beir_pairs

    pairs = list(beir_pairs(tiny_beir, "train"))
    assert [(s["query"], s["positive"]) for s in all_samples(beir)] == [(p.query, p.positive) for p in pairs]


def test_bad_input_names_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "x", "p": "y"}\n{"q": "", "p": "y"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'q' is missing or empty; set shard\.query_field"):
        shard(tmp_path, [bad], "bad")
    bad.write_bytes(b'{"q": "x", "p": "y"}\n{"q": "\xff", "p": "y"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid UTF-8"):
        shard(tmp_path, [bad], "bad2")
    with pytest.raises(ValueError, match=r"does not exist"):
        shard(tmp_path, [tmp_path / "missing.jsonl"], "missing")
    good = shard(tmp_path, [write_jsonl(tmp_path / "g.jsonl", 5)], "good")
    with pytest.raises(ValueError, match=r"manifest\.json exists.*shard\.overwrite=true"):
        shard(tmp_path, [tmp_path / "g.jsonl"], "good")
    (good.root / good.shards[0]["file"]).write_bytes(b"truncated")
    assert good.verify() == [good.shards[0]["file"]]
    with pytest.raises(ValueError, match="truncated"):
        list(good.read(0, [3]))


def keys_of(stream: MixtureStream) -> list[list[str]]:
    return [[e.key for e in batch] for batch in stream]


@pytest.mark.slow  # DataLoader workers
def test_stream_is_one_order_whatever_the_ranks_and_workers(tmp_path):
    from torch.utils.data import DataLoader

    ds = shard(tmp_path, [write_jsonl(tmp_path / "a.jsonl", 96)], "a", samples_per_shard=7, target_mb=0)
    src = [Source.of("a", ds)]
    one = keys_of(MixtureStream(src, global_batch_size=8, seed=3, shuffle_window=3))
    assert len(one) == 12 and sorted(k for b in one for k in b) == sorted(s["key"] for s in all_samples(ds))
    assert one != sorted(one)  # shuffled
    for world, workers in ((2, 0), (2, 2), (4, 3)):
        per_rank = []
        for rank in range(world):
            stream = MixtureStream(src, global_batch_size=8, world_size=world, rank=rank, seed=3, shuffle_window=3)
            loader = DataLoader(stream, batch_size=None, num_workers=workers)
            per_rank.append([[e.key for e in batch] for batch in loader])
        rebuilt = [sum((per_rank[r][i] for r in range(world)), []) for i in range(12)]
        assert rebuilt == one, (world, workers)
    epoch2 = MixtureStream(src, global_batch_size=8, seed=3, shuffle_window=3)
    epoch2.state = epoch2.state_after(12)
    second = keys_of(epoch2)
    assert sorted(k for b in second for k in b) == sorted(k for b in one for k in b) and second != one


def test_resume_mid_epoch_with_other_ranks_and_batch_size(tmp_path):
    ds = shard(tmp_path, [write_jsonl(tmp_path / "a.jsonl", 96)], "a", samples_per_shard=10, target_mb=0)
    src = [Source.of("a", ds)]
    full = [k for b in keys_of(MixtureStream(src, global_batch_size=8, seed=1)) for k in b]
    first = MixtureStream(src, global_batch_size=8, world_size=2, rank=0, seed=1)
    state = first.state_after(5).as_dict()  # 5 global batches consumed, then the job died
    assert state == {"step": 5, "cursors": {"a": 40}}
    seen = full[:40]
    rest = []  # resumed with other W (4) and G (16)
    for rank in range(4):
        r = MixtureStream(src, global_batch_size=16, world_size=4, rank=rank, seed=1, steps_per_epoch=6)
        r.load_state(state)
        rest.append([b for b in r])
    # resumed epoch: steps 5 (of 6) -> one global batch of 16 from cursor 40
    got = [e.key for rank in range(4) for e in rest[rank][0]]
    assert got == full[40:56] and not set(got) & set(seen)


def test_mixture_homogeneous_batches_and_proportions(tmp_path):
    a = shard(tmp_path, [write_jsonl(tmp_path / "a.jsonl", 300, prefix="a ")], "a", samples_per_shard=50, target_mb=0)
    b = shard(tmp_path, [write_jsonl(tmp_path / "b.jsonl", 100, prefix="b ")], "b", samples_per_shard=50, target_mb=0)
    stream = MixtureStream(
        [Source.of("a", a, 3.0), Source.of("b", b, 1.0)], global_batch_size=4, seed=0, steps_per_epoch=2000
    )
    sources = Counter()
    for batch in stream:
        origins = {e.key.split("-")[0] for e in batch}
        assert len(origins) == 1  # one source per global batch
        sources[origins.pop()] += 1
    assert abs(sources["a"] / 2000 - 0.75) < 0.03


def _ledger(run_dir: Path) -> dict[int, list[str]]:
    """step -> the keys the model consumed at that step, over all ranks (in rank order)."""
    steps: dict[int, dict[int, list[str]]] = {}
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        text = path.read_text()
        lines = text.split("\n")[:-1]  # a line still being written (or cut by the kill) has no newline yet
        for line in lines:
            row = json.loads(line)
            steps.setdefault(row["step"], {})[rank] = row["keys"]
    return {s: sum((r[k] for k in sorted(r)), []) for s, r in steps.items()}


@pytest.mark.slow  # kills a training process
@pytest.mark.parametrize("resume_ranks", [2, 1])
def test_kill_mid_epoch_and_resume(tiny_bert, tmp_path, resume_ranks):
    """2 gloo ranks x 2 workers train from shards, checkpointing every step; SIGKILL mid-epoch; resume on the
    same or another number of ranks: the samples the checkpointed model saw plus those after the resume
    are one epoch, each sample exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    ds = shard(tmp_path, [write_jsonl(tmp_path / "pairs.jsonl", 240)], "pairs", samples_per_shard=25, target_mb=0)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    common = [
        f"model.name_or_path={tiny_bert}",
        "model.query_max_length=16",
        "model.document_max_length=16",
        "data.format=shards",
        f"data.path={ds.root}",
        "data.record_keys=true",
        "trainer.max_epochs=1",
        "trainer.checkpoint_every_n_steps=1",
        "trainer.progress=off",
        "trainer.num_threads=1",
        "eval=none",
        "logger=none",
        "export=false",
    ]

    def cmd(run_dir: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "embedscale.jobs.train",
            *common,
            *extra,
            f"run_dir={run_dir}",
            f"hydra.run.dir={run_dir}",
        ]

    first = tmp_path / "first"
    proc = subprocess.Popen(
        cmd(first, "trainer=ddp_cpu", "data.batch_size_per_rank=4", "data.num_workers=2"),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600  # generous: a loaded CI machine once needed more than 300 s here
    while (
        time.time() < deadline
        and proc.poll() is None
        and (
            len(_ledger(first) if (first / "samples").exists() else {}) < 8
            or not (first / "checkpoints" / "last.ckpt").exists()
        )
    ):
        time.sleep(0.2)
    if proc.poll() is None and not (first / "checkpoints" / "last.ckpt").exists():
        os.killpg(proc.pid, signal.SIGKILL)
        steps = len(_ledger(first)) if (first / "samples").exists() else 0
        raise AssertionError(f"no checkpoint after 600 s ({steps} ledger steps): {proc.stderr.read()[-3000:]}")
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["TrainingData"]
    consumed = state["step"]
    assert 0 < consumed < 30 and state["cursors"] == {"pairs": 8 * consumed}
    seen_before = [k for s, keys in sorted(_ledger(first).items()) if s < consumed for k in keys]
    assert len(seen_before) == 8 * consumed

    second = tmp_path / "second"
    resume = [f"trainer.resume={first / 'checkpoints' / 'last.ckpt'}"]
    resume += ["trainer=ddp_cpu", "data.batch_size_per_rank=4"] if resume_ranks == 2 else ["data.batch_size_per_rank=8"]
    proc2 = subprocess.run(
        cmd(second, *resume),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc2.returncode == 0, proc2.stderr[-4000:]
    after = _ledger(second)
    assert min(after) == consumed and max(after) == 29  # 240 // 8 = 30 steps in the epoch
    seen_after = [k for s in sorted(after) for k in after[s]]
    everything = seen_before + seen_after
    assert len(everything) == 240 and len(set(everything)) == 240
    print(f"killed at checkpointed step {consumed}/30; resumed on {resume_ranks} rank(s): 240 samples, once each")
    assert set(everything) == {s["key"] for s in all_samples(ds)}


@pytest.mark.parametrize("case", ["corrupt", "utf8", "truncated", "missing", "empty"])
def test_bad_input_raises_with_shard_and_fix_or_is_skipped_and_counted(tmp_path, case):
    import numpy as np

    from embedscale.data.shards import ShardWriter

    ds = shard(tmp_path, [write_jsonl(tmp_path / "a.jsonl", 40)], "a", samples_per_shard=10, target_mb=0)
    victim = ds.root / ds.shards[1]["file"]
    offsets = np.load(victim.with_suffix(".idx.npy"))
    if case in ("corrupt", "utf8"):
        off, size = (int(v) for v in offsets[4])
        data = bytearray(victim.read_bytes())
        data[off : off + size] = (b"{" if case == "corrupt" else b"\xff") * size
        victim.write_bytes(bytes(data))
        want, bad = ("corrupt sample" if case == "corrupt" else "invalid UTF-8"), 1
    elif case == "truncated":
        victim.write_bytes(victim.read_bytes()[: int(offsets[6][0])])
        want, bad = "truncated shard", 4
    elif case == "missing":
        victim.unlink()
        want, bad = "missing shard", 10
    else:
        writer = ShardWriter(ds.root, "a-000-x", max_bytes=0, max_samples=10)
        for i in range(10):
            key = f"a-000-x{i}"
            writer.write(key, {"key": key, "query": "" if i == 4 else f"q{i}", "positive": "p", "negatives": []})
        new = writer.close()[0]
        (ds.root / ds.shards[1]["file"]).unlink()
        ds.manifest["shards"][1] = new
        want, bad = "empty or missing query", 1
    with pytest.raises(ValueError, match=rf"{want}.*data\.on_error=skip"):
        keys_of(MixtureStream([Source.of("a", ds)], global_batch_size=8, seed=0, shuffle=False))
    stream = MixtureStream([Source.of("a", ds)], global_batch_size=8, seed=0, shuffle=False, on_error="skip")
    skipped, rows = Counter(), 0
    for step in range(5):
        _, examples, counts, _ = stream.rank_examples(step, stream.cursors_at(step))
        skipped.update(counts)
        rows += len(examples)
    assert skipped == {want: bad} and rows == 40  # every slice keeps its rows; each skip is counted


def test_hf_datasets_saved_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"question": [f"q{i}" for i in range(6)], "answer": [f"a{i}" for i in range(6)], "negs": [["n"]] * 6}
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "hfds"))
    cfg = ShardConfig(
        inputs=[str(tmp_path / "hfds")],
        format=ShardFormat.hf,
        name="hf",
        output=str(tmp_path / "out"),
        query_field="question",
        positive_field="answer",
        negatives_field="negs",
    )
    shard_run(ShardJobConfig(shard=cfg))
    got = all_samples(ShardedDataset.open(tmp_path / "out"))
    assert [(g["query"], g["positive"], g["negatives"]) for g in got] == [(f"q{i}", f"a{i}", ["n"]) for i in range(6)]
    with pytest.raises(ValueError, match=r"no split 'dev'; set shard\.split"):
        shard_run(ShardJobConfig(shard=ShardConfig(**{**cfg.__dict__, "split": "dev", "output": str(tmp_path / "o2")})))


def test_per_source_batch_size_templates_and_in_batch_switch(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    from embedscale.config import ModelConfig
    from embedscale.data.collate import PairCollator

    a = shard(tmp_path, [write_jsonl(tmp_path / "a.jsonl", 64, prefix="a ")], "a", samples_per_shard=16, target_mb=0)
    b = shard(tmp_path, [write_jsonl(tmp_path / "b.jsonl", 64, prefix="b ")], "b", samples_per_shard=16, target_mb=0)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    collate = PairCollator(tok, model_cfg=ModelConfig(query_prefix="query: "), num_hard_negatives=1)
    sources = [
        Source.of("a", a, 1.0, global_batch_size=8, query_prefix="Instruct: find the doc\nQuery: "),
        Source.of("b", b, 1.0, global_batch_size=4, in_batch_negatives=False),
    ]
    per_rank = []
    for rank in range(2):
        stream = MixtureStream(
            sources, global_batch_size=6, world_size=2, rank=rank, seed=0, collate=collate, num_hard_negatives=1
        )
        per_rank.append(list(stream))
    assert len(per_rank[0]) == len(per_rank[1]) == 128 // 6  # expected G = (8 + 4) / 2 -> 21 steps per epoch
    for x, y in zip(*per_rank, strict=True):
        assert x.source == y.source and x.batch_size == y.batch_size == {"a": 4, "b": 2}[x.source]
        assert x.in_batch_negatives == (x.source == "a")
        first = tok.decode(x.queries["input_ids"][0], skip_special_tokens=True)
        assert first.startswith("instruct : find the doc query :" if x.source == "a" else "query :"), first
    for name in ("a", "b"):  # each source runs through its own epochs: its first 64 samples are distinct
        keys = [k for x, y in zip(*per_rank, strict=True) if x.source == name for k in x.keys + y.keys]
        assert len(set(keys[:64])) == min(len(keys), 64) and set(keys) <= {
            s["key"] for s in all_samples(a if name == "a" else b)
        }


def test_length_buckets_cut_padding_and_keep_the_order_exact(tmp_path):
    rng = __import__("random").Random(0)
    path = tmp_path / "var.jsonl"
    with open(path, "w") as f:
        for i in range(256):
            f.write(json.dumps({"q": f"q{i}", "p": " ".join(["word"] * rng.randint(1, 200)) + f" {i}"}) + "\n")
    ds = shard(tmp_path, [path], "var", samples_per_shard=32, target_mb=0)
    src = [Source.of("var", ds)]

    def padded(stream) -> tuple[int, list[str]]:
        batches = list(stream)
        return sum(len(b) * max(len(e.positive) for e in b) for b in batches), [e.key for b in batches for e in b]

    plain_pad, plain_keys = padded(MixtureStream(src, global_batch_size=16, seed=0))
    bucket_pad, bucket_keys = padded(MixtureStream(src, global_batch_size=16, seed=0, length_bucket=128))
    assert sorted(bucket_keys) == sorted(plain_keys) and len(set(bucket_keys)) == 256
    assert bucket_pad < 0.75 * plain_pad, (bucket_pad, plain_pad)
    halves = [MixtureStream(src, global_batch_size=8, world_size=2, rank=r, seed=0, length_bucket=128) for r in (0, 1)]
    rebuilt = [e.key for x, y in zip(*halves, strict=True) for e in x + y]
    g16 = [bucket_keys[i : i + 16] for i in range(0, 256, 16)]
    assert [rebuilt[i : i + 16] for i in range(0, 256, 16)] == g16  # rank-independent with buckets too


def test_fsspec_urls_and_pipe_is_refused(tmp_path):
    import fsspec

    from embedscale.data.shards import open_binary

    ds = shard(tmp_path, [write_jsonl(tmp_path / "a.jsonl", 30)], "a", samples_per_shard=10, target_mb=0)
    fs = fsspec.filesystem("memory")
    for f in ds.root.iterdir():
        fs.pipe(f"/remote/a/{f.name}", f.read_bytes())
    remote = ShardedDataset.open("memory://remote/a")
    assert len(remote) == 30 and remote.verify() == []
    assert all_samples(remote) == all_samples(ds)
    assert [b for b in MixtureStream([Source.of("a", remote)], global_batch_size=5, seed=2)] == [
        b for b in MixtureStream([Source.of("a", ds)], global_batch_size=5, seed=2)
    ]
    with pytest.raises(ValueError, match="pipe: URLs can only be read front to back"):
        open_binary("pipe:curl -s https://example.com/a-000-000000.tar")


def test_cursors_are_the_running_sum_of_draws_across_blocks():
    """Vectorised cursors (blocks of 4096 steps) equal the step-by-step sum, also from a loaded state."""

    class Fake:  # a source of n samples; the schedule never reads it
        def __init__(self, n):
            self.shards, self.root, self.manifest = [{"samples": n}], "fake", {"name": "fake"}

    st = MixtureStream(
        [Source.of("a", Fake(100), 1.0), Source.of("b", Fake(50), 2.0, global_batch_size=4)],
        global_batch_size=8,
        seed=5,
    )
    cur, want = [0, 0], {}
    for i in range(12290):
        want[i] = list(cur)
        cur[st.source_of(i)] += st.sizes[st.source_of(i)]
    for step in (0, 1, 77, 4095, 4096, 4097, 10000, 12289):
        assert st.cursors_at(step) == want[step]
    st.state = st.state_after(5000)
    assert st.cursors_at(9000) == want[9000]


def test_mixed_batches_split_rows_by_weight_whatever_the_ranks(tmp_path):
    a = shard(tmp_path, [write_jsonl(tmp_path / "a.jsonl", 400, prefix="a ")], "a", samples_per_shard=50, target_mb=0)
    b = shard(tmp_path, [write_jsonl(tmp_path / "b.jsonl", 400, prefix="b ")], "b", samples_per_shard=50, target_mb=0)
    src = [Source.of("a", a, 1.0, query_prefix="A: "), Source.of("b", b, 3.0)]
    one = list(MixtureStream(src, global_batch_size=8, seed=4, homogeneous=False, steps_per_epoch=80))
    rows = Counter(e.key.split("-")[0] for batch in one for e in batch)
    assert abs(rows["b"] / 640 - 0.75) < 0.04 and any(len({e.key[0] for e in batch}) == 2 for batch in one)
    halves = [
        list(
            MixtureStream(src, global_batch_size=8, world_size=2, rank=r, seed=4, homogeneous=False, steps_per_epoch=80)
        )
        for r in (0, 1)
    ]
    assert [x + y for x, y in zip(*halves, strict=True)] == one
    for name in "ab":  # each source's rows are its own stream: its first 400 (one epoch) are distinct
        keys = [e.key for batch in one for e in batch if e.key.startswith(name)]
        assert len(set(keys[:400])) == min(len(keys), 400)
    with pytest.raises(ValueError, match=r"homogeneous_batches=false.*\['b'\]"):
        MixtureStream(
            [src[0], Source.of("b", b, 1.0, in_batch_negatives=False)], global_batch_size=8, homogeneous=False
        )
