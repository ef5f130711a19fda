"""``mxfp4_moe``: fused MoE experts with MXFP4 weights (gpt-oss, DeepSeek-V4, Gemma 4)."""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rocmoe import registry, shape_log
from rocmoe.device import Device, launches_ahead_of_time
from rocmoe.ops._validate import check_choice, check_out, check_tensor

__all__ = ["mxfp4_moe", "mxfp4_moe_workspace_size", "Mxfp4MoeWeights", "Mxfp4MoeProblem", "ACTIVATIONS"]

OP = "mxfp4_moe"
ACTIVATIONS = ("swigluoai", "silu")
GATE_UP_LAYOUTS = ("interleaved", "concatenated")


class _Auto:
    def __repr__(self) -> str:
        return "'auto'"


#: ``limit``'s default: 7.0 for swigluoai (gpt-oss), no clamp for silu.
AUTO = _Auto()


@dataclass(frozen=True)
class Mxfp4MoeProblem:
    """Static facts of a MoE call."""

    x_dtype: torch.dtype
    num_experts: int
    hidden_size: int
    intermediate_size: int
    topk: int
    gate_up: str
    activation: str
    has_bias: bool
    expert_parallel: bool
    apply_router_weight_on_input: bool
    #: the activation's constants (a kernel may fix them); limit None = no clamp
    alpha: float = 1.702
    limit: float | None = 7.0


# Weights are found inside the custom op by handle (an int the op schema can
# carry), the way serving engines pass a layer name: the converted tensors stay
# in the Mxfp4MoeWeights object and are never re-derived per call.
_handles = itertools.count(1)
_live_weights: weakref.WeakValueDictionary[int, Mxfp4MoeWeights] = weakref.WeakValueDictionary()


class Mxfp4MoeWeights:
    """One MoE layer's experts in the OCP MX checkpoint layout (gpt-oss's).

    Built once from the checkpoint tensors; each backend converts them once,
    lazily on first use (or eagerly with :meth:`prepare`), and keeps the result.

    Args:
        w1_blocks: uint8 [E, 2I, H/2], packed E2M1 (low nibble = even element).
        w1_scales: uint8 [E, 2I, H/32], E8M0.
        w2_blocks: uint8 [E, H, I/2].
        w2_scales: uint8 [E, H, I/32].
        b1: optional [E, 2I] float32 or bfloat16 bias of the first GEMM.
        b2: optional [E, H] float32 or bfloat16 bias of the second GEMM.
        gate_up: ``"interleaved"`` (gpt-oss: rows 0, 2, 4, ... gate, 1, 3, 5,
            ... up) or ``"concatenated"`` (rows [0, I) gate, [I, 2I) up).

    H and I must be multiples of 32.
    """

    def __init__(
        self,
        w1_blocks: torch.Tensor,
        w1_scales: torch.Tensor,
        w2_blocks: torch.Tensor,
        w2_scales: torch.Tensor,
        b1: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        gate_up: str = "interleaved",
    ) -> None:
        check_tensor("w1_blocks", w1_blocks, ndim=3, dtypes=(torch.uint8,), contiguous=True)
        num_experts, two_i, half_h = w1_blocks.shape
        device = w1_blocks.device
        hidden, inter = half_h * 2, two_i // 2
        if num_experts < 1 or two_i < 2 or two_i % 2 or hidden % 32 or inter % 32:
            raise ValueError(
                f"w1_blocks must be [E, 2I, H/2] with E >= 1 and H, I multiples of 32, got {list(w1_blocks.shape)}"
            )
        check_tensor("w1_scales", w1_scales, shape=[num_experts, two_i, hidden // 32], dtypes=(torch.uint8,),
                     device=device, contiguous=True)
        check_tensor("w2_blocks", w2_blocks, shape=[num_experts, hidden, inter // 2], dtypes=(torch.uint8,),
                     device=device, contiguous=True)
        check_tensor("w2_scales", w2_scales, shape=[num_experts, hidden, inter // 32], dtypes=(torch.uint8,),
                     device=device, contiguous=True)
        bias_dtypes = (torch.float32, torch.bfloat16)
        if b1 is not None:
            check_tensor("b1", b1, shape=[num_experts, two_i], dtypes=bias_dtypes, device=device)
        if b2 is not None:
            check_tensor("b2", b2, shape=[num_experts, hidden], dtypes=bias_dtypes, device=device)
        check_choice("gate_up", gate_up, GATE_UP_LAYOUTS)
        self.w1_blocks, self.w1_scales = w1_blocks, w1_scales
        self.w2_blocks, self.w2_scales = w2_blocks, w2_scales
        self.b1, self.b2 = b1, b2
        self.gate_up = gate_up
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden, inter
        self._converted: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.handle = next(_handles)
        _live_weights[self.handle] = self

    @property
    def device(self) -> torch.device:
        return self.w1_blocks.device

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None or self.b2 is not None

    def converted(self, backend: str, convert: Callable[[Mxfp4MoeWeights], Any]) -> Any:
        """The weights in ``backend``'s layout, converted on first request only."""
        done = self._converted.get(backend)
        if done is None:
            with self._lock:
                done = self._converted.get(backend)
                if done is None:
                    done = self._converted[backend] = convert(self)
        return done

    def prepare(self, *, topk: int, x_dtype: torch.dtype = torch.bfloat16, activation: str = "swigluoai",
                alpha: float = 1.702, limit: float | _Auto | None = AUTO, expert_map: torch.Tensor | None = None,
                backend: str | None = None) -> str:
        """Select the backend for these weights and convert them now (before a
        CUDA-graph capture, say); returns the backend's name. Pass the
        arguments the calls will pass: they decide the backend."""
        problem = _problem(x_dtype, self, topk, activation, expert_map is not None, False, alpha, limit)
        impl = registry.select(OP, Device.for_torch_device(self.device), problem, backend).impl
        impl.prepare(self)
        return impl.backend

    def __repr__(self) -> str:
        return (f"Mxfp4MoeWeights(E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, "
                f"gate_up={self.gate_up!r}, bias={self.has_bias}, device={self.device})")


def _problem(x_dtype, weights: Mxfp4MoeWeights, topk: int, activation: str, expert_parallel: bool,
             apply_router_weight_on_input: bool, alpha: float = 1.702,
             limit: float | _Auto | None = AUTO) -> Mxfp4MoeProblem:
    return Mxfp4MoeProblem(x_dtype, weights.num_experts, weights.hidden_size, weights.intermediate_size, topk,
                           weights.gate_up, activation, weights.has_bias, expert_parallel,
                           apply_router_weight_on_input, float(alpha), _resolve_limit(activation, limit))


def _resolve_limit(activation: str, limit: float | _Auto | None) -> float | None:
    if isinstance(limit, _Auto):
        return 7.0 if activation == "swigluoai" else None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"limit must be a positive float or None, got {limit!r}")
    return None if limit is None else float(limit)


def mxfp4_moe(
    x: torch.Tensor,
    weights: Mxfp4MoeWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "swigluoai",
    alpha: float = 1.702,
    limit: float | _Auto | None = AUTO,
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mixture-of-experts feed-forward with MXFP4 expert weights.

    Pseudo-code, per token ``m`` and slot ``j`` whose expert ``e`` is local
    (``e = expert_map[topk_ids[m, j]]`` with expert parallelism)::

        h = W1[e] @ x[m] + b1[e]                    # fp32 accumulate, [2I]
        gate, up = split(h, gate_up layout)
        swigluoai: gate = min(gate, limit); up = clamp(up, -limit, limit)
                   a = gate * sigmoid(alpha * gate) * (up + 1)
        silu:      (gate, up clamped the same way when limit is not None)
                   a = silu(gate) * up
        a = round_to(x.dtype, a)
        y = W2[e] @ a + b2[e]
        out[m] = x.dtype(sum_j topk_weights[m, j] * y)     # fp32 sum, one rounding

    Ids of -1 (or outside [0, E), or mapped to -1 by ``expert_map``)
    contribute nothing. The k contributions are summed in slot order, so the
    result is reproducible run to run.

    Args:
        x: [M, H] bfloat16 or float16, unit stride along H.
        weights: the layer's :class:`Mxfp4MoeWeights`, on x's device.
        topk_weights: [M, k] float32 router weights.
        topk_ids: [M, k] int32 (or int64) expert ids.
        activation: ``"swigluoai"`` or ``"silu"``.
        alpha: swigluoai's sigmoid slope.
        limit: clamp bound. Default: 7.0 for swigluoai, none for silu
            (DeepSeek-V4 passes 10.0 with silu); None disables it.
        expert_map: optional int32 [E_global]: global id -> local expert or -1.
        apply_router_weight_on_input: multiply x by the router weight before
            W1 (x * w is rounded to x.dtype) instead of scaling y; needs k = 1.
        out: optional [M, H] buffer of x's dtype, written, never read.
        workspace: optional uint8 [>= :func:`mxfp4_moe_workspace_size`] scratch.
        backend: backend name, comma list, or None (see :mod:`rocmoe.registry`).

    Returns:
        [M, H] of x's dtype (``out`` when given).
    """
    if not isinstance(weights, Mxfp4MoeWeights):
        raise TypeError(f"weights must be rocmoe.Mxfp4MoeWeights, got {type(weights).__name__}")
    check_tensor("x", x, ndim=2, dtypes=(torch.bfloat16, torch.float16), device=weights.device,
                 unit_last_stride=True)
    num_tokens, hidden = x.shape
    device = x.device
    if hidden != weights.hidden_size:
        raise ValueError(f"x must have shape [M, {weights.hidden_size}] (the weights' H), got {list(x.shape)}")
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=device)
    if topk_ids.shape[0] != num_tokens or topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have shape [{num_tokens}, k >= 1], got {list(topk_ids.shape)}")
    topk = topk_ids.shape[1]
    check_tensor("topk_weights", topk_weights, shape=[num_tokens, topk], dtypes=(torch.float32,), device=device)
    check_choice("activation", activation, ACTIVATIONS)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    resolved_limit = _resolve_limit(activation, limit)
    if expert_map is not None:
        check_tensor("expert_map", expert_map, ndim=1, dtypes=(torch.int32,), device=device, contiguous=True)
    if apply_router_weight_on_input and topk != 1:
        raise ValueError(f"apply_router_weight_on_input needs k = 1 (one expert per token), got k = {topk}")
    check_out("out", out, (num_tokens, hidden), x.dtype, device)
    if workspace is not None:
        check_tensor("workspace", workspace, ndim=1, dtypes=(torch.uint8,), device=device, contiguous=True)
    if out is None:
        out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=device)
    if num_tokens == 0:
        return out
    entry = _mxfp4_moe_selected if launches_ahead_of_time(x) else torch.ops.rocmoe.mxfp4_moe
    entry(
        x, topk_weights, topk_ids, weights.handle, expert_map, activation, float(alpha), resolved_limit,
        bool(apply_router_weight_on_input), out, workspace, backend,
    )
    return out


def mxfp4_moe_workspace_size(
    num_tokens: int,
    topk: int,
    weights: Mxfp4MoeWeights,
    *,
    x_dtype: torch.dtype = torch.bfloat16,
    activation: str = "swigluoai",
    alpha: float = 1.702,
    limit: float | _Auto | None = AUTO,
    expert_map: torch.Tensor | None = None,
    backend: str | None = None,
) -> int:
    """Bytes of ``workspace`` the selected backend needs for ``num_tokens`` tokens
    (allocate once for the largest batch, reuse across layers and steps)."""
    problem = _problem(x_dtype, weights, topk, activation, expert_map is not None, False, alpha, limit)
    impl = registry.select(OP, Device.for_torch_device(weights.device), problem, backend).impl
    return impl.workspace_bytes(problem, num_tokens)


def _mxfp4_moe_selected(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    weights_handle: int,
    expert_map: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float | None,
    apply_router_weight_on_input: bool,
    out: torch.Tensor,
    workspace: torch.Tensor | None,
    backend: str | None,
) -> None:
    weights = _live_weights.get(weights_handle)
    if weights is None:
        raise RuntimeError(f"Mxfp4MoeWeights handle {weights_handle} is no longer alive")
    problem = _problem(x.dtype, weights, topk_ids.shape[1], activation, expert_map is not None,
                       apply_router_weight_on_input, alpha, limit)
    impl = registry.select(OP, Device.of(x), problem, backend).impl
    if workspace is not None:
        need = impl.workspace_bytes(problem, x.shape[0])
        if workspace.numel() < need:
            raise ValueError(f"workspace must hold at least {need} bytes for M={x.shape[0]} with the "
                             f"{impl.backend} backend, got {workspace.numel()}")
    if shape_log.ENABLED:
        shape = dict(tokens=x.shape[0], experts=weights.num_experts, topk=topk_ids.shape[1],
                     hidden=weights.hidden_size, intermediate=weights.intermediate_size,
                     activation=activation, expert_parallel=expert_map is not None, backend=impl.backend)
        shape_log.record(OP, x, **shape)
        shape_log.record_moe_histogram(shape, topk_ids, weights.num_experts, expert_map)
    impl.run(x, weights, topk_weights, topk_ids, expert_map, activation, alpha, limit,
             apply_router_weight_on_input, out, workspace)


# The dispatcher sends meta tensors to the fake kernel below; under
# meta_tensors_as (rocmoe precompile) the public function calls the body itself.
_mxfp4_moe_op = torch.library.custom_op(
    "rocmoe::mxfp4_moe", _mxfp4_moe_selected, mutates_args=("out", "workspace"))


@_mxfp4_moe_op.register_fake
def _(x, topk_weights, topk_ids, weights_handle, expert_map, activation, alpha, limit,
      apply_router_weight_on_input, out, workspace, backend) -> None:
    return None
