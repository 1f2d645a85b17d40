"""What a checkpoint of `embedscale train` is, whatever strategy wrote it: its kind, the resume check, its weights.

Three layouts exist:

    kind        written by                 on disk (checkpoints/last.ckpt, best.ckpt)
    file        one process, ddp           one torch.save file
    fsdp2       trainer.strategy=fsdp2     a directory: every rank's shard of the weights and optimizer state in
                                           torch.distributed.checkpoint's format (.metadata, __<rank>_0.distcp) and
                                           meta.pt (Lightning's loop, callbacks, our strategy tag; rank 0)
    deepspeed   trainer.strategy=deepspeed a directory of per-rank ZeRO partitions + embedscale.json (the stage)

An FSDP2 run saves its shards in parallel and never gathers the full state on one rank (the memory FSDP exists to
save); it resumes under fsdp2 at any world size (torch.distributed.checkpoint reshards). `read_model_state` gives
the unsharded model weights of a file or fsdp2 checkpoint on one process, for export_best and mine.checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINT_META = "embedscale.json"
"""Written into every DeepSpeed checkpoint directory: {"strategy": "deepspeed", "zero_stage": 2|3}."""
DCP_METADATA = ".metadata"
"""torch.distributed.checkpoint's index of a sharded checkpoint directory."""


def checkpoint_meta(path: str | Path) -> dict | None:
    """The strategy record of a checkpoint: {"strategy": "file"} for a one-file checkpoint, {"strategy": "fsdp2"}
    for a sharded FSDP2 directory, {"strategy": "deepspeed", "zero_stage": ...} for a DeepSpeed directory (None
    when such a directory has no record)."""
    path = Path(path)
    if not path.is_dir():
        return {"strategy": "file"}
    if (path / DCP_METADATA).is_file():
        return {"strategy": "fsdp2"}
    meta = path / CHECKPOINT_META
    return json.loads(meta.read_text()) if meta.is_file() else None


def _describe(meta: dict | None) -> str:
    if meta is None:
        return "deepspeed (a checkpoint directory)"
    if meta["strategy"] == "file":
        return "a one-file checkpoint (one process, ddp)"
    if meta["strategy"] == "fsdp2":
        return "fsdp2 (a sharded checkpoint directory)"
    return f"deepspeed with trainer.zero_stage={meta.get('zero_stage')}"


def check_resume_path(cfg, checkpoint: str) -> None:
    """Raise ValueError when `checkpoint` (trainer.resume) was written under another strategy than `cfg` (a
    TrainerConfig) trains with, before anything reads it. A one-file checkpoint's own record is checked by the step
    driver when it loads (ddp vs an older consolidated fsdp2 file)."""
    meta = checkpoint_meta(checkpoint)
    strategy = str(cfg.strategy)
    if strategy == "deepspeed":
        if meta is None or (meta["strategy"] == "deepspeed" and meta.get("zero_stage") == cfg.zero_stage):
            return  # ours, or a DeepSpeed directory written without our record: let DeepSpeed read it
        now = f"deepspeed with trainer.zero_stage={cfg.zero_stage}"
    elif strategy == "fsdp2":
        if meta is not None and meta["strategy"] in ("file", "fsdp2"):
            return
        now = "trainer.strategy=fsdp2"
    else:
        if meta is not None and meta["strategy"] == "file":
            return
        now = f"trainer.strategy={strategy}"
    raise ValueError(
        f"trainer.resume={checkpoint}: the checkpoint was written under {_describe(meta)} and this run uses {now}; "
        "the optimizer state does not carry over between them: resume with the trainer.strategy (and "
        "trainer.zero_stage) that wrote it"
    )


def read_model_state(path: str | Path) -> dict:
    """The full model state dict ({"encoder.query_backbone...": tensor, ...}) of a one-file or sharded FSDP2
    checkpoint, read on one process without unpickling anything but tensors and plain containers. Raises ValueError
    for a DeepSpeed directory (convert it with DeepSpeed's zero_to_fp32.py) or anything else."""
    import pickle
    import tempfile

    import torch

    path = Path(path)
    meta = checkpoint_meta(path)
    if meta is not None and meta["strategy"] == "file":
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    if meta is None or meta["strategy"] != "fsdp2":
        raise ValueError(
            f"{path} is a DeepSpeed checkpoint directory: convert it to one file first with the zero_to_fp32.py "
            "script DeepSpeed writes into it, or give the run's exported model/ directory"
        )
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")  # reads every rank's shard on this one process
        try:
            state = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{path} holds objects other than tensors and plain containers: refused") from err
    return state["state_dict"]
