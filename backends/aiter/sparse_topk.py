"""AITER's DSA indexer top-k (``top_k_per_row_decode``) fixes k at 2048, and
neither its -1 padding of short windows nor a full-window short-circuit nor
block-table conversion is part of its contract, so SPEC §4 cannot rest on it.
The triton kernel serves CDNA."""

from rocmoe.backends.aiter._unsupported import NoAiterKernel

IMPLEMENTATION = NoAiterKernel(
    "sparse_topk",
    "AITER's top_k_per_row_decode fixes topk at 2048 and specifies neither -1 padding of short windows nor the "
    "full-window short-circuit nor block-table slots; the triton backend serves CDNA")
