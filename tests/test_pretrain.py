"""Pre-training pairs from an unlabelled corpus (data.format=corpus): ICT and independent cropping make
pairs of the document, fresh and deterministic per (seed, epoch, document); short documents are
counted; the sampler yields (epoch, i) and keeps global batches repeat-free; `embedscale.train.run`
trains on them end to end."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from embedscale.config import DataConfig, DataFormat, PretrainConfig, TrainConfig, register_configs, to_config
from embedscale.data.datamodule import load_examples
from embedscale.data.pretrain import PretrainPairs, split_sentences
from embedscale.data.records import read_corpus_documents
from embedscale.data.sampler import GlobalBatchSampler, example_keys
from embedscale.jobs.launch import conf_dir


def sentences_of(i: int, n: int = 5) -> list[str]:
    """Traceable sentences: every word names its document and sentence, so spans and sentences are unambiguous."""
    return [" ".join(f"d{i}s{j}w{k}" for k in range(4 + (i + j) % 5)) + "." for j in range(n)]


def documents(num: int, *, title: bool = True) -> list[tuple[str, str, str]]:
    return [(f"doc{i}", f"title{i}" if title else "", " ".join(sentences_of(i))) for i in range(num)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def test_ict_query_is_a_sentence_the_positive_the_titled_rest_kept_at_the_configured_rate():
    docs = documents(600)
    pairs = PretrainPairs(docs, PretrainConfig(task="ict"), seed=0, name="toy")
    kept = 0
    for (doc_id, title, text), ex in zip(docs, pairs.examples(0), strict=True):
        sentences = split_sentences(text)
        assert ex.query in sentences and ex.key == f"toy:{doc_id}:e0"
        rest = " ".join(s for s in sentences if s != ex.query)
        if ex.query in ex.positive:
            kept += 1
            assert ex.positive == f"{title} {text}"
        else:
            assert ex.positive == f"{title} {rest}"
    assert abs(kept / len(docs) - 0.1) < 0.04, kept  # binomial sd 0.012 at n = 600
    assert pairs.stats["ict"] == 600 and pairs.stats["spans"] == pairs.stats["ict_fallback"] == 0
    always = PretrainPairs(docs[:50], PretrainConfig(task="ict", ict_keep_prob=1.0), seed=0, name="toy")
    assert all(ex.query in ex.positive for ex in always.examples(0))
    untitled = PretrainPairs(documents(20, title=False), PretrainConfig(task="ict"), seed=0, name="toy")
    assert all(ex.positive.startswith("d") for ex in untitled.examples(0))  # no title, no leading space


@pytest.mark.parametrize("ratios", [(0.1, 0.5), (0.3, 0.3), (0.5, 1.0)])
def test_spans_are_contiguous_word_spans_within_the_ratio_bounds(ratios):
    lo_ratio, hi_ratio = ratios
    docs = [(f"doc{n}", "t", " ".join(f"w{n}_{k}" for k in range(n))) for n in range(16, 200, 3)]
    cfg = PretrainConfig(task="spans", span_min_ratio=lo_ratio, span_max_ratio=hi_ratio)
    pairs = PretrainPairs(docs, cfg, seed=1, name="toy")
    lengths = []
    for epoch in range(3):
        for (_, _, text), ex in zip(docs, pairs.examples(epoch), strict=True):
            words, n = text.split(), len(text.split())
            lo = max(math.ceil(lo_ratio * n - 1e-9), cfg.min_query_words)
            hi = max(math.floor(hi_ratio * n + 1e-9), lo)
            for span in (ex.query, ex.positive):
                span_words = span.split()
                start = words.index(span_words[0])
                assert words[start : start + len(span_words)] == span_words  # contiguous, in order
                assert lo <= len(span_words) <= hi, (n, len(span_words))
                lengths.append(len(span_words) / n)
    assert pairs.stats["spans"] == len(docs)
    if lo_ratio < hi_ratio:  # lengths spread over the range, not stuck at one end
        assert min(lengths) < lo_ratio + 0.1 and max(lengths) > hi_ratio - 0.1


def test_a_document_without_two_sentences_falls_back_to_spans_and_is_counted():
    one = ("one", "", " ".join(f"w{k}" for k in range(30)))  # no sentence end: one sentence
    short_sentences = ("short", "", "A b. " * 12)  # 12 sentences of 2 words < min_query_words
    pairs = PretrainPairs([one, short_sentences, *documents(3)], PretrainConfig(task="ict"), seed=0, name="toy")
    examples = pairs.examples(0)
    assert pairs.stats["ict_fallback"] == 2 and pairs.stats["ict"] == 3 and pairs.stats["spans"] == 0
    assert examples[0].query in one[2] and examples[0].positive in one[2]


def test_mixed_picks_each_task_about_half_the_time():
    pairs = PretrainPairs(documents(400), PretrainConfig(task="mixed"), seed=0, name="toy")
    pairs.examples(0)
    assert abs(pairs.stats["ict"] / 400 - 0.5) < 0.1 and pairs.stats["ict"] + pairs.stats["spans"] == 400


def digest(examples) -> str:
    return hashlib.sha256(json.dumps([(e.key, e.query, e.positive) for e in examples]).encode()).hexdigest()


@pytest.mark.slow  # another process
def test_pairs_are_a_function_of_seed_epoch_and_document_even_in_another_process(tmp_path):
    docs = documents(40)
    pairs = PretrainPairs(docs, PretrainConfig(), seed=7, name="toy")
    epoch1 = pairs.examples(1)
    assert digest(PretrainPairs(docs, PretrainConfig(), seed=7, name="toy").examples(1)) == digest(epoch1)
    assert [pairs[(1, i)] for i in range(len(pairs))] == epoch1  # indexing = the epoch, in any order
    assert pairs[(1, 5)] == PretrainPairs(docs[5:6], PretrainConfig(), seed=7, name="toy")[(1, 0)]
    assert sum(a.query != b.query for a, b in zip(pairs.examples(0), epoch1, strict=True)) > 30
    assert (
        sum(
            a.query != b.query
            for a, b in zip(PretrainPairs(docs, PretrainConfig(), seed=8, name="toy").examples(1), epoch1, strict=True)
        )
        > 30
    )
    path = write_jsonl(tmp_path / "docs.jsonl", [{"_id": d, "title": t, "text": x} for d, t, x in docs])
    code = (  # imports only what it needs (not this module: torch and Lightning would cost seconds)
        "import hashlib, json, sys; from pathlib import Path;"
        "from embedscale.config import PretrainConfig; from embedscale.data.pretrain import PretrainPairs;"
        "from embedscale.data.records import read_corpus_documents as r;"
        "d = r(Path(sys.argv[1]), text_field='text', title_field='title');"
        "x = PretrainPairs(d, PretrainConfig(), seed=7, name='toy').examples(1);"
        "print(hashlib.sha256(json.dumps([(e.key, e.query, e.positive) for e in x]).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # str hashing differs; the string seed must not care
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == digest(epoch1)


def test_short_documents_are_counted_and_logged_and_none_usable_names_data_path(tmp_path, caplog):
    short = [(f"s{i}", "", "too short to use") for i in range(3)]
    with caplog.at_level("WARNING"):
        pairs = PretrainPairs([*short, *documents(5)], PretrainConfig(), seed=0, name="toy")
    assert len(pairs) == 5 and pairs.stats["too_short"] == 3 and pairs.stats["documents"] == 8
    assert "3 of 8 documents shorter than data.pretrain.min_words=16 are not used" in caplog.text
    assert all(":s" not in ex.key for ex in pairs.examples(0))
    write_jsonl(tmp_path / "short.jsonl", [{"text": "only four words here"}] * 4)
    cfg = DataConfig(format=DataFormat.corpus, path="short.jsonl")
    with pytest.raises(ValueError, match=r"data\.path"):
        load_examples(cfg, tmp_path)


def test_read_corpus_documents_from_jsonl_and_beir(tmp_path):
    rows = [{"body": "first text", "head": "T1"}, {"id": 9, "body": "second"}, {"_id": "x", "body": "third"}]
    path = write_jsonl(tmp_path / "docs.jsonl.gz", rows)
    docs = read_corpus_documents(path, text_field="body", title_field="head")
    assert docs == [("1", "T1", "first text"), ("9", "", "second"), ("x", "", "third")]
    with pytest.raises(ValueError, match=r"docs\.jsonl\.gz:1: .*data\.pretrain\.text_field"):
        read_corpus_documents(path, text_field="text", title_field="head")
    write_jsonl(tmp_path / "empty.jsonl", [{"text": "fine"}, {"text": "  "}])
    with pytest.raises(ValueError, match=r"empty\.jsonl:2: .*data\.pretrain\.text_field"):
        read_corpus_documents(tmp_path / "empty.jsonl", text_field="text", title_field="title")
    write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "text": "a"}, {"id": 1, "text": "b"}])
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: document id '1' occurs again \(first at line 1\)"):
        read_corpus_documents(tmp_path / "dup.jsonl", text_field="text", title_field="title")
    beir = tmp_path / "beir"
    beir.mkdir()
    write_jsonl(beir / "corpus.jsonl.gz", [{"_id": "a", "title": "T", "text": "body"}, {"_id": "b", "text": ""}])
    assert read_corpus_documents(beir, text_field="ignored", title_field="ignored") == [
        ("a", "T", "body"),
        ("b", "", ""),  # title-only BEIR documents are kept, then counted as too short
    ]


def repeats(examples, batch) -> int:
    keys = [example_keys(examples[i], 0) for i in batch]
    return sum(len(a & b) for a, b in itertools.combinations(keys, 2))


def test_sampler_yields_epoch_indices_covers_every_document_and_keeps_batches_repeat_free():
    # 10 distinct texts, each under 5 ids: ICT often picks the same sentence of the same text -> same query
    docs = [(f"doc{i}", "", " ".join(sentences_of(i % 10, n=4))) for i in range(50)]
    pairs = PretrainPairs(docs, PretrainConfig(task="ict", ict_keep_prob=0.0), seed=3, name="toy")
    sampler = GlobalBatchSampler(pairs, global_batch_size=8, world_size=1, rank=0, seed=3)
    loader = DataLoader(pairs, batch_sampler=sampler, collate_fn=list)
    seen = []
    for epoch in (0, 1):
        _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls at each epoch start
        indices = list(sampler)
        assert all(isinstance(ix, tuple) and ix[0] == epoch for batch in indices for ix in batch)
        flat = [i for batch in indices for _, i in batch]
        assert len(flat) == len(set(flat)) == 48  # each document once; N mod G = 2 in the dropped batch
        examples = pairs.examples(epoch)
        assert all(repeats(examples, [i for _, i in batch]) == 0 for batch in indices)
        batches = list(loader)
        assert [[ex.key for ex in b] for b in batches] == [[f"toy:doc{i}:e{epoch}" for _, i in b] for b in indices]
        seen.append([ex.query for b in batches for ex in b])
    assert seen[0] != seen[1]
    plain = GlobalBatchSampler(pairs, global_batch_size=8, world_size=1, rank=0, seed=3, no_duplicates=False)
    assert sum(repeats(pairs.examples(0), b) for b in plain.global_batches()) > 0  # the check is not vacuous


@pytest.mark.slow  # DataLoader workers
def test_persistent_workers_make_the_epoch_the_sampler_says():
    pairs = PretrainPairs(documents(16), PretrainConfig(), seed=0, name="toy")
    sampler = GlobalBatchSampler(pairs, global_batch_size=4, world_size=1, rank=0, seed=0)
    loader = DataLoader(pairs, batch_sampler=sampler, collate_fn=list, num_workers=1, persistent_workers=True)
    for epoch in (0, 1):
        _set_sampler_epoch(loader, epoch)
        got = {ex.key: ex for batch in loader for ex in batch}
        assert got == {ex.key: ex for ex in pairs.examples(epoch)}


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return to_config(compose(config_name="train", overrides=overrides), TrainConfig)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.pretrain.task=foo"], r"data\.pretrain\.task"),  # an enum: refused while composing
        (["data.pretrain.ict_keep_prob=1.5"], r"data\.pretrain\.ict_keep_prob"),
        (["data.pretrain.span_min_ratio=0"], r"data\.pretrain\.span_min_ratio"),
        (["data.pretrain.span_min_ratio=0.6"], r"data\.pretrain\.span_max_ratio"),
        (["data.pretrain.min_words=1"], r"data\.pretrain\.min_words"),
        (["data.pretrain.min_query_words=0"], r"data\.pretrain\.min_query_words"),
        (["data.format=corpus", "data.num_hard_negatives=1"], r"set data\.num_hard_negatives=0"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    from hydra.errors import ConfigCompositionException

    with pytest.raises((ValueError, ConfigCompositionException)) as err:
        _compose(overrides)
    assert re.search(match, f"{err.value} {err.value.__cause__}"), err.value


def test_corpus_format_composes_with_defaults():
    cfg = _compose(["data.format=corpus", "data.pretrain.task=ict", "data.pretrain.min_words=8"])
    assert cfg.data.format is DataFormat.corpus
    assert cfg.data.pretrain == PretrainConfig(task="ict", min_words=8)


def test_scifact_corpus_epoch(shared_data):
    cfg = DataConfig(format=DataFormat.corpus, path="scifact")
    pairs = load_examples(cfg, shared_data, seed=0)
    stats = pairs.stats
    assert len(pairs) == stats["used"] == 5183 - stats["too_short"] and stats["documents"] == 5183  # data/README.md
    assert stats["ict"] + stats["spans"] + stats["ict_fallback"] == len(pairs)
    assert 0.4 < stats["ict"] / len(pairs) < 0.6
    corpus = {
        d: (t, " ".join(x.split()))
        for d, t, x in read_corpus_documents(shared_data / "scifact", text_field="text", title_field="title")
    }
    examples = pairs.examples(0)
    assert len({ex.key for ex in examples}) == len(pairs)
    for ex in examples:
        title, text = corpus[ex.key.split(":")[1]]
        assert " ".join(ex.query.split()) in text, ex.key  # a sentence or a word span of the document
        if not ex.positive.startswith(title):  # spans: the positive is a span of the text too
            assert " ".join(ex.positive.split()) in text, ex.key


def test_train_on_corpus_pairs_end_to_end(tiny_bert, tiny_data, tmp_path):
    from embedscale.jobs.train import run

    rows = [{"_id": f"d{i}", "title": f"title {i}", "text": " ".join(sentences_of(i))} for i in range(20)]
    rows += [{"_id": "short", "text": "a short one"}]
    write_jsonl(tmp_path / "docs.jsonl", rows)
    cfg = _compose(
        [
            f"model.name_or_path={tiny_bert}",
            "model.document_max_length=32",
            "model.query_max_length=16",
            f"data.root={tmp_path}",
            "data.format=corpus",
            "data.path=docs.jsonl",
            "data.batch_size_per_rank=4",
            f"eval.beir.0.path={tiny_data / 'tiny'}",
            f"eval.cache_dir={tmp_path / 'cache'}",
            "eval.before_training=false",
            "trainer.max_steps=2",
            "trainer.log_every_n_steps=1",
            "trainer.progress=off",
            "logger.loggers=[csv]",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    result = run(cfg)
    assert result["train"]["optimizer_steps"] == 2 and result["train"]["examples"] == 20
    assert "tiny/ndcg@10" in result["eval"]["after"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
