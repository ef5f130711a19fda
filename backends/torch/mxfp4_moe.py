"""torch backend of ``mxfp4_moe``: the executable form of SPEC §2.

Tokens are grouped by expert on the device; the loop runs over the experts
that received tokens (one host sync for their counts, so this backend is not
CUDA-graph capturable - the Triton backend is). Each expert's weights are
dequantised when it is used, which keeps memory at the MXFP4 footprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rocmoe.backends.torch._base import TorchOp, refuse_graph_capture
from rocmoe.formats.mxfp4 import dequantize_mxfp4

__all__ = ["TorchMoeWeights", "to_torch_layout", "mxfp4_moe_torch", "IMPLEMENTATION"]


@dataclass(frozen=True)
class TorchMoeWeights:
    """Weights with W1's rows ordered [gate; up] and biases in float32 (zeros
    when absent). Shapes as in the checkpoint layout."""

    w1_blocks: torch.Tensor
    w1_scales: torch.Tensor
    w2_blocks: torch.Tensor
    w2_scales: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor

    @property
    def intermediate_size(self) -> int:
        return self.w1_blocks.shape[1] // 2


def to_torch_layout(weights) -> TorchMoeWeights:
    """Mxfp4MoeWeights -> TorchMoeWeights (gpt-oss's interleaved rows de-interleaved once)."""
    num_experts, two_i = weights.w1_blocks.shape[:2]
    device = weights.device
    b1 = weights.b1.float() if weights.b1 is not None else torch.zeros(num_experts, two_i, device=device)
    b2 = (weights.b2.float() if weights.b2 is not None
          else torch.zeros(num_experts, weights.hidden_size, device=device))
    w1_blocks, w1_scales = weights.w1_blocks, weights.w1_scales
    if weights.gate_up == "interleaved":
        rows = torch.cat((torch.arange(0, two_i, 2), torch.arange(1, two_i, 2))).to(device)
        w1_blocks, w1_scales, b1 = w1_blocks[:, rows], w1_scales[:, rows], b1[:, rows]
    return TorchMoeWeights(w1_blocks.contiguous(), w1_scales.contiguous(), weights.w2_blocks,
                           weights.w2_scales, b1.contiguous(), b2.contiguous())


def activate(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float,
             limit: float | None) -> torch.Tensor:
    """swigluoai / silu on fp32 (or fp64) gate and up halves."""
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    if activation == "swigluoai":
        return gate * torch.sigmoid(alpha * gate) * (up + 1)
    return torch.nn.functional.silu(gate) * up


def local_expert_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """int64 [M, k] local ids, with -1 for every slot that has no local expert."""
    ids = topk_ids.to(torch.int64)
    if expert_map is not None:
        in_range = (ids >= 0) & (ids < expert_map.shape[0])
        mapped = expert_map.to(torch.int64)[ids.clamp(0, max(expert_map.shape[0] - 1, 0))]
        ids = torch.where(in_range, mapped, -1)
    return torch.where((ids >= 0) & (ids < num_experts), ids, -1)


def mxfp4_moe_torch(
    x: torch.Tensor,
    weights: TorchMoeWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    activation: str = "swigluoai",
    alpha: float = 1.702,
    limit: float | None = 7.0,
    apply_router_weight_on_input: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    contributions: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`rocmoe.mxfp4_moe`.

    Args:
        contributions: optional fp32 scratch of >= M*k*H elements (from the
            caller's workspace) for the per-slot expert outputs.

    Returns:
        [M, H] compute_dtype, before the final cast to x.dtype.
    """
    num_tokens, topk = topk_ids.shape
    hidden = x.shape[1]
    inter = weights.intermediate_size
    num_experts = weights.w1_blocks.shape[0]
    ids = local_expert_ids(topk_ids, expert_map, num_experts)
    flat = torch.where(ids >= 0, ids, num_experts).flatten()
    order = torch.argsort(flat, stable=True)
    refuse_graph_capture(x, "of mxfp4_moe reads per-expert token counts on the host")
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()

    inputs = x
    if apply_router_weight_on_input:
        inputs = (x.to(compute_dtype) * topk_weights.to(compute_dtype)).to(x.dtype)
    if contributions is None:
        per_slot = torch.zeros((num_tokens * topk, hidden), dtype=compute_dtype, device=x.device)
    else:
        per_slot = contributions[: num_tokens * topk * hidden].view(num_tokens * topk, hidden).zero_()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        slots = order[start:start + count]
        start += count
        rows = inputs[slots // topk].to(compute_dtype)
        w1 = dequantize_mxfp4(weights.w1_blocks[expert], weights.w1_scales[expert], compute_dtype)
        h = rows @ w1.T + weights.b1[expert].to(compute_dtype)
        a = activate(h[:, :inter], h[:, inter:], activation, alpha, limit).to(x.dtype).to(compute_dtype)
        w2 = dequantize_mxfp4(weights.w2_blocks[expert], weights.w2_scales[expert], compute_dtype)
        per_slot[slots] = (a @ w2.T + weights.b2[expert].to(compute_dtype)).to(per_slot.dtype)

    if apply_router_weight_on_input:
        scale = (ids >= 0).to(compute_dtype)
    else:
        scale = torch.where(ids >= 0, topk_weights.to(compute_dtype), 0.0)
    return (per_slot.view(num_tokens, topk, hidden).to(compute_dtype) * scale[..., None]).sum(dim=1)


class TorchMxfp4Moe(TorchOp):
    op = "mxfp4_moe"

    def graph_capturable(self, problem) -> bool:
        return False  # per-expert token counts are read on the host

    def prepare(self, weights) -> TorchMoeWeights:
        return weights.converted("torch", to_torch_layout)

    def workspace_bytes(self, problem, num_tokens: int) -> int:
        """fp32 per-slot expert outputs: M * k * H * 4 bytes."""
        return num_tokens * problem.topk * problem.hidden_size * 4

    def run(self, x, weights, topk_weights, topk_ids, expert_map, activation, alpha, limit,
            apply_router_weight_on_input, out, workspace) -> None:
        contributions = None if workspace is None else workspace[: workspace.numel() // 4 * 4].view(torch.float32)
        result = mxfp4_moe_torch(x, self.prepare(weights), topk_weights, topk_ids, expert_map, activation,
                                 alpha, limit, apply_router_weight_on_input, contributions=contributions)
        out.copy_(result)


IMPLEMENTATION = TorchMxfp4Moe()
