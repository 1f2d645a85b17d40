"""The global-batch sampler: same global batches for any world size, no repeated texts where the data
allows, a fixed number of steps per epoch, reshuffled per epoch (also through Lightning's hook)."""

from __future__ import annotations

import itertools

import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from embedscale.config import DataConfig
from embedscale.data.batch import PairExample
from embedscale.data.datamodule import load_examples
from embedscale.data.sampler import GlobalBatchSampler, example_keys


def duplicated_examples(n=60) -> list[PairExample]:
    # 30 documents, each the positive of 2 queries; 6 query texts appear twice
    return [PairExample(f"query {i % 30 if i % 30 < 6 else i}", f"document {(7 * i) % 30}") for i in range(n)]


def repeats(examples, batch, k=0) -> int:
    keys = [example_keys(examples[i], k) for i in batch]
    return sum(len(a & b) for a, b in itertools.combinations(keys, 2))


def test_global_batches_have_no_repeats_and_lose_nothing_to_deferral():
    examples = duplicated_examples()
    sampler = GlobalBatchSampler(examples, global_batch_size=8, world_size=1, rank=0, seed=3)
    batches = sampler.global_batches()
    assert len(batches) == len(sampler) == 60 // 8
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 56  # each example at most once; only N mod G = 4 dropped
    assert all(repeats(examples, b) == 0 for b in batches)
    plain = [
        GlobalBatchSampler(examples, global_batch_size=8, world_size=1, rank=0, seed=s, no_duplicates=False)
        for s in range(5)
    ]
    assert sum(repeats(examples, b) for p in plain for b in p.global_batches()) > 0  # not vacuous


def test_when_repeats_are_unavoidable_batches_still_fill():
    examples = [PairExample(f"query {i}", "the same document") for i in range(20)]
    sampler = GlobalBatchSampler(examples, global_batch_size=4, world_size=1, rank=0, seed=0)
    batches = sampler.global_batches()
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert len({i for b in batches for i in b}) == 20


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_slice_the_same_global_batches(world_size):
    examples = duplicated_examples()
    one = list(GlobalBatchSampler(examples, global_batch_size=8, world_size=1, rank=0, seed=5))
    ranks = [
        list(GlobalBatchSampler(examples, global_batch_size=8, world_size=world_size, rank=r, seed=5))
        for r in range(world_size)
    ]
    for step, batch in enumerate(one):
        assert [i for r in range(world_size) for i in ranks[r][step]] == batch
        assert all(len(ranks[r][step]) == 8 // world_size for r in range(world_size))


def test_epochs_reshuffle_through_lightnings_hook():
    examples = duplicated_examples()
    sampler = GlobalBatchSampler(examples, global_batch_size=8, world_size=1, rank=0, seed=0)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=list)
    first = sampler.global_batches()
    _set_sampler_epoch(loader, 1)  # what Lightning's fit loop calls at each epoch start
    assert sampler.epoch == 1 and sampler.global_batches() != first
    _set_sampler_epoch(loader, 0)
    assert sampler.global_batches() == first  # deterministic per (seed, epoch)


def test_hard_negative_texts_count_as_repeats():
    examples = [PairExample(f"q{i}", f"d{i}", [f"d{(i + 1) % 10}"]) for i in range(10)]
    sampler = GlobalBatchSampler(examples, global_batch_size=4, world_size=1, rank=0, seed=1, num_hard_negatives=1)
    for batch in sampler.global_batches():
        assert repeats(examples, batch, k=1) == 0


def test_scifact_batches_are_repeat_free(shared_data):
    examples = load_examples(DataConfig(), shared_data)  # 919 pairs, only 565 distinct abstracts
    sampler = GlobalBatchSampler(examples, global_batch_size=32, world_size=1, rank=0, seed=42)
    batches = sampler.global_batches()
    assert len(batches) == 28 and all(repeats(examples, b) == 0 for b in batches)
    plain = GlobalBatchSampler(examples, global_batch_size=32, world_size=1, rank=0, seed=42, no_duplicates=False)
    assert sum(repeats(examples, b) for b in plain.global_batches()) > 0


@pytest.mark.parametrize("seed", [42, 1])
def test_scifact_batches_equal_sentence_transformers_no_duplicates_sampler(shared_data, seed):
    """The premise of bench/st_paired.py: on SciFact train, our sampler and sentence-transformers'
    NoDuplicatesBatchSampler (drop_last, same seed) give the same batches, in the same order, every epoch."""
    import torch
    from datasets import Dataset
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    examples = load_examples(DataConfig(), shared_data)
    dataset = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive for e in examples]})
    st = NoDuplicatesBatchSampler(dataset, batch_size=32, drop_last=True, generator=torch.Generator(), seed=seed)
    ours = GlobalBatchSampler(examples, global_batch_size=32, world_size=1, rank=0, seed=seed)
    for epoch in range(3):
        st.set_epoch(epoch)
        ours.set_epoch(epoch)
        theirs = list(st)
        assert len(theirs) == 28 and list(ours) == theirs, f"epoch {epoch}"
