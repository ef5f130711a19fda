"""torch backend of ``sparse_mla_decode``: the executable form of SPEC §3
(gather the selected rows, then dense attention over them)."""

from __future__ import annotations

import torch

from rocmoe.backends.torch._base import TorchOp

__all__ = ["sparse_mla_decode_torch", "IMPLEMENTATION"]

# Bytes of gathered keys per chunk of queries: bounds the gather's memory at
# large T x topk without a per-token loop.
_GATHER_BUDGET_BYTES = 256 * 1024 * 1024


def _gather_valid(cache: torch.Tensor, indices: torch.Tensor, length: torch.Tensor | None,
                  compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``cache`` ([N_blocks, bs, D]) at ``indices`` [t, k]; invalid rows are zeros."""
    rows_total = cache.shape[0] * cache.shape[1]
    flat = cache.reshape(rows_total, cache.shape[2])
    valid = (indices >= 0) & (indices < rows_total)
    if length is not None:
        valid &= torch.arange(indices.shape[1], device=indices.device) < length[:, None]
    rows = flat[indices.clamp(0, max(rows_total - 1, 0)).long()].to(compute_dtype)
    # Zeroing (not multiplying) keeps NaN in unselected rows out of the result.
    rows = torch.where(valid[..., None], rows, torch.zeros((), dtype=compute_dtype, device=rows.device))
    return rows, valid


def sparse_mla_decode_torch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    d_v: int,
    topk_length: torch.Tensor | None = None,
    attn_sink: torch.Tensor | None = None,
    extra_kv_cache: torch.Tensor | None = None,
    extra_indices: torch.Tensor | None = None,
    extra_topk_length: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`rocmoe.sparse_mla_decode`; ``kv_cache`` is 3-D here.

    Returns:
        (out [T, H, d_v] compute_dtype, lse [T, H] compute_dtype).
    """
    num_tokens, _, head_dim = q.shape
    keys_per_query = indices.shape[1] + (0 if extra_indices is None else extra_indices.shape[1])
    per_query = keys_per_query * head_dim * torch.finfo(compute_dtype).bits // 8
    chunk = max(1, _GATHER_BUDGET_BYTES // max(per_query, 1))
    outs, lses = [], []
    for start in range(0, num_tokens, chunk):
        part = slice(start, min(start + chunk, num_tokens))

        def sliced(t, part=part):
            return None if t is None else t[part]

        keys, valid = _gather_valid(kv_cache, indices[part], sliced(topk_length), compute_dtype)
        if extra_kv_cache is not None:
            extra_keys, extra_valid = _gather_valid(extra_kv_cache, extra_indices[part],
                                                    sliced(extra_topk_length), compute_dtype)
            keys = torch.cat((keys, extra_keys), dim=1)
            valid = torch.cat((valid, extra_valid), dim=1)
        scores = torch.einsum("thd,tkd->thk", q[part].to(compute_dtype), keys) * softmax_scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        any_key = valid.any(dim=-1)[:, None].expand_as(lse)
        probs = torch.exp(scores - torch.where(any_key, lse, 0.0)[..., None])
        out = torch.einsum("thk,tkd->thd", probs, keys[..., :d_v])
        lse = torch.where(any_key, lse, float("inf"))
        if attn_sink is not None:
            # exp(lse) / (exp(lse) + exp(sink)) without overflow; 1 for +inf lse.
            out = out * torch.sigmoid(lse - attn_sink.to(compute_dtype))[..., None]
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


class TorchSparseMlaDecode(TorchOp):
    op = "sparse_mla_decode"

    def run(self, q, kv_cache, indices, softmax_scale, d_v, topk_length, attn_sink,
            extra_kv_cache, extra_indices, extra_topk_length, out, lse_out) -> None:
        o, lse = sparse_mla_decode_torch(q, kv_cache, indices, softmax_scale, d_v, topk_length, attn_sink,
                                         extra_kv_cache, extra_indices, extra_topk_length)
        out.copy_(o)
        lse_out.copy_(lse)


IMPLEMENTATION = TorchSparseMlaDecode()
