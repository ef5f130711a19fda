"""``sparse_topk``: the DSA indexer's top-k, with the full-window short-circuit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rocmoe import registry, shape_log
from rocmoe.device import Device, launches_ahead_of_time
from rocmoe.ops._validate import check_int, check_out, check_tensor

__all__ = ["sparse_topk", "SparseTopkProblem"]

OP = "sparse_topk"


@dataclass(frozen=True)
class SparseTopkProblem:
    """``seq_len`` is L, the logits' width (None when logits is None)."""

    logits_dtype: torch.dtype | None
    seq_len: int | None
    topk: int
    paged: bool


def sparse_topk(
    logits: torch.Tensor | None,
    seq_lens: torch.Tensor,
    topk: int,
    *,
    block_table: torch.Tensor | None = None,
    block_size: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Positions of each query's ``topk`` largest indexer scores in its causal window.

    Pseudo-code, per query ``t`` with ``n = seq_lens[t]`` (clamped to [0, L])::

        if every n <= topk:            # the full-window short-circuit
            out[t] = [0, 1, ..., n-1, -1, ..., -1]      # logits never read
        else:
            out[t] = positions of the topk largest logits[t, :n], then -1s
        if block_table is given:       # positions -> global cache slots
            out[t, j] = block_table[t, p // block_size] * block_size + p % block_size   (p = out[t, j] >= 0)

    The order of the selected positions is unspecified on the general path.
    Among equal scores any may be picked; a valid position always wins over
    one outside the window (also when its score is -inf).

    Deciding whether the short-circuit applies needs ``max(seq_lens)``: pass
    ``max_seq_len`` (a host-side bound the engine already knows) to decide it
    without a device-to-host sync (required under CUDA-graph capture);
    otherwise the op reads ``seq_lens.max()`` once.

    Args:
        logits: [T, L] float32 scores (unit stride along L), or None when the
            caller knows every ``seq_lens[t] <= topk``.
        seq_lens: [T] int32, valid positions per query.
        topk: number of positions per query (>= 1).
        block_table: optional [T, max_blocks] int32 paged-cache table; a -1
            entry, or a position whose block is past the table, gives -1.
        block_size: the cache's block size; required with ``block_table``.
        max_seq_len: optional host-side upper bound of ``seq_lens``.
        out: optional [T, topk] int32 buffer, written, never read.
        backend: backend name, comma list, or None (see :mod:`rocmoe.registry`).

    Returns:
        int32 [T, topk]: positions (or cache slots), -1 padded.
    """
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    num_tokens = seq_lens.shape[0]
    device = seq_lens.device
    check_int("topk", topk, lo=1)
    if logits is not None:
        check_tensor("logits", logits, ndim=2, dtypes=(torch.float32,), device=device, unit_last_stride=True)
        if logits.shape[0] != num_tokens:
            raise ValueError(f"logits must have shape [{num_tokens}, L] (one row per seq_lens entry), "
                             f"got {list(logits.shape)}")
    if (block_table is None) != (block_size is None):
        raise ValueError("block_table and block_size must be given together")
    if block_table is not None:
        check_tensor("block_table", block_table, shape=[num_tokens, None], dtypes=(torch.int32,), device=device,
                     unit_last_stride=True)
        check_int("block_size", block_size, lo=1)
    if max_seq_len is not None:
        check_int("max_seq_len", max_seq_len, lo=0)
        if logits is None and max_seq_len > topk:
            raise ValueError(f"logits is None but max_seq_len={max_seq_len} > topk={topk}: "
                             f"the short-circuit does not apply, so the scores are needed")
    check_out("out", out, (num_tokens, topk), torch.int32, device)
    if out is None:
        out = torch.empty((num_tokens, topk), dtype=torch.int32, device=device)
    if num_tokens == 0:
        return out
    entry = _sparse_topk_selected if launches_ahead_of_time(seq_lens) else torch.ops.rocmoe.sparse_topk
    entry(logits, seq_lens, topk, block_table, block_size, max_seq_len, out, backend)
    return out


def problem_of(logits: torch.Tensor | None, topk: int, block_table: torch.Tensor | None) -> SparseTopkProblem:
    if logits is None:
        return SparseTopkProblem(None, None, topk, block_table is not None)
    return SparseTopkProblem(logits.dtype, logits.shape[1], topk, block_table is not None)


def _sparse_topk_selected(
    logits: torch.Tensor | None,
    seq_lens: torch.Tensor,
    topk: int,
    block_table: torch.Tensor | None,
    block_size: int | None,
    max_seq_len: int | None,
    out: torch.Tensor,
    backend: str | None,
) -> None:
    impl = registry.select(OP, Device.of(seq_lens), problem_of(logits, topk, block_table), backend).impl
    if shape_log.ENABLED:
        shape_log.record(OP, seq_lens, tokens=seq_lens.shape[0], seq_len=0 if logits is None else logits.shape[1],
                         topk=topk, paged=block_table is not None, backend=impl.backend)
    impl.run(logits, seq_lens, topk, block_table, block_size, max_seq_len, out)


# The dispatcher sends meta tensors to the fake kernel below; under
# meta_tensors_as (rocmoe precompile) the public function calls the body itself.
_sparse_topk_op = torch.library.custom_op(
    "rocmoe::sparse_topk", _sparse_topk_selected, mutates_args=("out",))


@_sparse_topk_op.register_fake
def _(logits, seq_lens, topk, block_table, block_size, max_seq_len, out, backend) -> None:
    return None
