"""The jobs of `embedscale <job>`: one thin module each (compose -> library -> outputs), and their one registry.

The registry is plain data (no import of a job module, nor of torch): the CLI lists and dispatches from it, the
pipeline composes its stages from it, and the config validates a stage's job against it. A job module is
imported only when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    name: str
    """`embedscale <name>`; also the module embedscale.jobs.<name>."""
    doc: str
    """One line for `embedscale --help`."""
    config: str | None
    """The Hydra config (conf/<config>.yaml) composed onto `schema`; None: the job parses its own arguments."""
    schema: str | None
    """The config dataclass's name in embedscale.config."""
    stage: bool = False
    """Can be a stage of `embedscale pipeline`."""

    @property
    def module(self) -> str:
        return f"embedscale.jobs.{self.name}"


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job("train", "fine-tune a bi-encoder (default: all-MiniLM-L6-v2 on SciFact)", "train", "TrainConfig", True),
        Job("evaluate", "BEIR/STS metrics of a model or an embedscale export", "evaluate", "EvaluateConfig", True),
        Job(
            "shard",
            "convert JSONL/BEIR/TSV/CSV/HF datasets into WebDataset tar shards + manifest",
            "shard",
            "ShardJobConfig",
            True,
        ),
        Job(
            "reranker",
            "train a cross-encoder on mined groups; re-rank a bi-encoder's top-k",
            "reranker",
            "RerankerJobConfig",
            True,
        ),
        Job(
            "mine",
            "mine hard negatives (dense/BM25/hybrid, false-negative filters) into training shards",
            "mine",
            "MineJobConfig",
            True,
        ),
        Job(
            "generate",
            "synthetic queries for a corpus from a causal/seq2seq LM, round-trip filtered, into training shards",
            "generate",
            "GenerateJobConfig",
        ),
        Job(
            "pipeline",
            "run stages in order (train -> mine -> train ...), with lineage per stage",
            "pipeline",
            "PipelineJobConfig",
        ),
        Job(
            "sweep",
            "retrieval metrics vs Matryoshka dim and index precision (fp32/int8/binary)",
            "sweep",
            "SweepJobConfig",
        ),
        Job(
            "export",
            "ONNX graphs of a model (pooling and normalisation inside; int8 optional), checked against PyTorch",
            "export",
            "ExportJobConfig",
        ),
        Job(
            "plan",
            "per-GPU memory by term (ZeRO, LoRA, GradCache) and the largest chunk that fits",
            "plan",
            "PlanJobConfig",
        ),
        Job("report", "HTML report of a run directory: training curves, eval over steps, sweeps", None, None),
        Job("doctor", "check distributed and GradCache gradients on this launcher; bandwidth", None, None),
    )
}

STAGE_JOBS = tuple(name for name, job in JOBS.items() if job.stage)
