"""AITER backend of ``sparse_mla_decode``: AITER's MLA decode (its assembly
kernels, persistent mode) over a block-size-1 view of the latent cache, with
each query's valid top-k slots compacted into ragged ``kv_indptr`` /
``kv_indices`` lists.

What maps and what does not:
- DeepSeek-V3.2 shapes: D = 576 (512 latent + 64 rope), d_v = 512, bf16 q and
  cache, 16 or 128 heads. V4's D = 512 and the extra key set have no AITER
  kernel: refused with a reason (the triton backend serves them).
- ``topk_length`` and invalid slots (-1, past the cache) are dropped during the
  compaction, on the GPU, with no host sync.
- ``attn_sink`` and queries with no valid key are applied afterwards from the
  log-sum-exp AITER's reduce returns: ``out *= 1 / (1 + exp(sink - lse))``,
  and ``out = 0, lse = +inf`` for empty rows.

:func:`compact_indices`, :func:`cache_as_pages` and :func:`finish` are plain
torch, tested on the CPU; :meth:`AiterSparseMlaDecode.run` calls AITER and
runs in the ``rocm``-marked tests.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from rocmoe.device import Device
from rocmoe.registry import BackendOp

__all__ = ["compact_indices", "cache_as_pages", "finish", "IMPLEMENTATION"]

#: Head counts AITER's MLA decode runs for a bf16 cache (16 natively, 128 as
#: eight 16-head groups in persistent mode).
HEADS = frozenset({16, 128})
HEAD_DIM = 576
D_V = 512


def compact_indices(indices: torch.Tensor, topk_length: torch.Tensor | None,
                    num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged lists of each query's valid slots, built without a host sync.

    Args:
        indices: int32 [T, topk] global slots; -1 or >= ``num_slots`` = no key.
        topk_length: optional int32 [T]; entries at or past it do not count.
        num_slots: rows in the cache (num_blocks * block_size).

    Returns:
        (kv_indptr int32 [T + 1], kv_indices int32 [T * topk], counts int32 [T]):
        query t's slots are ``kv_indices[kv_indptr[t]:kv_indptr[t + 1]]``, in
        their order in ``indices``; entries past ``kv_indptr[T]`` are unused (0).
    """
    tokens, topk = indices.shape
    valid = (indices >= 0) & (indices < num_slots)
    if topk_length is not None:
        positions = torch.arange(topk, device=indices.device)
        valid &= positions[None, :] < topk_length[:, None]
    counts = valid.sum(1, dtype=torch.int32)
    kv_indptr = torch.zeros(tokens + 1, dtype=torch.int32, device=indices.device)
    torch.cumsum(counts, 0, out=kv_indptr[1:])
    rank = torch.cumsum(valid.to(torch.int32), 1) - 1
    # Invalid entries go to one spare slot past the end, dropped afterwards.
    spare = tokens * topk
    dest = torch.where(valid, kv_indptr[:-1, None] + rank, spare).flatten().long()
    kv_indices = torch.zeros(spare + 1, dtype=torch.int32, device=indices.device)
    kv_indices.scatter_(0, dest, indices.flatten().to(torch.int32))
    return kv_indptr, kv_indices[:spare], counts


def cache_as_pages(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_size, D] -> AITER's [num_slots, page_size 1, 1 kv head, D]
    view, so a global slot is a page index (no copy)."""
    blocks, block_size, dim = kv_cache.shape
    try:
        return kv_cache.view(blocks * block_size, 1, 1, dim)
    except RuntimeError as exc:
        raise ValueError("the aiter sparse_mla_decode needs kv_cache's rows contiguous (a view as block-size-1 "
                         f"pages), got strides {kv_cache.stride()}") from exc


def finish(out: torch.Tensor, lse: torch.Tensor, counts: torch.Tensor,
           attn_sink: torch.Tensor | None) -> None:
    """In place: queries with no valid key get ``out = 0`` and ``lse = +inf``;
    with ``attn_sink`` [H], ``out *= 1 / (1 + exp(sink - lse))`` (``lse``
    unchanged). out [T, H, d_v], lse float32 [T, H], counts [T]."""
    empty = (counts == 0)[:, None]
    lse.masked_fill_(empty, torch.inf)
    if attn_sink is not None:
        keep = torch.sigmoid(lse - attn_sink.float()[None, :])  # = 1 / (1 + exp(sink - lse))
        out.copy_((out.float() * keep[:, :, None]).to(out.dtype))
    out.masked_fill_(empty[:, :, None], 0)


class AiterSparseMlaDecode(BackendOp):
    op = "sparse_mla_decode"
    backend = "aiter"
    families: ClassVar[frozenset[str]] = frozenset({"cdna3", "cdna4"})

    def not_supported_reasons(self, device: Device, problem) -> list[str]:
        reasons = super().not_supported_reasons(device, problem)
        if problem is None:
            return reasons
        if problem.dtype != torch.bfloat16:
            reasons.append(f"AITER's MLA decode here takes a bfloat16 q and cache, got {problem.dtype}")
        if (problem.head_dim, problem.d_v) != (HEAD_DIM, D_V):
            reasons.append(f"AITER's MLA decode kernels take D = {HEAD_DIM} with d_v = {D_V} (DeepSeek-V3.2), "
                           f"got D = {problem.head_dim}, d_v = {problem.d_v}")
        if problem.num_heads not in HEADS:
            reasons.append(f"AITER's MLA decode runs {' or '.join(map(str, sorted(HEADS)))} heads with a bf16 "
                           f"cache, got {problem.num_heads}")
        if problem.extra_topk is not None:
            reasons.append("AITER's MLA decode has no second key set (DeepSeek-V4's extra_kv_cache) "
                           "in the same softmax")
        return reasons

    def graph_capturable(self, problem) -> bool:
        return True  # compaction and metadata run on the GPU

    def run(self, q, kv_cache, indices, softmax_scale, d_v, topk_length, attn_sink,
            extra_kv_cache, extra_indices, extra_topk_length, out, lse_out) -> None:
        import aiter
        from aiter.mla import mla_decode_fwd

        tokens, heads, _ = q.shape
        pages = cache_as_pages(kv_cache)
        kv_indptr, kv_indices, counts = compact_indices(indices, topk_length, pages.shape[0])
        device = q.device
        qo_indptr = torch.arange(tokens + 1, dtype=torch.int32, device=device)
        last_page_lens = torch.ones(tokens, dtype=torch.int32, device=device)
        shapes = aiter.get_mla_metadata_info_v1(tokens, 1, heads, q.dtype, pages.dtype, is_sparse=0)
        work = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in shapes]
        aiter.get_mla_metadata_v1(qo_indptr, kv_indptr, heads, 1, False, *work, max_seqlen_qo=1, uni_seqlen_qo=1)
        _, lse = mla_decode_fwd(q, pages, out, qo_indptr, kv_indptr, kv_indices, last_page_lens, 1,
                                sm_scale=softmax_scale, work_meta_data=work[0], work_indptr=work[1],
                                work_info_set=work[2], reduce_indptr=work[3], reduce_final_map=work[4],
                                reduce_partial_map=work[5])
        lse_out.copy_(lse.view(tokens, heads))
        finish(out, lse_out, counts, attn_sink)


IMPLEMENTATION = AiterSparseMlaDecode()
