"""Property tests of the config vocabulary: any value a user can type for any numeric key of `embedscale train`
is either refused when the config is composed, with a ValueError naming the key, or trains -- two steps of a tiny
model -- to finite weights (or stops at the first non-finite step, naming it). Never a traceback from deep inside
torch or Lightning, never a silent NaN.

Hypothesis draws the key from the schema itself (config/docs.rows: every scalar int or float field of TrainConfig,
so a field added later is covered without editing this file) and the value from a mix of edge cases (0, -1, huge,
NaN, +-inf, subnormal) and ordinary numbers. The draws are derandomised so CI sees the same examples every run;
`EMBEDSCALE_HYPOTHESIS_EXAMPLES=N` asks for more, locally.

    fast tier   the value set on the composed config and validated (to_config), every key, 400 examples
    slow tier   the value as a command-line override through Hydra and, when accepted, 2 training steps
                in-process (export included), 150 examples
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re

import pytest
from helpers import compose_train, tiny_overrides
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from embedscale.config import TrainConfig, to_config
from embedscale.config.docs import rows
from embedscale.contrastive.guard import NonFiniteError

# Keys this test may not vary: they start processes or span machines (covered by test_faults and the SLURM tests),
# or change the test process itself (torch's thread count).
NOT_VARIED = {"trainer.num_nodes", "data.num_workers", "trainer.num_threads"}


def numeric_keys() -> dict[str, str]:
    """{key: 'int' or 'float'} for every scalar numeric field of TrainConfig."""
    out = {}
    for key, type_name, _, _ in rows(TrainConfig):
        kinds = {t.strip() for t in type_name.split("|")}
        if "[]" in key or key in NOT_VARIED or kinds - {"int", "float", "null"}:
            continue
        if kinds & {"int", "float"}:
            out[key] = "float" if "float" in kinds else "int"
    return out


KEYS = numeric_keys()
NAMES_A_KEY = re.compile(r"\b(model|data|loss|optim|trainer|eval|gradcache)\.[a-z_]+|\bseed=")
EDGE_INTS = [0, 1, -1, 2, 3, 7, 64, 2**31, 2**32, 2**63 - 1, -(2**63)]
EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e300, -1e300, math.inf, -math.inf, math.nan, 1e-8, 1e8]


def value_for(kind: str) -> st.SearchStrategy:
    if kind == "int":
        return st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**40), 2**40), st.integers(-5, 100))
    return st.one_of(
        st.sampled_from(EDGE_FLOATS),
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(-10, 10),
    )


def as_override(key: str, value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return f"{key}=nan"
    if isinstance(value, float) and math.isinf(value):
        return f"{key}={'inf' if value > 0 else '-inf'}"
    return f"{key}={value!r}"


DRAW = st.sampled_from(sorted(KEYS)).flatmap(lambda key: st.tuples(st.just(key), value_for(KEYS[key])))


def _examples(default: int) -> int:
    return int(os.environ.get("EMBEDSCALE_HYPOTHESIS_EXAMPLES", default))


def _refused_by_name(err: Exception, key: str, value) -> None:
    text = f"{err} {err.__cause__ or ''}"
    assert key in text or key.rsplit(".", 1)[-1] in text, (
        f"{as_override(key, value)} was refused without naming it: {text}"
    )


def _compose(base: list[str], key: str, value):
    """The config composed from command-line overrides, or None after checking that the refusal names the key."""
    try:
        return compose_train([*base, as_override(key, value)])
    except (ValueError, ConfigCompositionException) as err:
        _refused_by_name(err, key, value)
        return None


@functools.cache
def _composed_default():
    from hydra import compose, initialize_config_dir

    from embedscale.config import register_configs
    from embedscale.jobs.launch import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=["eval=none"])


def _base(tiny_bert, tiny_data, tmp_path) -> list[str]:
    return [
        *(o for o in tiny_overrides(tiny_bert, tiny_data, tmp_path) if not o.startswith(("eval.", "trainer.max_"))),
        "eval=none",
        "logger=none",
        "trainer.progress=off",
        "overwrite=true",
        f"run_dir={tmp_path / 'run'}",
    ]


def test_the_schema_has_numeric_keys_to_draw():
    assert len(KEYS) >= 40, sorted(KEYS)  # every scalar numeric field of train: a broken enumeration fails here
    assert {"optim.lr", "loss.temperature", "trainer.collective_timeout", "seed"} <= set(KEYS)


@settings(
    max_examples=_examples(400),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(draw=DRAW)
def test_any_numeric_value_is_refused_by_key_or_validates(draw):
    key, value = draw
    raw = copy.deepcopy(_composed_default())
    try:
        OmegaConf.update(raw, key, value, merge=True)
        to_config(raw, TrainConfig)
    except (ValueError, ValidationError) as err:
        _refused_by_name(err, key, value)
        event("refused, naming the key")
        return
    event("accepted")
    if isinstance(value, float) and not math.isfinite(value):
        pytest.fail(f"{as_override(key, value)} was accepted: a non-finite value must be refused")


@pytest.mark.slow  # 150 tiny trainings in-process (~70 s)
@settings(
    max_examples=_examples(150),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(draw=DRAW)
def test_any_accepted_value_trains_to_finite_weights_or_stops_by_name(tiny_bert, tiny_data, tmp_path, draw):
    import torch

    from embedscale.jobs.train import run

    key, value = draw
    base = _base(tiny_bert, tiny_data, tmp_path)
    if key != "trainer.max_steps":  # 2 steps, whatever max_epochs says
        base.append("trainer.max_steps=2")
    if key == "trainer.max_steps":
        base.append("trainer.max_epochs=1")
    cfg = _compose(base, key, value)
    if cfg is None:
        event("refused at compose, naming the key")
        return
    try:
        result = run(cfg)
    except NonFiniteError as err:  # diverged: stopped at the first non-finite step, which the message names
        assert "step" in str(err), err
        event("stopped at a non-finite step")
        return
    except ValueError as err:  # refused once the data or the model is known: the message names a key
        assert NAMES_A_KEY.search(str(err)), f"{as_override(key, value)} refused without naming a key: {err}"
        event("refused at run start, naming a key")
        return
    from safetensors.torch import load_file

    weights = sorted((tmp_path / "run" / "model").rglob("*.safetensors"))
    assert weights, f"{as_override(key, value)}: trained without exporting ({sorted(result)})"
    for path in weights:
        for name, tensor in load_file(path).items():
            assert torch.isfinite(tensor).all(), f"{as_override(key, value)} exported non-finite {name}"
    event("trained and exported finite weights")
