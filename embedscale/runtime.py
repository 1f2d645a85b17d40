"""What every job does around its work: its run directory, seeds and threads (`start_run`), the console it writes
to, and the third-party noise it keeps out.

A training job's output is read in two places: a terminal (a live progress bar is right there) and a file
(`> train.log`, SLURM's `slurm-%j.out`), where a bar that redraws itself with carriage returns shows
nothing until the epoch ends and then a smear of control characters. `console_is_terminal()` decides
which one this process writes to; the training job picks a progress bar or plain progress lines from it
(`trainer.progress`, contrastive/monitor.py), and `quiet_third_party_output` turns the progress bars of
transformers, huggingface_hub and our own encoders off in files.

Messages are printed once: Lightning installs its own console handler on its loggers when it is imported
before any logging is configured, and Hydra later adds one to the root logger, so every Lightning message
came out twice (`INFO: ...` and `[time][lightning...][INFO] - ...`). Once the root logger has a handler,
Lightning's are removed and its records go to the root's handlers like everyone else's.

Two messages that say nothing about the user's run are filtered by their exact text: DeepSpeed's "Setting
accelerator to CPU ... unable to detect it" (printed whenever any library imports deepspeed on a machine
without a GPU, e.g. accelerate while transformers saves a model, also in runs that never use DeepSpeed)
and Lightning's advertising tip.

Memory follows what the run holds, whatever the user's allocator settings (`tune_allocator`): glibc's malloc raises
its mmap threshold each time a large block is freed, after which every block of that size comes from the heap and
stays resident when freed. A GradCache step allocates and frees chunk-sized activations hundreds of times, so peak
RSS grew ~30% beyond the live tensors (bench/results/gradcache_memory_live.json's note) unless the user knew to set
MALLOC_MMAP_THRESHOLD_. Every job now pins the threshold at 1 MiB at start-up (bench/scale_rehearsal.py measures it).
That costs kernel time: each large block is faulted in and zeroed again on every step, which on CPU training with a
real model is a large share of the step (bench/results/step_allocator_*.json); trainer.host_allocator=reuse keeps
freed memory in the process instead (faster steps, a larger resident set).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


_DEEPSPEED_NO_GPU = _DropMessages("we were unable to detect it")
_LIGHTNING_ADS = _DropMessages("Tip: For seamless cloud")
# the loggers Lightning's rank_zero_info/warn write through (lightning/{pytorch,fabric}/utilities/rank_zero.py)
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def console_is_terminal() -> bool:
    """True when both stdout and stderr are terminals (a person watches); False for files and pipes."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def quiet_third_party_output(*, terminal: bool | None = None) -> None:
    """Filter the two messages above and, when the console is not a terminal, third-party progress bars.
    Idempotent; call it at the start of a job (after Hydra configured logging)."""
    terminal = console_is_terminal() if terminal is None else terminal
    deepspeed = logging.getLogger("DeepSpeed")  # deepspeed.utils.logging's logger, created on its import
    if _DEEPSPEED_NO_GPU not in deepspeed.filters:
        deepspeed.addFilter(_DEEPSPEED_NO_GPU)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    route_lightning_to_root()
    if not terminal:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass


def route_lightning_to_root() -> None:
    """Each Lightning message once: when the root logger has a handler (Hydra's), drop the console handlers
    Lightning installed on its own loggers and let their records propagate to the root."""
    root = logging.getLogger()
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _LIGHTNING_ADS not in logger.filters:
            logger.addFilter(_LIGHTNING_ADS)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not root.handlers:
            continue
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def exit_with_parent() -> bool:
    """Have the kernel end this process when its launcher dies: a torchrun worker, or a rank Lightning started,
    must not keep training as an orphan. Linux only; True when armed.

    SIGKILL, not SIGTERM: Lightning answers SIGTERM with a broadcast from inside its signal handler, which pairs
    with whatever collective the other ranks are in and hangs (measured: workers still running 6 s after their
    torchrun agent was killed). Nothing is lost that a graceful stop would keep: the run's last checkpoint is on
    disk, and checkpoints and exports are written atomically."""
    launched = bool(os.environ.get("TORCHELASTIC_RUN_ID")) or (
        int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 and not os.environ.get("SLURM_JOB_ID")
    )
    if not launched or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the guard was armed
        raise SystemExit("the launcher of this rank is gone: exiting instead of training as an orphan")
    return True


MMAP_THRESHOLD_BYTES = 1 << 20
"""Blocks from this size up are mmap'ed and go back to the OS when freed (glibc M_MMAP_THRESHOLD)."""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_M_TRIM_THRESHOLD = -1
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: a free heap top below 2 GiB is never given back


def tune_allocator(mode: str = "lean", *, threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> str:
    """Set how glibc's malloc hands freed host memory back (trainer.host_allocator); returns what was done.

    lean: pin the mmap threshold at `threshold_bytes`, so that freed large blocks leave the resident set at once
    (memory follows the live tensors; every new large block is faulted in and zeroed: kernel time on each step).
    reuse: never mmap, and keep a free heap top below 2 GiB, so that freed blocks serve the next step from warm pages
    (almost no page faults once the first step reached its high-water mark, which the process then keeps,
    fragmentation included).
    glibc: change nothing.

    Left alone when the user set MALLOC_MMAP_THRESHOLD_ (glibc read it at start-up), when EMBEDSCALE_MALLOC=default
    asks for glibc's own behaviour (how bench/scale_rehearsal.py measures the difference), and off glibc (macOS,
    musl), where nothing is changed.
    """
    import ctypes

    from embedscale.config.choices import HostAllocator

    if mode not in set(HostAllocator):
        raise ValueError(f"trainer.host_allocator={mode!r}: choose one of {', '.join(HostAllocator)}")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} (environment)"
    if os.environ.get("EMBEDSCALE_MALLOC", "").lower() == "default":
        return "glibc default (EMBEDSCALE_MALLOC=default)"
    if mode == "glibc":
        return "glibc default (trainer.host_allocator=glibc)"
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname (ctypes.util.find_library would run ldconfig)
        libc.gnu_get_libc_version  # noqa: B018  AttributeError off glibc
    except (OSError, AttributeError):
        return "unchanged (not glibc)"
    if mode == "reuse":
        if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) != 1:
            return "unchanged (mallopt refused)"
        return "reuse: no mmap, heap kept"
    if libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)) != 1:
        return "unchanged (mallopt refused)"
    return f"mmap threshold {threshold_bytes} B"


def start_run(run_dir: Path, *, seed: int, num_threads: int | None, allocator: str = "lean") -> Path:
    """What every training job does first: create the run directory (resolved), set torch's threads, seed
    Python, numpy and torch (also in DataLoader workers), set the allocator (`tune_allocator(allocator)`) and quiet
    the third-party output."""
    import lightning as L
    import torch

    quiet_third_party_output()  # after Hydra configured logging and Lightning was imported: each message once
    exit_with_parent()
    logging.getLogger(__name__).info("host allocator: %s", tune_allocator(allocator))
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if num_threads:
        torch.set_num_threads(num_threads)
    L.seed_everything(seed, workers=True)
    return run_dir


def check_run_dir(run_dir: Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse (ValueError) to train into a run directory that already holds a run -- its checkpoints/last.ckpt would
    be overwritten without a word and model/ would mix two runs -- unless the run is being resumed or the user set
    overwrite=true. With overwrite=true the previous run's outputs (checkpoints/*.ckpt, model/, metrics.json) are
    removed first, named in the log, so that nothing of it mixes with the new run; other files are left alone."""
    if resume is not None:
        return
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    held = [
        name
        for name, present in (
            ("checkpoints/", bool(checkpoints)),
            ("model/", (run_dir / "model").exists()),
            ("metrics.json", (run_dir / "metrics.json").exists()),
        )
        if present
    ]
    if not held:
        return
    if not overwrite:
        raise ValueError(
            f"run_dir={run_dir} already holds a training run ({', '.join(held)}): continue it with "
            "trainer.resume=last, choose another run_dir, or set overwrite=true to replace its checkpoints and export"
        )
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) != 0:
        return  # rank 0 clears; a relaunched rank finds nothing or the same
    import shutil

    logging.getLogger(__name__).warning(
        "overwrite=true: removing the previous run's %s in %s", ", ".join(held), run_dir
    )
    for ckpt in checkpoints:  # a file, or a directory of shards (fsdp2, deepspeed)
        shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    (run_dir / "metrics.json").unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """Where embedscale keeps its caches (embeddings, dataset verification): $EMBEDSCALE_CACHE or
    ~/.cache/embedscale."""
    return Path(os.environ.get("EMBEDSCALE_CACHE", "~/.cache/embedscale")).expanduser()
