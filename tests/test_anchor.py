"""Forgetting control: anchor.l2_sp_weight (decoupled L2-SP), anchor.interpolation (WiSE-FT), eval.selection (a
combined selection metric), eval.early_stopping_patience, and eval.pairs (a retrieval set from a pairs file, for a
general metric next to the domain's)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_train as _cfg
from helpers import exported_weights, train_in_process

from embedscale.config import AnchorConfig, BeirSet, EvalConfig, PairsSet, StsSet
from embedscale.contrastive.anchor import StartAnchor


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _step(model, optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(5, 4, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
    optimizer.step()


def test_l2_sp_pulls_each_step_by_lr_times_weight_towards_the_start():
    model = _model()
    start = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    anchor = StartAnchor(model, AnchorConfig(l2_sp_weight=3.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.01)
    anchor.on_train_start(SimpleNamespace(optimizers=[optimizer]), None)
    for _ in range(3):
        _step(model, optimizer)
        _step(reference, ref_optimizer)  # AdamW alone, then the pull by hand: w -= lr x weight x (w - w_start)
        with torch.no_grad():
            for p, p0 in zip(reference.parameters(), start.parameters(), strict=True):
                p.sub_(p - p0, alpha=0.05 * 3.0)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert anchor.pulled_steps == 3
    moved = [(p - q).abs().max().item() for p, q in zip(model.parameters(), start.parameters(), strict=True)]
    assert min(moved) > 0  # the optimizer still moved every weight

    anchor.on_train_end(SimpleNamespace(checkpoint_callbacks=[]), None)  # the hooks go with the run
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, optimizer)
    assert anchor.pulled_steps == 3 and any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_skipped_step_is_not_pulled():
    """The non-finite guard skips a step by dropping every gradient: AdamW leaves the weights, so must the pull."""
    model = _model()
    anchor = StartAnchor(model, AnchorConfig(l2_sp_weight=3.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    anchor.on_train_start(SimpleNamespace(optimizers=[optimizer]), None)
    _step(model, optimizer)
    after_one = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    optimizer.step()
    assert anchor.pulled_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_one, strict=True))


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_interpolation_with_the_start_when_training_ends(alpha):
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    anchor = StartAnchor(model, AnchorConfig(interpolation=alpha))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    anchor.on_train_start(SimpleNamespace(optimizers=[optimizer]), None)
    _step(model, optimizer)
    trained = [p.detach().clone() for p in model.parameters()]
    anchor.on_train_end(SimpleNamespace(checkpoint_callbacks=[]), None)
    for p, p0, p1 in zip(model.parameters(), start, trained, strict=True):
        torch.testing.assert_close(p, p0 + alpha * (p1 - p0), rtol=0, atol=1e-7)
    assert anchor.pulled_steps == 0  # no L2-SP asked


def test_for_run_copies_nothing_when_off():
    assert StartAnchor.for_run(_model(), AnchorConfig()) is None
    only_trained = _model()
    only_trained[0].weight.requires_grad_(False)
    assert len(StartAnchor(only_trained, AnchorConfig(interpolation=0.5)).start) == 3


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["trainer.strategy=fsdp2", "eval=none"], "not supported yet"),
        (["model.lora_r=4"], "LoRA already"),
        (["anchor.l2_sp_weight=20000"], "lr x l2_sp_weight < 1"),
        (["anchor.interpolation=0.5", "eval.export_best=true"], "one or the other"),
    ],
    ids=["fsdp2", "lora", "pull-past-start", "export-best"],
)
def test_anchor_settings_that_cannot_work_are_refused(overrides, match):
    base = "anchor.l2_sp_weight=10" if not any(o.startswith("anchor.") for o in overrides) else "seed=1"
    with pytest.raises(Exception, match=match):
        _cfg([base, *overrides])


@pytest.mark.parametrize(
    ("selection", "match"),
    [
        (["nfcorpus/ndcg@10"], "not a metric of this evaluation"),
        (["scifact/ndcg@7"], "k in eval.k_values"),
        (["scifact/precision@10"], "ndcg|recall|map|mrr"),
        (["stsb/ndcg@10"], "spearman for STS"),
    ],
)
def test_selection_names_metrics_of_the_evaluation(selection, match):
    sets = dict(beir=[BeirSet(path="scifact")], sts=[StsSet(path="stsb/test.tsv")])
    EvalConfig(**sets, selection=["scifact/ndcg@10", "stsb/spearman", "scifact/recall@100"])
    EvalConfig(beir=[BeirSet(path="/data/x", name="medquad")], selection=["medquad/mrr@5"])
    with pytest.raises(ValueError, match=match):
        EvalConfig(**sets, selection=selection)
    with pytest.raises(ValueError, match="every_n_steps > 0"):
        EvalConfig(**sets, early_stopping_patience=2)


class _Trainer(SimpleNamespace):
    def save_checkpoint(self, path, weights_only=False):  # noqa: ARG002
        self.saved.append(self.global_step)


def test_selection_picks_the_best_mean_and_stops_after_patience(monkeypatch):
    """The best evaluation is the best mean of the selection metrics (not the first metric's best), and training
    stops after `patience` evaluations without a new best."""
    from embedscale.contrastive import callbacks

    script = iter(
        [
            {"a/ndcg@10": 0.5, "b/spearman": 0.8},  # before: not a candidate
            {"a/ndcg@10": 0.7, "b/spearman": 0.5},  # step 1: mean 0.60 (a's best is later)
            {"a/ndcg@10": 0.6, "b/spearman": 0.7},  # step 2: mean 0.65, the best
            {"a/ndcg@10": 0.8, "b/spearman": 0.4},  # step 3: mean 0.60
            {"a/ndcg@10": 0.5, "b/spearman": 0.7},  # step 4: mean 0.60 -> 2 without a new best: stop
        ]
    )
    monkeypatch.setattr(callbacks, "evaluate_all", lambda *a, **k: dict(next(script)))
    cb = callbacks.EvalCallback(
        [object()],
        None,
        every_n_steps=1,
        primary="a/ndcg@10",
        selection=["a/ndcg@10", "b/spearman"],
        patience=2,
        best_checkpoint=Path("best.ckpt"),
    )
    trainer = _Trainer(
        global_step=0, is_global_zero=True, loggers=[], should_stop=False, saved=[],
        strategy=SimpleNamespace(barrier=lambda name: None),
    )  # fmt: skip
    module = SimpleNamespace(encoder=None)
    cb.on_train_start(trainer, module)
    for step in range(1, 5):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, step)
        assert trainer.should_stop == (step == 4)
    assert cb.best["step"] == 2 and cb.best["value"] == pytest.approx(0.65)
    assert cb.best["metric"] == "selection: mean of a/ndcg@10, b/spearman" and trainer.saved == [1, 2]
    assert cb.stopped_early == {"step": 4, "evaluations_without_improvement": 2}
    assert [h["metrics"]["selection"] for h in cb.history] == pytest.approx([0.65, 0.6, 0.65, 0.6, 0.6])


def test_training_with_the_anchor_end_to_end(tiny_bert, tiny_data, tmp_path):
    """In a real run: interpolation 0 exports the starting weights exactly, and with L2-SP a run interrupted and
    resumed ends with the weights of the uninterrupted run (the anchor is the start, not the resume point)."""
    from safetensors.torch import load_file

    def train(name: str, steps: int, *extra: str) -> dict:
        return train_in_process(tiny_bert, tiny_data, tmp_path, name, steps, "optim.lr=1e-3", *extra)

    weights = exported_weights
    start = load_file(str(Path(tiny_bert) / "model.safetensors"))
    back = weights(train("back", 2, "anchor.interpolation=0.0"))
    assert start.keys() <= back.keys() and all(torch.equal(back[k], start[k]) for k in start)  # (+ the unused pooler)

    pull = ["anchor.l2_sp_weight=200"]  # 0.2 of the way back per step
    whole = train("whole", 4, *pull)
    plain = weights(train("plain", 4))
    train("first", 2, *pull)
    resumed = train("resumed", 4, *pull, f"trainer.resume={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    assert whole["anchor"]["pulled_steps"] == 4 and resumed["anchor"]["pulled_steps"] == 2
    assert train("gradcache", 2, *pull, "gradcache.chunk_size=2")["anchor"]["pulled_steps"] == 2  # manual steps
    a, b = weights(whole), weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    distance = lambda w: sum((w[k] - start[k]).pow(2).sum().item() for k in start if k in w)  # noqa: E731
    assert distance(a) < 0.9 * distance(plain)  # the pull really held the weights nearer the start


def test_interpolation_leaves_the_checkpoint_trained_and_can_be_chosen_after_training(tiny_bert, tiny_data, tmp_path):
    """A run stopping at max_steps inside an epoch gets its last.ckpt from Lightning's own on_train_end, which runs
    after the anchor's: the checkpoint must still hold the trained weights, not the interpolated ones. And resuming
    a finished run with anchor.interpolation (no step trained, Lightning calls no hook) exports exactly the model a
    run with that interpolation trains: WiSE-FT's coefficient chosen after training."""
    import torch

    def train(name: str, *extra: str) -> dict:
        once = ["trainer.checkpoint_every_n_steps=null", "optim.lr=1e-3"]  # the last save is the on_train_end one
        return train_in_process(tiny_bert, tiny_data, tmp_path, name, 2, *once, *extra)

    def checkpoint(name: str) -> dict:
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu")["state_dict"]

    plain, wise = train("plain"), train("wise", "anchor.interpolation=0.5")
    a, b = checkpoint("plain"), checkpoint("wise")
    assert all(torch.equal(a[k], b[k]) for k in a)  # trained weights in both
    trained, interpolated = exported_weights(plain), exported_weights(wise)
    assert any(not torch.equal(trained[k], interpolated[k]) for k in trained)
    last = tmp_path / "plain" / "checkpoints" / "last.ckpt"
    later = train("later", "anchor.interpolation=0.5", f"trainer.resume={last}")
    assert later["train"]["steps_this_run"] == 0 and later["train"]["optimizer_steps"] == 2
    chosen = exported_weights(later)
    assert all(torch.equal(chosen[k], interpolated[k]) for k in interpolated)


def _pairs_file(path: Path) -> Path:
    import json

    rows = [("what is flu", "flu is a virus"), ("what is flu", "influenza spreads"), ("gout?", "gout is arthritis")]
    rows += [(f"question {i}", f"answer {i}") for i in range(7)] + [("another q", "flu is a virus")]
    path.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in rows))
    return path


def test_pairs_evaluation_set(tmp_path):
    """eval.pairs: distinct queries against the sampled pairs' distinct positives; a query is relevant to every
    positive it was paired with; the sample is seeded; a bad line is named by file:line."""
    from embedscale.retrieval.evaluator import RetrievalEvaluator

    path = _pairs_file(tmp_path / "pairs.jsonl")
    ev = RetrievalEvaluator.from_pairs(path, name="qa", max_pairs=0, seed=0)
    assert len(ev.queries) == 10 and len(ev.corpus) == 10  # 11 pairs: one query twice, one positive twice
    flu = next(qid for qid, text in ev.queries.items() if text == "what is flu")
    assert sorted(ev.corpus[d] for d in ev.qrels[flu]) == ["flu is a virus", "influenza spreads"]
    assert sum(len(v) for v in ev.qrels.values()) == 11
    a = RetrievalEvaluator.from_pairs(path, name="qa", max_pairs=4, seed=3)
    b = RetrievalEvaluator.from_pairs(path, name="qa", max_pairs=4, seed=3)
    assert a.qrels == b.qrels and sum(len(v) for v in a.qrels.values()) == 4
    assert set(a.corpus) == {d for docs in a.qrels.values() for d in docs}  # the corpus is the sample's positives
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "positive": "p"}\n{"query": "q2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'positive'"):
        RetrievalEvaluator.from_pairs(tmp_path / "bad.jsonl", name="qa", max_pairs=0, seed=0)
    cfg = EvalConfig(beir=[], pairs=[PairsSet(path=str(path))], selection=[f"{tmp_path.name}/ndcg@10"])
    assert cfg.pairs[0].metric_name == tmp_path.name
