"""The only place with explicit torch.distributed calls: all-gathers with and without gradient.

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
        return out_NX

    @staticmethod
    def backward(ctx, grad_NX: torch.Tensor) -> torch.Tensor:
        _, size = world()
        grad_bX = grad_NX.new_empty((grad_NX.shape[0] // size, *grad_NX.shape[1:]))
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(grad_bX, grad_NX.contiguous())
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
    return torch.cat(parts, dim=0)


def _is_dtensor(x: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


@torch.no_grad()
def clip_grad_norm_sharded_(params, max_norm: float) -> torch.Tensor:
    """Clip the gradients of `params` in place to a total 2-norm of `max_norm`; returns the total norm.

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
