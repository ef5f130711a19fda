"""``gemma4_routing``: fused top-k + softmax + per-expert scale (Gemma 4 MoE router)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rocmoe import registry, shape_log
from rocmoe.device import Device, launches_ahead_of_time
from rocmoe.ops._validate import FLOAT_DTYPES, check_int, check_out, check_tensor

__all__ = ["gemma4_routing", "Gemma4RoutingProblem"]

OP = "gemma4_routing"


@dataclass(frozen=True)
class Gemma4RoutingProblem:
    """What decides whether a backend can route: dtypes and the static sizes."""

    logits_dtype: torch.dtype
    scale_dtype: torch.dtype
    num_experts: int
    topk: int


def gemma4_routing(
    gating_output: torch.Tensor,
    topk: int,
    per_expert_scale: torch.Tensor,
    *,
    out_weights: torch.Tensor | None = None,
    out_ids: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to its ``topk`` experts, Gemma 4 style.

    Pseudo-code, per token ``t``::

        ids[t]     = the topk largest logits of gating_output[t], in descending
                     order of logit; equal logits ordered by lower expert id
        weights[t] = softmax(float32(gating_output[t, ids[t]])) * float32(per_expert_scale[ids[t]])

    (equal to softmax over all E, top-k, renormalise; computed over the K
    selected values only). -0.0 and +0.0 are equal logits. A row holding NaN
    still gets ids in [0, E); its weights may be NaN. A selected +inf logit
    makes the row's weights NaN (inf - inf in the softmax); -inf is ordinary.

    Args:
        gating_output: [T, E] float32, bfloat16 or float16. Unit stride along
            E; the row stride may be larger than E (a slice of a wider buffer).
        topk: K, 1 <= K <= E.
        per_expert_scale: [E] float32 or bfloat16.
        out_weights: optional [T, K] float32 buffer, written, never read.
        out_ids: optional [T, K] int32 buffer, written, never read.
        backend: ``"aiter"``, ``"triton"``, ``"torch"``, a comma list, or None
            for the registry's choice (see :mod:`rocmoe.registry`).

    Returns:
        (topk_weights float32 [T, K], topk_ids int32 [T, K]) - the ``out_*``
        buffers when given.

    Example:
        >>> logits = torch.randn(4, 128)
        >>> w, ids = gemma4_routing(logits, 8, torch.ones(128))
        >>> w.shape, ids.dtype
        (torch.Size([4, 8]), torch.int32)
    """
    check_tensor("gating_output", gating_output, ndim=2, dtypes=FLOAT_DTYPES, unit_last_stride=True)
    num_tokens, num_experts = gating_output.shape
    device = gating_output.device
    if num_experts < 1:
        raise ValueError(f"gating_output must have at least one expert column, got shape {list(gating_output.shape)}")
    check_int("topk", topk, lo=1, hi=num_experts)
    check_tensor("per_expert_scale", per_expert_scale, shape=[num_experts],
                 dtypes=(torch.float32, torch.bfloat16), device=device)
    check_out("out_weights", out_weights, (num_tokens, topk), torch.float32, device)
    check_out("out_ids", out_ids, (num_tokens, topk), torch.int32, device)
    if out_weights is None:
        out_weights = torch.empty((num_tokens, topk), dtype=torch.float32, device=device)
    if out_ids is None:
        out_ids = torch.empty((num_tokens, topk), dtype=torch.int32, device=device)
    if num_tokens == 0:
        return out_weights, out_ids
    entry = _gemma4_routing_selected if launches_ahead_of_time(gating_output) else torch.ops.rocmoe.gemma4_routing
    entry(gating_output, topk, per_expert_scale, out_weights, out_ids, backend)
    return out_weights, out_ids


def problem_of(gating_output: torch.Tensor, topk: int, per_expert_scale: torch.Tensor) -> Gemma4RoutingProblem:
    return Gemma4RoutingProblem(gating_output.dtype, per_expert_scale.dtype, gating_output.shape[1], topk)


def _gemma4_routing_selected(
    gating_output: torch.Tensor,
    topk: int,
    per_expert_scale: torch.Tensor,
    out_weights: torch.Tensor,
    out_ids: torch.Tensor,
    backend: str | None,
) -> None:
    problem = problem_of(gating_output, topk, per_expert_scale)
    impl = registry.select(OP, Device.of(gating_output), problem, backend).impl
    if shape_log.ENABLED:
        shape_log.record(OP, gating_output, tokens=gating_output.shape[0], experts=gating_output.shape[1],
                         topk=topk, dtype=str(gating_output.dtype).removeprefix("torch."), backend=impl.backend)
    impl.run(gating_output, topk, per_expert_scale, out_weights, out_ids)


# The dispatcher sends meta tensors to the fake kernel below; under
# meta_tensors_as (rocmoe precompile) the public function calls the body itself.
_gemma4_routing_op = torch.library.custom_op(
    "rocmoe::gemma4_routing", _gemma4_routing_selected, mutates_args=("out_weights", "out_ids"))


@_gemma4_routing_op.register_fake
def _(gating_output, topk, per_expert_scale, out_weights, out_ids, backend) -> None:
    return None
