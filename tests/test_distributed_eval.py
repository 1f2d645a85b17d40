"""Evaluation sharded over 2 gloo ranks (torchrun) gives the metrics of one process, exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import clean_env

pytestmark = pytest.mark.slow  # every test here starts ranks (tests/conftest.py: tiers)


def _evaluate(tiny_bert, tiny_data, tmp_path, world: int) -> dict:
    out = tmp_path / f"metrics{world}.json"
    args = [
        f"model.name_or_path={tiny_bert}",
        "model.document_max_length=32",
        f"data_root={tiny_data}",
        "eval=scifact_stsb",
        "eval.beir.0.path=tiny",
        "eval.sts.0.path=sts/test.tsv",
        "eval.batch_size=4",  # 40 documents -> 10 batches, split 5/5 over two ranks
        f"eval.cache_dir={tmp_path / f'cache{world}'}",  # a cold cache: the encoding really is sharded
        f"output={out}",
        f"hydra.run.dir={tmp_path / f'run{world}'}",
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    proc = subprocess.run(
        [*launcher, "-m", "embedscale.jobs.evaluate", *args], capture_output=True, text=True, env=clean_env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_ranks_equal_one(tiny_bert, tiny_data, tmp_path):
    one, two = (_evaluate(tiny_bert, tiny_data, tmp_path, w) for w in (1, 2))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["metrics"] == one["metrics"]  # identical, not close: same batches, same bits
    assert {"tiny/ndcg@10", "stsb/spearman"} <= set(one["metrics"])
