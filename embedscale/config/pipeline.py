"""`pipeline.*`: stages of jobs run in order, each from the last (`embedscale pipeline`, docs/recipes.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embedscale.jobs import STAGE_JOBS


@dataclass
class StageConfig:
    """One stage of `embedscale pipeline`: a job and its Hydra overrides."""

    name: str = "???"
    """Stage name: its directory under pipeline.output, and `{name}` in later stages' overrides."""
    job: str = "train"
    """The job the stage runs: train, mine, evaluate, shard or reranker (embedscale/jobs/__init__.py)."""
    overrides: list[str] = field(default_factory=list)
    """As on the job's command line; `{stage}` is that stage's directory, `{self}` this one's."""
    config: dict[str, Any] = field(default_factory=dict)
    """Nested keys merged over the composed config after the overrides, as a YAML file would be (for lists
    of sources and multi-line instructions, which are awkward as overrides); `{stage}` refs work in its
    strings, and an unknown key is an error naming it."""

    def __post_init__(self) -> None:
        if self.job not in STAGE_JOBS:
            raise ValueError(f"pipeline stage {self.name!r}: job={self.job!r}, use one of {', '.join(STAGE_JOBS)}")


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    """The pipeline's name (titles, pipeline.json)."""
    output: str | None = None
    """Directory holding one sub-directory per stage; None uses Hydra's run directory."""
    stages: list[StageConfig] = field(default_factory=list)
    """The stages, in the order they run (a recipe: conf/recipe/)."""
    resume: bool = True
    """Skip stages whose lineage.json says done (re-running a stopped pipeline continues it)."""
    only: list[str] = field(default_factory=list)
    """Run only these stages (the others keep their directories for `{name}` references)."""
    overrides: dict[str, list[str]] = field(default_factory=dict)
    """Overrides appended to every stage of a job, after the stage's own (so they win), e.g.
    `+pipeline.overrides.train=[trainer.max_steps=2]` or a data root for all train and mine stages."""

    def validate(self) -> None:
        names = [s.name for s in self.stages]
        if not names:
            raise ValueError("pipeline.stages is empty: pick a recipe (e.g. recipe=iterative) or list stages")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup or "self" in names:
            raise ValueError(f"pipeline.stages: stage names must be unique and not 'self', got {names}")
        unknown = [n for n in self.only if n not in names]
        if unknown:
            raise ValueError(f"pipeline.only names unknown stage(s) {unknown}: choose from {names}")
        unknown = sorted(set(self.overrides) - set(STAGE_JOBS))
        if unknown:
            raise ValueError(f"pipeline.overrides has unknown job(s) {unknown}: use {', '.join(STAGE_JOBS)}")
