"""Token gathering with autograd: x (B, N, D), idx (B, M) -> x[b, idx[b, m]] as a contiguous (B, M, D) buffer.

Used for the motion targets at the masked tokens and for any tensor on the gradient path. The backward scatters the
gradient back with fp32 accumulation (indices may repeat). Out-of-range indices read zeros in the Triton kernel
(checking them on the host would sync the device); the torch twin raises as torch.gather does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, next_power_of_2, require_triton, tl, triton


def check_token_idx(what: str, idx: Tensor, batch: int, device: torch.device, source: str) -> None:
    """Raise a clear error unless `idx` is a (batch, M) int64/int32 tensor of token indices on `device` (where the
    tensor named `source` lives). Shared by every kernel that takes token indices."""
    if not isinstance(idx, Tensor) or idx.ndim != 2 or idx.shape[0] != batch:
        raise ValueError(f"{what}: idx must be a (B, M) tensor with B = {batch}, got "
                         f"{tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what}: idx must be int64 or int32 token indices, got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"{what}: idx is on {idx.device} but {source} is on {device}")


def check_gather_args(x: Tensor, idx: Tensor) -> None:
    """Raise a clear error for a malformed `gather_tokens` call."""
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(f"gather_tokens: x must be (B, N, D), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    check_token_idx("gather_tokens", idx, x.shape[0], x.device, "x")


def gather_tokens_torch(x: Tensor, idx: Tensor) -> Tensor:
    """Reference twin (torch.gather, differentiable)."""
    check_gather_args(x, idx)
    return torch.gather(x, 1, idx.to(torch.int64).unsqueeze(-1).expand(-1, -1, x.shape[-1]))


if HAS_TRITON:

    @triton.jit
    def _token_rows(idx_ptr, num_rows, num_idx, num_tokens, dim, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        """Flat (b, m) rows of this program, their source rows b*N + idx and the tile masks."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < num_rows
        token = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        src_ok = row_ok & (token >= 0) & (token < num_tokens)
        src_rows = (rows // num_idx) * num_tokens + token
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        return rows, src_rows, cols, row_ok[:, None] & col_ok[None, :], src_ok[:, None] & col_ok[None, :]

    @triton.jit
    def _gather_rows_kernel(src_ptr, idx_ptr, dst_ptr, num_rows, num_idx, num_tokens, dim,
                            BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, src_rows, cols, dst_mask, src_mask = _token_rows(idx_ptr, num_rows, num_idx, num_tokens, dim,
                                                               BLOCK_ROWS, BLOCK_D)
        values = tl.load(src_ptr + src_rows[:, None] * dim + cols[None, :], mask=src_mask, other=0)
        tl.store(dst_ptr + rows[:, None] * dim + cols[None, :], values, mask=dst_mask)

    @triton.jit
    def _scatter_add_rows_kernel(grad_out_ptr, idx_ptr, grad_src_ptr, num_rows, num_idx, num_tokens, dim,
                                 BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        rows, src_rows, cols, dst_mask, src_mask = _token_rows(idx_ptr, num_rows, num_idx, num_tokens, dim,
                                                               BLOCK_ROWS, BLOCK_D)
        grad = tl.load(grad_out_ptr + rows[:, None] * dim + cols[None, :], mask=src_mask, other=0.0)
        # relaxed: only the sums matter, not ordering with other memory, so the GPU can use fire-and-forget `red`
        tl.atomic_add(grad_src_ptr + src_rows[:, None] * dim + cols[None, :], grad.to(tl.float32), mask=src_mask,
                      sem="relaxed")


def _launch_rows(kernel, src: Tensor, idx: Tensor, dst: Tensor, num_tokens: int) -> None:
    batch, num_idx = idx.shape
    dim = src.shape[-1]
    num_rows = batch * num_idx
    if num_rows == 0 or dim == 0:
        return
    block_d = min(next_power_of_2(dim), 1024)
    block_rows = max(1, min(next_power_of_2(num_rows), 4096 // block_d))
    kernel[(triton.cdiv(num_rows, block_rows), triton.cdiv(dim, block_d))](
        src, idx, dst, num_rows, num_idx, num_tokens, dim, BLOCK_ROWS=block_rows, BLOCK_D=block_d)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor) -> Tensor:
        x = x.contiguous()
        idx = idx.contiguous()
        out = torch.empty(x.shape[0], idx.shape[1], x.shape[2], dtype=x.dtype, device=x.device)
        _launch_rows(_gather_rows_kernel, x, idx, out, x.shape[1])
        ctx.save_for_backward(idx)
        ctx.source_shape = x.shape
        ctx.source_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        (idx,) = ctx.saved_tensors
        grad_src = torch.zeros(ctx.source_shape, dtype=torch.float32, device=grad_out.device)
        _launch_rows(_scatter_add_rows_kernel, grad_out.contiguous(), idx, grad_src, ctx.source_shape[1])
        return grad_src.to(ctx.source_dtype), None


def gather_tokens_triton(x: Tensor, idx: Tensor) -> Tensor:
    """Triton twin of `gather_tokens_torch`, differentiable in x."""
    check_gather_args(x, idx)
    require_triton(x.device, "gather_tokens")
    return _GatherTokens.apply(x, idx)
