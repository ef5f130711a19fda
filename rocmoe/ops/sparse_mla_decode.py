"""``sparse_mla_decode``: DeepSeek sparse attention decode over a latent KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rocmoe import registry, shape_log
from rocmoe.device import Device, launches_ahead_of_time
from rocmoe.ops._validate import FLOAT_DTYPES, check_int, check_out, check_tensor

__all__ = ["sparse_mla_decode", "SparseMlaProblem"]

OP = "sparse_mla_decode"


@dataclass(frozen=True)
class SparseMlaProblem:
    """Static facts of a decode call. ``extra_*`` are None without a second key set."""

    dtype: torch.dtype
    num_heads: int
    head_dim: int
    d_v: int
    block_size: int
    topk: int
    has_topk_length: bool
    has_sink: bool
    extra_block_size: int | None
    extra_topk: int | None


def _as_3d_cache(name: str, cache: torch.Tensor, dtype: torch.dtype, device: torch.device,
                 head_dim: int) -> torch.Tensor:
    check_tensor(name, cache, ndim=(3, 4), dtypes=(dtype,), device=device, contiguous=True)
    if cache.dim() == 4:
        if cache.shape[2] != 1:
            raise ValueError(f"{name} in the 4-D layout must be [num_blocks, block_size, 1, D] (one latent "
                             f"head), got {list(cache.shape)}")
        cache = cache.view(cache.shape[0], cache.shape[1], cache.shape[3])
    if cache.shape[2] != head_dim:
        raise ValueError(f"{name} must have head dim D={head_dim} (q's last dimension), got {list(cache.shape)}")
    if cache.shape[1] < 1:
        raise ValueError(f"{name} must have block_size >= 1, got {list(cache.shape)}")
    return cache


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    *,
    softmax_scale: float,
    d_v: int = 512,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_kv_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query's H heads over its selected latent-cache rows.

    Pseudo-code, per query ``t`` and head ``h`` (fp32 math)::

        keys  = [cache[i] for j, i in enumerate(indices[t]) if valid(i, j)]
              + [extra_cache[i] for the valid extra_indices[t]]      # one softmax
        s     = softmax_scale * (q[t, h] . key)       over every valid key (all D columns)
        lse   = logsumexp(s)                          # natural log
        out   = sum(softmax(s) * key[:d_v])           # V = the key's first d_v columns
        if attn_sink: out *= exp(lse) / (exp(lse) + exp(attn_sink[h]))   # lse unchanged
        no valid key: out = 0, lse = +inf

    An index is valid when ``0 <= i < num_blocks * block_size`` and its slot
    ``j < topk_length[t]``. Cache rows that are not selected are never read
    into the result, so NaN/garbage there cannot leak in.

    Args:
        q: [T, H, D] bfloat16 (float16 and float32 too), D = 576 (V3.2) or 512
            (V4); unit stride along D.
        kv_cache: [num_blocks, block_size, D] (or FlashMLA's
            [num_blocks, block_size, 1, D]) of q's dtype, contiguous.
        indices: [T, topk] int32 global slots ``block * block_size + offset``;
            -1 or out of range = no key.
        softmax_scale: the score scale, usually ``1 / sqrt(192)`` style.
        d_v: value width, <= D (default 512).
        topk_length: optional [T] int32, entries of ``indices`` that count.
        attn_sink: optional [H] float32 per-head sink logit.
        extra_kv_cache, extra_indices, extra_topk_length: a second key set
            (DeepSeek-V4's sliding window + compressed cache) in the same softmax.
        out: optional [T, H, d_v] buffer of q's dtype.
        lse_out: optional [T, H] float32 buffer.
        backend: backend name, comma list, or None (see :mod:`rocmoe.registry`).

    Returns:
        (out [T, H, d_v] q.dtype, lse [T, H] float32).
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, unit_last_stride=True)
    num_tokens, num_heads, head_dim = q.shape
    device = q.device
    if num_heads < 1:
        raise ValueError(f"q must have at least one head, got shape {list(q.shape)}")
    check_int("d_v", d_v, lo=1, hi=head_dim)
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool) \
            or not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    cache = _as_3d_cache("kv_cache", kv_cache, q.dtype, device, head_dim)
    check_tensor("indices", indices, ndim=2, dtypes=(torch.int32,), device=device, unit_last_stride=True)
    if indices.shape[0] != num_tokens or indices.shape[1] < 1:
        raise ValueError(f"indices must have shape [{num_tokens}, topk >= 1], got {list(indices.shape)}")
    if topk_length is not None:
        check_tensor("topk_length", topk_length, shape=[num_tokens], dtypes=(torch.int32,), device=device)
    if attn_sink is not None:
        check_tensor("attn_sink", attn_sink, shape=[num_heads], dtypes=(torch.float32,), device=device)
    extra_cache = None
    if extra_kv_cache is None:
        if extra_indices is not None or extra_topk_length is not None:
            raise ValueError("extra_indices / extra_topk_length need extra_kv_cache")
    else:
        extra_cache = _as_3d_cache("extra_kv_cache", extra_kv_cache, q.dtype, device, head_dim)
        if extra_indices is None:
            raise ValueError("extra_kv_cache needs extra_indices")
        check_tensor("extra_indices", extra_indices, ndim=2, dtypes=(torch.int32,), device=device,
                     unit_last_stride=True)
        if extra_indices.shape[0] != num_tokens or extra_indices.shape[1] < 1:
            raise ValueError(f"extra_indices must have shape [{num_tokens}, extra_topk >= 1], "
                             f"got {list(extra_indices.shape)}")
        if extra_topk_length is not None:
            check_tensor("extra_topk_length", extra_topk_length, shape=[num_tokens], dtypes=(torch.int32,),
                         device=device)
    check_out("out", out, (num_tokens, num_heads, d_v), q.dtype, device)
    check_out("lse_out", lse_out, (num_tokens, num_heads), torch.float32, device)
    if out is None:
        out = torch.empty((num_tokens, num_heads, d_v), dtype=q.dtype, device=device)
    if lse_out is None:
        lse_out = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=device)
    if num_tokens == 0:
        return out, lse_out
    entry = _sparse_mla_decode_selected if launches_ahead_of_time(q) else torch.ops.rocmoe.sparse_mla_decode
    entry(
        q, cache, indices, float(softmax_scale), d_v, topk_length, attn_sink,
        extra_cache, extra_indices, extra_topk_length, out, lse_out, backend,
    )
    return out, lse_out


def problem_of(q, cache, indices, d_v, topk_length, attn_sink, extra_cache, extra_indices) -> SparseMlaProblem:
    return SparseMlaProblem(
        q.dtype, q.shape[1], q.shape[2], d_v, cache.shape[1], indices.shape[1],
        topk_length is not None, attn_sink is not None,
        None if extra_cache is None else extra_cache.shape[1],
        None if extra_indices is None else extra_indices.shape[1],
    )


def _sparse_mla_decode_selected(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    d_v: int,
    topk_length: torch.Tensor | None,
    attn_sink: torch.Tensor | None,
    extra_kv_cache: torch.Tensor | None,
    extra_indices: torch.Tensor | None,
    extra_topk_length: torch.Tensor | None,
    out: torch.Tensor,
    lse_out: torch.Tensor,
    backend: str | None,
) -> None:
    problem = problem_of(q, kv_cache, indices, d_v, topk_length, attn_sink, extra_kv_cache, extra_indices)
    impl = registry.select(OP, Device.of(q), problem, backend).impl
    if shape_log.ENABLED:
        shape_log.record(OP, q, tokens=q.shape[0], heads=problem.num_heads, head_dim=problem.head_dim,
                         topk=problem.topk, extra_topk=problem.extra_topk or 0, block_size=problem.block_size,
                         backend=impl.backend)
    impl.run(q, kv_cache, indices, softmax_scale, d_v, topk_length, attn_sink,
             extra_kv_cache, extra_indices, extra_topk_length, out, lse_out)


# The dispatcher sends meta tensors to the fake kernel below; under
# meta_tensors_as (rocmoe precompile) the public function calls the body itself.
_sparse_mla_decode_op = torch.library.custom_op(
    "rocmoe::sparse_mla_decode", _sparse_mla_decode_selected, mutates_args=("out", "lse_out"))


@_sparse_mla_decode_op.register_fake
def _(q, kv_cache, indices, softmax_scale, d_v, topk_length, attn_sink, extra_kv_cache, extra_indices,
      extra_topk_length, out, lse_out, backend) -> None:
    return None
