"""The only place with explicit torch.distributed calls: process-group helpers and every collective.

- process group: `world()` (rank, size), `init_from_env()` (join what torchrun/srun describe), `barrier()`,
  `broadcast_object()`;
- gathers: `all_gather_with_grad` (training: gradient flows back to each rank), `all_gather_no_grad` (ids,
  metrics), `gather_rows` (rows of a sharded encoding, different counts per rank), `gather_objects` (picklable
  results of different sizes per rank, e.g. generated texts);
- gradients: `all_reduce_gradients_` (one flat average per step) and `clip_grad_norm_sharded_` (the global norm
  over sharded and replicated gradients), which the strategies of embedscale/strategy/ call.

Why gather *with* gradient and score only local rows (docs/training.md, DESIGN.md): rank r's loss is
the mean over its b queries; summed over ranks that is W x the global mean. The gather's backward is
a reduce-scatter with SUM, so each rank receives the gradient of that sum for its own embeddings,
and DDP's gradient average divides by W: the result is exactly the one-process gradient of the
global mean. No "loss x W" factor is needed (that belongs to the no-grad-gather pattern).

Every gather first checks that all ranks hold the same shape: a mismatched all_gather does not fail,
it hangs until the process-group timeout.

Legend: b = rows on this rank, W = world size, N = W * b.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> None:
    """Join the process group torchrun/srun describe in the environment (WORLD_SIZE > 1), once:
    NCCL on GPUs (device = LOCAL_RANK), gloo on CPUs. A single process stays without one.

    Two exit-time traps are avoided here. Importing torch.distributed.fsdp/.checkpoint (Lightning and
    transformers' model classes do) while a gloo group exists takes C++ references to the group, so
    destroy_process_group cannot free it; they are imported first. And the group is destroyed at exit
    while the interpreter is alive: gloo worker threads still running during finalisation take the GIL
    and abort the process ("terminate called without an active exception"), seen on CI.
    """
    import atexit
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def backend() -> str:
    """The process group's backend (gloo, nccl), or "none" without one."""
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def destroy() -> None:
    """Leave the process group (all ranks), if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def allgather_bandwidth(device: torch.device, *, megabytes: int = 16, iters: int = 5) -> float:
    """All-gather bus bandwidth in GB/s ((W-1)/W x gathered bytes / time), 0 for one process."""
    import time

    _, size = world()
    if size == 1:
        return 0.0
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_gather(out, x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    return (size - 1) / size * size * x.numel() * 4 / seconds / 1e9


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is true on at least one (one small all-reduce; no collective on one rank)."""
    _, size = world()
    if size == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device or torch.device("cpu"))
    if backend() == "nccl" and t.device.type != "cuda":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: int, device: torch.device | None = None) -> int:
    """The largest `value` over all ranks (one small all-reduce; `value` itself on one rank): e.g. the common
    token width that every rank pads its token matrices to before a gather."""
    _, size = world()
    if size == 1:
        return int(value)
    t = torch.tensor([float(value)], device=device or torch.device("cpu"))
    if backend() == "nccl" and t.device.type != "cuda":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


HEARTBEAT = "embedscale/step/{rank}"


def _store():
    """The default process group's key-value store (torchrun's / Lightning's TCPStore), or None."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no group, or a store this torch does not expose
        return None


def heartbeat(step: int) -> None:
    """Record in the store that this rank finished `step` (one small write; read back by `explain_stall`)."""
    rank, size = world()
    store = _store() if size > 1 else None
    if store is not None:
        store.set(HEARTBEAT.format(rank=rank), str(step))


def explain_stall(err: BaseException, *, timeout: float, grace: float = 3.0) -> BaseException:
    """A collective that timed out -> a RuntimeError naming the rank(s) that stopped responding. Every rank whose
    collective timed out marks so in the store and waits `grace` seconds for the others' marks: a rank that never
    marks is not waiting in the collective -- it is the one that stalled. Any other error is returned unchanged."""
    import time

    text = str(err).lower()
    if not any(word in text for word in ("timed out", "timeout", "time out")):
        return err
    rank, size = world()
    store = _store()

    def read(key: str) -> str | None:
        try:
            return store.get(key).decode() if store is not None and store.check([key]) else None
        except Exception:  # the store itself is gone (its host rank died)
            return None

    if store is not None:
        try:
            store.set(f"embedscale/timedout/{rank}", "1")
        except Exception:
            store = None
    deadline = time.monotonic() + grace
    waiting = {rank}
    while time.monotonic() < deadline and len(waiting) < size:
        waiting = {r for r in range(size) if read(f"embedscale/timedout/{r}")} | {rank}
        time.sleep(0.2)
    stalled = sorted(set(range(size)) - waiting)
    steps = {r: read(HEARTBEAT.format(rank=r)) for r in range(size)}
    who = (
        f"rank(s) {stalled} stopped responding (never reached the collective the others waited in; last finished "
        f"step by rank: {steps})"
        if stalled
        else f"every rank waited: the process group itself broke (last finished step by rank: {steps})"
    )
    return RuntimeError(
        f"rank {rank}: a collective waited trainer.collective_timeout={timeout:g} s and gave up: {who}. A stalled "
        "rank (a hung data loader, a full disk, a debugger, an overloaded node) blocks the others; raise "
        f"trainer.collective_timeout if its steps are just slow. The backend said: {str(err).splitlines()[0][:300]}"
    )


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (results computed once, e.g. metrics)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable; any size), in rank order, on every rank; [obj] without a process group."""
    _, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(local_nD: torch.Tensor, positions_n: torch.Tensor, total: int) -> torch.Tensor:
    """Rows computed on every rank -> the full (total, D) matrix on every rank.

    Rank r holds rows `positions_n` (its share of a corpus) in `local_nD`; ranks may hold different
    counts. A gather of padded tensors (gloo and NCCL both need equal shapes), then a scatter by position.
    No gradient: this serves encoding for search, not training (that is all_gather_with_grad).
    """
    rank, size = world()
    if size == 1:
        out = torch.empty(total, local_nD.shape[1], dtype=local_nD.dtype)
        out[positions_n] = local_nD
        return out
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([local_nD.shape[0]], dtype=torch.int64, device=dev))
    widest = int(max(c.item() for c in counts))
    dim = torch.tensor([local_nD.shape[1] if local_nD.numel() else 0], dtype=torch.int64, device=dev)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    d = int(dim.item())
    pad_nD = torch.zeros(widest, d, dtype=torch.float32, device=dev)
    pad_n = torch.full((widest,), -1, dtype=torch.int64, device=dev)
    if local_nD.shape[0]:  # a rank can have no rows (fewer batches than ranks): (0, 0) from encode_texts
        pad_nD[: local_nD.shape[0]] = local_nD.float().to(dev)
    pad_n[: positions_n.shape[0]] = positions_n.to(dev)
    rows = [torch.empty_like(pad_nD) for _ in range(size)]
    pos = [torch.empty_like(pad_n) for _ in range(size)]
    dist.all_gather(rows, pad_nD)
    dist.all_gather(pos, pad_n)
    out = torch.empty(total, d, dtype=torch.float32)
    for r_nD, p_n, c in zip(rows, pos, counts, strict=True):
        c = int(c.item())
        out[p_n[:c].cpu()] = r_nD[:c].cpu()
    return out


def check_same_shape(x: torch.Tensor, name: str = "tensor") -> None:
    """Raise on every rank if the ranks disagree on x's shape (instead of hanging in the gather)."""
    _, size = world()
    shape = torch.tensor([x.dim(), *x.shape, *[0] * (8 - x.dim())], dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(size)]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        found = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in shapes]
        raise RuntimeError(
            f"all-gather of {name}: ranks hold different shapes {found}; every rank must take equal-shaped "
            "batches (drop or pad the last batch)"
        )


def _collective(new: str, old: str):
    """torch >= 2.13 names the tensor collectives *_single; older releases call them *_tensor."""
    return getattr(dist, new, None) or getattr(dist, old)


_TRAFFIC = {"gathered": 0, "reduce_scattered": 0}


def traffic_bytes() -> dict[str, int]:
    """Bytes this rank has received from the other ranks since the process began: `gathered` by the all-gathers
    of this module (forward), `reduce_scattered` by the gradient reduce-scatters (backward). The training step
    logs their increase per step (train/gathered_MiB, train/reduce_scattered_MiB)."""
    return dict(_TRAFFIC)


def _count(kind: str, out: torch.Tensor) -> None:
    """Add what a collective that produced `out` received from the other ranks (all but this rank's share)."""
    _, size = world()
    _TRAFFIC[kind] += out.numel() * out.element_size() * (size - 1) // size


class _GatherWithGrad(torch.autograd.Function):
    """all-gather along dim 0 whose backward is a reduce-scatter with SUM (gloo and NCCL alike).

    Written here rather than taken from torch: `_functional_collectives.all_gather_tensor_autograd`
    (and its successor `all_gather_single_autograd`) on gloo made ~1 in 7 processes abort at exit
    ("terminate called without an active exception") on this repo's 2-core CI machine, and
    `torch.distributed.nn.functional.all_gather` is deprecated. This one uses only the plain
    collectives; tests/test_distributed.py proves its gradient exact against one process.
    """

    @staticmethod
    def forward(ctx, x_bX: torch.Tensor) -> torch.Tensor:
        _, size = world()
        out_NX = x_bX.new_empty((size * x_bX.shape[0], *x_bX.shape[1:]))
        _collective("all_gather_single", "all_gather_into_tensor")(out_NX, x_bX.contiguous())
        _count("gathered", out_NX)
        return out_NX

    @staticmethod
    def backward(ctx, grad_NX: torch.Tensor) -> torch.Tensor:
        _, size = world()
        grad_bX = grad_NX.new_empty((grad_NX.shape[0] // size, *grad_NX.shape[1:]))
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(grad_bX, grad_NX.contiguous())
        _count("reduce_scattered", grad_NX)
        return grad_bX


def all_gather_with_grad(x_bX: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """Concatenate every rank's x along dim 0 -> (N, ...), with the gradient flowing back to each rank."""
    _, size = world()
    if size == 1:
        return x_bX
    check_same_shape(x_bX, name)
    return _GatherWithGrad.apply(x_bX)


@torch.no_grad()
def all_gather_no_grad(x_bX: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """Concatenate every rank's x along dim 0 -> (N, ...), without gradient (ids, metrics)."""
    _, size = world()
    if size == 1:
        return x_bX
    check_same_shape(x_bX, name)
    parts = [torch.empty_like(x_bX) for _ in range(size)]
    dist.all_gather(parts, x_bX.contiguous())
    out_NX = torch.cat(parts, dim=0)
    _count("gathered", out_NX)
    return out_NX


def _is_dtensor(x: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


@torch.no_grad()
def clip_grad_norm_sharded_(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `params` in place to a total 2-norm of `max_norm` (0: leave them); returns the norm.

    For a mix of FSDP2-sharded (DTensor) gradients and replicated plain ones (the temperature): the squares of
    the local shards are summed over ranks in one all-reduce, the replicated gradients counted once. Same
    formula as torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), clamped at 1).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g.to_local() for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    device = (sharded or plain)[0].device
    sq_sharded = torch.zeros((), dtype=torch.float64, device=device)
    for g in sharded:
        sq_sharded += g.double().pow(2).sum()
    if world()[1] > 1 and sharded:
        dist.all_reduce(sq_sharded)
    sq_plain = sum((g.double().pow(2).sum() for g in plain), torch.zeros((), dtype=torch.float64, device=device))
    total = (sq_sharded + sq_plain).sqrt()
    if not max_norm:
        return total
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


@torch.no_grad()
def all_reduce_gradients_(params) -> None:
    """Average the gradients of `params` over ranks in one flat all-reduce per dtype (in place).

    Used by GradCache, whose several backward passes per step run outside DDP's reducer: one explicit
    reduction per step is exact, never mistimed, and works for any subset of used parameters
    (a missing gradient counts as zero, so every rank reduces identically shaped buffers).
    """
    _, size = world()
    if size == 1:
        return
    params = [p for p in params if p.requires_grad and not _is_dtensor(p)]  # FSDP2 reduced those already
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        check_same_shape(flat, "flattened gradients")
        dist.all_reduce(flat)
        flat /= size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
