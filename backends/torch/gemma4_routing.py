"""torch backend of ``gemma4_routing``: the executable form of SPEC §1."""

from __future__ import annotations

import torch

from rocmoe.backends.torch._base import TorchOp

__all__ = ["gemma4_routing_torch", "IMPLEMENTATION"]


def gemma4_routing_torch(
    gating_output: torch.Tensor,
    topk: int,
    per_expert_scale: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k + softmax over the selected logits + per-expert scale.

    Args:
        gating_output: [T, E] float tensor.
        topk: K.
        per_expert_scale: [E] float tensor.
        compute_dtype: float32 (the contract) or float64 (the reference).

    Returns:
        (weights [T, K] compute_dtype, ids [T, K] int32).
    """
    # Adding +0.0 turns -0.0 into +0.0, so the two zeros tie and the stable
    # sort orders them by expert id like any other tie.
    logits = gating_output.to(compute_dtype) + 0.0
    values, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    values, ids = values[:, :topk], ids[:, :topk]
    weights = torch.softmax(values, dim=-1) * per_expert_scale.to(compute_dtype)[ids]
    return weights, ids.to(torch.int32)


class TorchGemma4Routing(TorchOp):
    op = "gemma4_routing"

    def run(self, gating_output, topk, per_expert_scale, out_weights, out_ids) -> None:
        weights, ids = gemma4_routing_torch(gating_output, topk, per_expert_scale)
        out_weights.copy_(weights)
        out_ids.copy_(ids)


IMPLEMENTATION = TorchGemma4Routing()
