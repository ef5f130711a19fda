"""torch backend of ``sparse_topk``: the executable form of SPEC §4."""

from __future__ import annotations

import torch

from rocmoe.backends.torch._base import TorchOp, refuse_graph_capture

__all__ = ["sparse_topk_torch", "window_applies", "IMPLEMENTATION"]


def window_applies(seq_lens: torch.Tensor, topk: int, seq_len_cap: int | None,
                   max_seq_len: int | None) -> bool:
    """Whether every window fits in ``topk`` (syncs only when ``max_seq_len`` is None)."""
    if seq_len_cap is not None and seq_len_cap <= topk:
        return True
    if max_seq_len is not None:
        return max_seq_len <= topk
    refuse_graph_capture(seq_lens, "of sparse_topk reads max(seq_lens) on the host unless max_seq_len is given")
    return int(seq_lens.max()) <= topk


def sparse_topk_torch(
    logits: torch.Tensor | None,
    seq_lens: torch.Tensor,
    topk: int,
    block_table: torch.Tensor | None = None,
    block_size: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """See :func:`rocmoe.sparse_topk`. Returns int32 [T, topk]."""
    num_tokens = seq_lens.shape[0]
    width = None if logits is None else logits.shape[1]
    lens = seq_lens.to(torch.int64).clamp(min=0)
    if width is not None:
        lens = lens.clamp(max=width)
    slots = torch.arange(topk, device=seq_lens.device)
    if window_applies(lens, topk, width, max_seq_len):
        positions = torch.where(slots < lens[:, None], slots, -1)
    elif logits is None:
        raise ValueError(f"logits is None but seq_lens has max {int(lens.max())} > topk={topk}: "
                         f"the short-circuit does not apply, so the scores are needed")
    else:
        columns = torch.arange(width, device=logits.device)
        masked = logits.float().masked_fill(columns >= lens[:, None], float("-inf"))
        # A stable descending sort keeps ties in position order, and every
        # valid position precedes every masked one, so a valid -inf still
        # outranks the masked tail.
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices
        kept = min(topk, width)
        positions = torch.full((num_tokens, topk), -1, dtype=torch.int64, device=logits.device)
        positions[:, :kept] = torch.where(slots[:kept] < lens[:, None], order[:, :kept], -1)
    if block_table is not None:
        positions = positions_to_slots(positions, block_table, block_size)
    return positions.to(torch.int32)


def positions_to_slots(positions: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Window positions [T, K] (-1 = none) -> global cache slots, int64."""
    max_blocks = block_table.shape[1]
    block = torch.div(positions, block_size, rounding_mode="floor")
    valid = (positions >= 0) & (block < max_blocks)
    if max_blocks == 0:
        return torch.full_like(positions, -1)
    entry = block_table.to(torch.int64).gather(1, block.clamp(0, max_blocks - 1))
    valid &= entry >= 0
    return torch.where(valid, entry * block_size + positions % block_size, -1)


class TorchSparseTopk(TorchOp):
    op = "sparse_topk"

    def graph_capturable(self, problem) -> bool:
        # The short-circuit decided from a host-side bound needs no sync.
        return problem.seq_len is None or problem.seq_len <= problem.topk

    def run(self, logits, seq_lens, topk, block_table, block_size, max_seq_len, out) -> None:
        out.copy_(sparse_topk_torch(logits, seq_lens, topk, block_table, block_size, max_seq_len))


IMPLEMENTATION = TorchSparseTopk()
