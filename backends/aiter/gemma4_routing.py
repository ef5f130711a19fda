"""AITER has no Gemma 4 router: its ``topk_softmax`` normalises over all E
experts, has no per-expert scale and leaves the order of tied logits open, so
SPEC §1's exact ids cannot come from it. The triton kernel serves CDNA."""

from rocmoe.backends.aiter._unsupported import NoAiterKernel

IMPLEMENTATION = NoAiterKernel(
    "gemma4_routing",
    "AITER has no kernel with gemma4_routing's semantics (its topk_softmax normalises over all experts, applies "
    "no per-expert scale and leaves tie order open); the triton backend serves CDNA")
