"""Node boundaries: two torchrun "nodes" on 127.0.0.1 (c10d rendezvous, 2 processes each) and the multi-node sbatch
template on the local SLURM cluster (2 srun tasks) train to the weights of 4 processes on one node (rtol 1e-5).

The runs are bench/multinode.py's functions (its docstring: tiny dropout-free BERT, GradCache chunk 1, global
batch 8, 3 optimizer steps); the bench writes the same comparison to bench/results/multinode.json.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import multinode  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts ranks (tests/conftest.py: tiers)


def _check(got: dict, want: dict, start: dict) -> float:
    assert max((want[n] - start[n]).abs().max().item() for n in want if n in start) > 1e-4, "nothing trained"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    return multinode.rel_diff(got, want)


@pytest.fixture(scope="module")
def one_node(tiny_bert_nodrop, tiny_data, tmp_path_factory) -> dict:
    """4 processes on one node (torchrun --standalone): the reference weights."""
    run_dir = tmp_path_factory.mktemp("multinode") / "one-node"
    multinode.one_node(tiny_bert_nodrop, tiny_data, run_dir)
    return multinode.weights(run_dir)


def test_two_torchrun_nodes_equal_one_node(one_node, tiny_bert_nodrop, tiny_data, tmp_path):
    multinode.two_nodes(tiny_bert_nodrop, tiny_data, tmp_path / "two-nodes")
    diff = _check(multinode.weights(tmp_path / "two-nodes"), one_node, multinode.weights(tiny_bert_nodrop))
    print(f"2 nodes x 2 vs 1 node x 4: max relative difference {diff:.1e}")


@pytest.mark.skipif(
    not multinode.cluster_up() and not os.environ.get("CI"),
    reason="no SLURM cluster: start one with ../shared/tools/local-slurm/start_local_slurm.sh (.ci/run does)",
)
def test_multinode_sbatch_template_on_slurm(one_node, tiny_bert_nodrop, tiny_data, tmp_path):
    multinode.slurm_tasks(tiny_bert_nodrop, tiny_data, tmp_path / "slurm")
    diff = _check(multinode.weights(tmp_path / "slurm"), one_node, multinode.weights(tiny_bert_nodrop))
    print(f"SLURM 2 tasks vs 1 node x 4: max relative difference {diff:.1e}")
