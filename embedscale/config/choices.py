"""Every choice a config key offers, as one vocabulary: a `StrEnum` per choice.

A key whose values are Python names (`model.pooling=mean`) is typed by its enum, so OmegaConf refuses a typo at
compose time naming the full key. A few vocabularies hold values that are not Python names or that YAML reads
as booleans (`trainer.precision=bf16-mixed`, `trainer.requeue_on_signal=true`): those keys are typed `str` and
`parse_choice` turns them into the enum in `__post_init__`, with the same kind of error. Either way the running
code sees enum members, which compare equal to their strings.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar

E = TypeVar("E", bound=enum.Enum)


def parse_choice(enum_type: type[E], value: Any, key: str) -> E:
    """`value` as a member of `enum_type` (by value; YAML's booleans as 'true'/'false'), else a ValueError naming
    `key` and the choices."""
    if isinstance(value, enum_type):
        return value
    # OmegaConf stores YAML's true/false in a `str` field as "True"/"False": both spellings mean the boolean
    text = str(value).lower() if isinstance(value, bool) or value in ("True", "False") else str(value)
    try:
        return enum_type(text)
    except ValueError:
        choices = ", ".join(m.value for m in enum_type)
        raise ValueError(f"{key}={value!r}: use one of {choices}") from None


@functools.cache
def _enum_fields(cls: type) -> dict[str, type[enum.Enum]]:
    """{field: its enum type} of a config dataclass: a field typed by an enum (also `E | None`, `list[E]`), or a
    `str` field whose metadata names its vocabulary (`field(metadata={"choices": E})`)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if "choices" in f.metadata:
            out[f.name] = f.metadata["choices"]
            continue
        candidates = [hints[f.name]]
        while candidates:
            t = candidates.pop()
            if isinstance(t, type) and issubclass(t, enum.Enum):
                out[f.name] = t
                break
            if isinstance(t, types.UnionType) or typing.get_origin(t) in (typing.Union, list):
                candidates.extend(typing.get_args(t))
    return out


def coerce_choices(obj: Any, section: str) -> None:
    """Turn every choice field of config dataclass `obj` into its enum member (from an enum, its value, or YAML's
    boolean), or raise a ValueError naming `<section>.<field>`. Called first in every `__post_init__`, so a config
    built from strings (Python, JSON of an export) holds enum members like one composed by Hydra."""
    for name, enum_type in _enum_fields(type(obj)).items():
        value = getattr(obj, name)
        key = f"{section}.{name}"
        if value is None:
            continue
        if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
            setattr(obj, name, [parse_choice(enum_type, v, key) for v in value])
        else:
            setattr(obj, name, parse_choice(enum_type, value, key))


class Pooling(enum.StrEnum):
    """How token states become one vector."""

    cls = "cls"
    mean = "mean"
    last_token = "last_token"
    weighted_mean = "weighted_mean"


class TorchDtype(enum.StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"


class PaddingSide(enum.StrEnum):
    left = "left"
    right = "right"


class DataFormat(enum.StrEnum):
    beir = "beir"
    jsonl = "jsonl"
    shards = "shards"
    corpus = "corpus"


class OnError(enum.StrEnum):
    raise_ = "raise"
    skip = "skip"


class Verify(enum.StrEnum):
    """data.verify: how a sharded dataset is checked against its manifest when opened (data/integrity.py)."""

    full = "full"
    size = "size"
    off = "off"


class MissingDocuments(enum.StrEnum):
    """eval.missing_documents: qrels judging documents the corpus lacks."""

    raise_ = "raise"
    warn = "warn"


class TeacherScores(enum.StrEnum):
    cross_encoder = "cross_encoder"
    retriever = "retriever"


class SourceLoss(enum.StrEnum):
    contrastive = "contrastive"
    cosent = "cosent"
    angle = "angle"
    mse = "mse"
    kl = "kl"


class PretrainTask(enum.StrEnum):
    ict = "ict"
    spans = "spans"
    mixed = "mixed"


class Scheduler(enum.StrEnum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class Strategy(enum.StrEnum):
    """trainer.strategy: Lightning's names we test, and our sharded strategies (embedscale/strategy/)."""

    auto = "auto"
    ddp = "ddp"
    ddp_spawn = "ddp_spawn"
    fsdp2 = "fsdp2"
    deepspeed = "deepspeed"


class Accelerator(enum.StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"


class Precision(enum.StrEnum):
    """trainer.precision (Lightning's names; typed `str`: they are not Python names)."""

    full = "32-true"
    full_short = "32"
    bf16_mixed = "bf16-mixed"
    fp16_mixed = "16-mixed"
    bf16_true = "bf16-true"
    double = "64-true"


class TriState(enum.StrEnum):
    """auto, or forced on/off (typed `str`: YAML reads true/false as booleans)."""

    auto = "auto"
    true = "true"
    false = "false"


class HostAllocator(enum.StrEnum):
    """How glibc's malloc treats the host memory a job frees (runtime.tune_allocator)."""

    lean = "lean"
    reuse = "reuse"
    glibc = "glibc"


class Progress(enum.StrEnum):
    auto = "auto"
    bar = "bar"
    lines = "lines"
    off = "off"


class LoggerName(enum.StrEnum):
    csv = "csv"
    tensorboard = "tensorboard"
    wandb = "wandb"


class WandbMode(enum.StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class ShardFormat(enum.StrEnum):
    """Inputs `embedscale shard` converts (and `embedscale mine` reads, with `shards`)."""

    jsonl = "jsonl"
    beir = "beir"
    tsv = "tsv"
    csv = "csv"
    hf = "hf"
    sts = "sts"


class MineFormat(enum.StrEnum):
    jsonl = "jsonl"
    beir = "beir"
    tsv = "tsv"
    csv = "csv"
    hf = "hf"
    shards = "shards"


class MineMethod(enum.StrEnum):
    dense = "dense"
    bm25 = "bm25"
    hybrid = "hybrid"


class MineSample(enum.StrEnum):
    top = "top"
    random = "random"


class IndexKind(enum.StrEnum):
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"
    ivfpq = "ivfpq"


class SweepPrecision(enum.StrEnum):
    fp32 = "fp32"
    int8 = "int8"
    binary = "binary"
    binary_rescore = "binary_rescore"
    binary_rescore_int8 = "binary_rescore_int8"


class OnnxQuantize(enum.StrEnum):
    """onnx.quantize: the ONNX files written besides the fp32 one."""

    none = "none"
    int8 = "int8"


class PlanStrategy(enum.StrEnum):
    ddp = "ddp"
    zero1 = "zero1"
    zero2 = "zero2"
    zero3 = "zero3"
    fsdp = "fsdp"


class ParamDtype(enum.StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
