"""Benchmark cases: every op at SPEC.md's model shapes, with its byte and FLOP
model, input builders, the call under test and the check against the fp64
torch reference on the CPU."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

import rocmoe
from rocmoe.backends.torch.gemma4_routing import gemma4_routing_torch
from rocmoe.backends.torch.mxfp4_moe import IMPLEMENTATION as torch_moe, TorchMoeWeights, mxfp4_moe_torch
from rocmoe.backends.torch.sparse_mla_decode import sparse_mla_decode_torch
from rocmoe.backends.torch.sparse_topk import sparse_topk_torch
from rocmoe.formats.mxfp4 import dequantize_mxfp4
from rocmoe.ops import (
    gemma4_routing as routing_op,
    mxfp4_moe as moe_op,
    sparse_mla_decode as mla_op,
    sparse_topk as topk_op,
)

__all__ = ["BenchCase", "Check", "MODELS", "cases_for", "routing_case", "moe_case", "mla_case", "mla_shapes",
           "topk_case", "routing_bytes", "moe_bytes", "moe_flops", "mla_bytes", "mla_flops", "topk_bytes",
           "random_mxfp4_weights"]

Inputs = dict[str, Any]


@dataclass
class Check:
    ok: bool
    detail: str


@dataclass
class BenchCase:
    """One op at one shape.

    ``make_inputs(device, gen)`` builds one input set (the runner rotates
    several so repeated calls do not hit a warm L2); ``make_outputs(inputs)``
    pre-allocates outputs; ``run(inputs, outputs, backend)`` is the timed call;
    ``reference(inputs)`` is the plain torch function that eager/compile
    comparisons time; ``check(inputs, outputs)`` compares with fp64 on the CPU.
    """

    op: str
    model: str
    label: str
    size: int
    dtype: str
    set_bytes: int
    make_inputs: Callable[[torch.device, torch.Generator], Inputs]
    make_outputs: Callable[[Inputs], Inputs]
    run: Callable[[Inputs, Inputs, str | None], None]
    problem: Callable[[Inputs], Hashable]
    bytes_moved: Callable[[Inputs], int]
    flops: Callable[[Inputs], int]
    check: Callable[[Inputs, Inputs], Check]
    #: the plain torch function eager/compile comparisons time, and its arguments
    reference: Callable[..., Any] | None = None
    reference_args: Callable[[Inputs], tuple] | None = None
    compilable: bool = True
    #: the comparison rows' name prefix (``<name>-eager``, ``<name>-compile``)
    reference_name: str = "torch"
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------
# Byte / FLOP models (SPEC.md "Roofline" lines).

def routing_bytes(tokens: int, experts: int, topk: int, elem: int) -> int:
    """Read T·E logits, write T·K weights (fp32) and ids (int32)."""
    return tokens * experts * elem + tokens * topk * 8


def moe_bytes(distinct_experts: int, hidden: int, inter: int, tokens: int, topk: int, act_elem: int = 2) -> int:
    """MXFP4 weights of the experts hit (4.25 bits per weight: 4 + 8/32 scale)
    + activations in and out + routing (fp32 weights, int32 ids)."""
    weights = distinct_experts * (2 * inter * hidden + hidden * inter) * 4.25 / 8
    return int(weights) + 2 * tokens * hidden * act_elem + tokens * topk * 8


def moe_flops(tokens: int, topk: int, hidden: int, inter: int) -> int:
    return 2 * tokens * topk * (2 * inter * hidden + hidden * inter)


def mla_bytes(tokens: int, heads: int, keys: int, dim: int, d_v: int) -> int:
    """Gathered keys (bf16 rows of D) + q + out."""
    return tokens * keys * dim * 2 + tokens * heads * dim * 2 + tokens * heads * d_v * 2


def mla_flops(tokens: int, heads: int, keys: int, dim: int, d_v: int) -> int:
    return 2 * tokens * heads * keys * (dim + d_v)


def topk_bytes(tokens: int, width: int | None, topk: int) -> int:
    """Read the logits (none on the short-circuit) and seq_lens, write the indices."""
    return tokens * (width or 0) * 4 + tokens * 4 + tokens * topk * 4


# --------------------------------------------------------------------------
# Models.

@dataclass(frozen=True)
class MoeModel:
    experts: int
    topk: int
    hidden: int
    inter: int
    activation: str
    limit: float | None
    gate_up: str
    bias: bool


MOE_MODELS = {
    "gpt-oss-20b": MoeModel(32, 4, 2880, 2880, "swigluoai", 7.0, "interleaved", True),
    "gpt-oss-120b": MoeModel(128, 4, 2880, 2880, "swigluoai", 7.0, "interleaved", True),
    "dsv4-flash": MoeModel(256, 6, 4096, 2048, "silu", 10.0, "concatenated", False),
    "gemma4-26b-a4b": MoeModel(128, 8, 2816, 704, "silu", None, "concatenated", False),
}


@dataclass(frozen=True)
class MlaModel:
    dim: int
    heads: tuple[int, ...]
    topk: int
    extra: int


MLA_MODELS = {
    "dsv32": MlaModel(576, (16, 64, 128), 2048, 0),
    "dsv4-flash": MlaModel(512, (64,), 512, 128),
    "dsv4-pro": MlaModel(512, (128,), 1024, 128),
}

MODELS: dict[str, tuple[str, ...]] = {
    "gemma4_routing": ("gemma4-26b-a4b",),
    "mxfp4_moe": tuple(MOE_MODELS),
    "sparse_mla_decode": tuple(MLA_MODELS),
    "sparse_topk": ("dsv32",),
}

ROUTING_TOKENS = (1, 16, 128, 1024, 8192, 65536, 262144)
MOE_TOKENS = (1, 8, 64, 512, 4096, 16384)
MLA_TOKENS = (1, 8, 64, 128, 512)
TOPK_WIDTHS = (8192, 32768, 131072)


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------
# gemma4_routing

def routing_case(tokens: int, dtype: torch.dtype, experts: int = 128, topk: int = 8) -> BenchCase:
    elem = torch.finfo(dtype).bits // 8
    name = str(dtype).removeprefix("torch.")

    def make_inputs(device, gen):
        return {"logits": torch.randn(tokens, experts, generator=gen).to(dtype).to(device),
                "scale": (torch.rand(experts, generator=gen) + 0.5).to(device)}

    def make_outputs(inp):
        device = inp["logits"].device
        return {"weights": torch.empty(tokens, topk, device=device),
                "ids": torch.empty(tokens, topk, dtype=torch.int32, device=device)}

    def run(inp, out, backend):
        rocmoe.gemma4_routing(inp["logits"], topk, inp["scale"], out_weights=out["weights"], out_ids=out["ids"],
                              backend=backend)

    def check(inp, out):
        rows = slice(0, min(tokens, 4096))  # an fp64 sort of 262144 rows on the CPU is slow and adds nothing
        ref_w, ref_ids = gemma4_routing_torch(inp["logits"][rows].cpu().double(), topk,
                                              inp["scale"].cpu().double(), torch.float64)
        ids_ok = torch.equal(out["ids"][rows].cpu(), ref_ids)
        w = out["weights"][rows].cpu().double()
        ok = ids_ok and torch.allclose(w, ref_w, rtol=1e-5, atol=1e-6)
        return Check(ok, f"ids {'exact' if ids_ok else 'DIFFER'}, max|dw| {float((w - ref_w).abs().max()):.1e}")

    return BenchCase(
        op="gemma4_routing", model="gemma4-26b-a4b", label=f"T={tokens} E={experts} K={topk} {name}",
        size=tokens, dtype=name, set_bytes=tokens * experts * elem,
        make_inputs=make_inputs, make_outputs=make_outputs, run=run,
        problem=lambda inp: routing_op.problem_of(inp["logits"], topk, inp["scale"]),
        bytes_moved=lambda inp: routing_bytes(tokens, experts, topk, elem), flops=lambda inp: 0,
        check=check, reference=gemma4_routing_torch,
        reference_args=lambda inp: (inp["logits"], topk, inp["scale"]),
    )


# --------------------------------------------------------------------------
# mxfp4_moe

def random_mxfp4_weights(num_experts: int, hidden: int, inter: int, gate_up: str, bias: bool,
                         device: torch.device, gen: torch.Generator) -> rocmoe.Mxfp4MoeWeights:
    """Random MXFP4 experts with realistic magnitudes (scales near 2**-7, so a
    dot over a few thousand elements stays O(1)); built on the CPU generator."""

    def packed(rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (num_experts, rows, k // 2), generator=gen, dtype=torch.uint8)
        scales = torch.randint(117, 122, (num_experts, rows, k // 32), generator=gen, dtype=torch.uint8)
        return blocks.to(device), scales.to(device)

    w1b, w1s = packed(2 * inter, hidden)
    w2b, w2s = packed(hidden, inter)
    b1 = b2 = None
    if bias:
        b1 = (torch.randn(num_experts, 2 * inter, generator=gen) * 0.1).to(device)
        b2 = (torch.randn(num_experts, hidden, generator=gen) * 0.1).to(device)
    return rocmoe.Mxfp4MoeWeights(w1b, w1s, w2b, w2s, b1=b1, b2=b2, gate_up=gate_up)


def _uniform_ids(tokens: int, experts: int, topk: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform random routing: k distinct experts per token."""
    return torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices.int()


def bf16_experts(layout: TorchMoeWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's experts (in the torch backend's layout) dequantised to bf16,
    expert by expert (a whole-layer dequantisation would need fp32 temporaries
    of 4x the bf16 size): W1 rows ordered [gate; up] [E, 2I, H], W2 [E, H, I]."""
    num_experts, two_i, half_h = layout.w1_blocks.shape
    device = layout.w1_blocks.device
    w1 = torch.empty(num_experts, two_i, 2 * half_h, dtype=torch.bfloat16, device=device)
    w2 = torch.empty(num_experts, 2 * half_h, two_i // 2, dtype=torch.bfloat16, device=device)
    for e in range(num_experts):
        w1[e] = dequantize_mxfp4(layout.w1_blocks[e], layout.w1_scales[e])
        w2[e] = dequantize_mxfp4(layout.w2_blocks[e], layout.w2_scales[e])
    return w1, w2


def moe_bf16_grouped_mm(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor | None,
                        b2: torch.Tensor | None, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        activation: str, limit: float | None, alpha: float = 1.702) -> torch.Tensor:
    """The path a user without MXFP4 kernels takes: the same MoE with bf16
    weights (``bf16_experts``) through ``torch._grouped_mm``, tokens sorted by
    expert on the GPU (no host sync, so it can be graph-captured).

    Args: x [M, H] bf16; w1 [E, 2I, H] and w2 [E, H, I] bf16; b1 [E, 2I] / b2
    [E, H] fp32 or None (b1 in [gate; up] order); topk_weights [M, k] fp32;
    topk_ids [M, k] int. Returns [M, H] bf16.
    """
    from rocmoe.backends.torch.mxfp4_moe import activate

    num_tokens, topk = topk_ids.shape
    num_experts, inter = w1.shape[0], w2.shape[2]
    flat = topk_ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    tokens = order // topk
    h = torch._grouped_mm(x[tokens], w1.transpose(1, 2), offs=offsets).float()
    if b1 is not None:
        h += b1[experts]
    a = activate(h[:, :inter], h[:, inter:], activation, alpha, limit).to(torch.bfloat16)
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offsets).float()
    if b2 is not None:
        y += b2[experts]
    y *= topk_weights.flatten()[order, None]
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, tokens, y).to(torch.bfloat16)


def moe_case(model_name: str, tokens: int) -> BenchCase:
    m = MOE_MODELS[model_name]

    def make_inputs(device, gen):
        return {"weights": random_mxfp4_weights(m.experts, m.hidden, m.inter, m.gate_up, m.bias, device, gen),
                "x": torch.randn(tokens, m.hidden, generator=gen).to(torch.bfloat16).to(device),
                "ids": _uniform_ids(tokens, m.experts, m.topk, gen).to(device),
                "topk_weights": torch.softmax(torch.randn(tokens, m.topk, generator=gen), -1).to(device)}

    def make_outputs(inp):
        return {"out": torch.empty(tokens, m.hidden, dtype=torch.bfloat16, device=inp["x"].device)}

    def run(inp, out, backend):
        rocmoe.mxfp4_moe(inp["x"], inp["weights"], inp["topk_weights"], inp["ids"], activation=m.activation,
                         limit=m.limit, out=out["out"], backend=backend)

    def check(inp, out):
        w = inp["weights"]
        rows = slice(0, min(tokens, 64))  # 64 tokens decide
        # The torch backend's computation, where the weights live: fp32 on a GPU
        # (an fp64 CPU pass over 256 experts of 4096 x 2048 takes minutes), fp64 on the CPU.
        wide = torch.float64 if w.device.type == "cpu" else torch.float32
        ref = mxfp4_moe_torch(inp["x"][rows], torch_moe.prepare(w), inp["topk_weights"][rows], inp["ids"][rows],
                              activation=m.activation, limit=m.limit, compute_dtype=wide).cpu()
        err = _rel_l2(out["out"][rows], ref)
        return Check(err <= 1e-2, f"rel-L2 {err:.1e}")

    def distinct(inp):
        return int(torch.unique(inp["ids"]).numel())

    def reference_args(inp):
        if "bf16_layer" not in inp:  # built on first use, freed with the input set
            layout = torch_moe.prepare(inp["weights"])
            inp["bf16_layer"] = (*bf16_experts(layout), layout.b1 if m.bias else None, layout.b2 if m.bias else None)
        w1, w2, b1, b2 = inp["bf16_layer"]
        return inp["x"], w1, w2, b1, b2, inp["topk_weights"], inp["ids"], m.activation, m.limit

    return BenchCase(
        op="mxfp4_moe", model=model_name, label=f"M={tokens} E={m.experts} k={m.topk} H={m.hidden} I={m.inter}",
        size=tokens, dtype="bf16", set_bytes=int(m.experts * 3 * m.inter * m.hidden * 4.25 / 8),
        make_inputs=make_inputs, make_outputs=make_outputs, run=run,
        problem=lambda inp: moe_op._problem(torch.bfloat16, inp["weights"], m.topk, m.activation, False, False),
        bytes_moved=lambda inp: moe_bytes(distinct(inp), m.hidden, m.inter, tokens, m.topk),
        flops=lambda inp: moe_flops(tokens, m.topk, m.hidden, m.inter),
        check=check, compilable=False,
        reference=moe_bf16_grouped_mm if hasattr(torch, "_grouped_mm") else None,
        reference_args=reference_args, reference_name="bf16-grouped-mm",
    )


# --------------------------------------------------------------------------
# sparse_mla_decode

def mla_shapes(model_name: str, heads: int, tokens: int, block_size: int = 64) -> dict[str, tuple[int, ...]]:
    """The shapes of an MLA benchmark case's inputs (q, cache, indices, and
    for V4 extra_cache, extra_indices): each query's keys live in a cache
    region of their own, twice its top-k, so no query reuses another's rows
    from L2. bf16 tensors, int32 index lists."""
    m = MLA_MODELS[model_name]
    blocks_per_query = -(-m.topk // block_size) * 2
    shapes = {"q": (tokens, heads, m.dim), "cache": (tokens * blocks_per_query, block_size, m.dim),
              "indices": (tokens, m.topk)}
    if m.extra:
        shapes |= {"extra_cache": (-(-m.extra // block_size) * tokens, block_size, m.dim),
                   "extra_indices": (tokens, m.extra)}
    return shapes


def mla_case(model_name: str, heads: int, tokens: int, block_size: int = 64) -> BenchCase:
    m = MLA_MODELS[model_name]
    d_v = 512  # SPEC §3: V3.2 reads V from the first 512 of 576 columns; V4 from the whole 512-wide row
    keys = m.topk + m.extra
    scale = 1.0 / math.sqrt(m.dim)
    shapes = mla_shapes(model_name, heads, tokens, block_size)

    def make_inputs(device, gen):
        region = shapes["cache"][0] // tokens * block_size
        cache = torch.randn(shapes["cache"], generator=gen).to(torch.bfloat16)
        picks = torch.rand(tokens, region, generator=gen).argsort(dim=1)[:, : m.topk]
        indices = (picks + torch.arange(tokens)[:, None] * region).int()
        inp = {"q": torch.randn(shapes["q"], generator=gen).to(torch.bfloat16).to(device),
               "cache": cache.to(device), "indices": indices.to(device)}
        if m.extra:
            extra_cache = torch.randn(shapes["extra_cache"], generator=gen).to(torch.bfloat16)
            inp["extra_cache"] = extra_cache.to(device)
            inp["extra_indices"] = (torch.arange(m.extra)[None, :] + torch.arange(tokens)[:, None]
                                    * (shapes["extra_cache"][0] // tokens) * block_size).int().to(device)
        return inp

    def make_outputs(inp):
        device = inp["q"].device
        return {"out": torch.empty(tokens, heads, d_v, dtype=torch.bfloat16, device=device),
                "lse": torch.empty(tokens, heads, device=device)}

    def call(inp, backend=None, **outs):
        return rocmoe.sparse_mla_decode(inp["q"], inp["cache"], inp["indices"], softmax_scale=scale, d_v=d_v,
                                        extra_kv_cache=inp.get("extra_cache"),
                                        extra_indices=inp.get("extra_indices"), backend=backend, **outs)

    def check(inp, out):
        rows = slice(0, min(tokens, 16))
        cpu = {k: v[rows].cpu() if k in ("q", "indices", "extra_indices") else v.cpu() for k, v in inp.items()}
        ref_out, ref_lse = sparse_mla_decode_torch(cpu["q"], cpu["cache"], cpu["indices"], scale, d_v,
                                                   extra_kv_cache=cpu.get("extra_cache"),
                                                   extra_indices=cpu.get("extra_indices"),
                                                   compute_dtype=torch.float64)
        got = out["out"][rows].cpu().double()
        err = _rel_l2(got, ref_out)
        lse_err = float((out["lse"][rows].cpu().double() - ref_lse).abs().max())
        ok = torch.allclose(got, ref_out, atol=2e-2, rtol=2e-2) and err <= 5e-3 and lse_err <= 1e-3
        return Check(ok, f"rel-L2 {err:.1e}, max|dlse| {lse_err:.1e}")

    extra_label = f"+{m.extra}" if m.extra else ""
    return BenchCase(
        op="sparse_mla_decode", model=model_name,
        label=f"T={tokens} H={heads} D={m.dim} topk={m.topk}{extra_label} bs={block_size}",
        size=tokens, dtype="bf16", set_bytes=mla_bytes(tokens, heads, keys, m.dim, d_v),
        make_inputs=make_inputs, make_outputs=make_outputs,
        run=lambda inp, out, backend: call(inp, backend, out=out["out"], lse_out=out["lse"]),
        problem=lambda inp: mla_op.problem_of(inp["q"], inp["cache"], inp["indices"], d_v, None, None,
                                              inp.get("extra_cache"), inp.get("extra_indices")),
        bytes_moved=lambda inp: mla_bytes(tokens, heads, keys, m.dim, d_v),
        flops=lambda inp: mla_flops(tokens, heads, keys, m.dim, d_v),
        check=check, reference=sparse_mla_decode_torch,
        reference_args=lambda inp: (inp["q"], inp["cache"], inp["indices"], scale, d_v, None, None,
                                    inp.get("extra_cache"), inp.get("extra_indices")),
        extra={"heads": heads, "scale": scale},
    )


# --------------------------------------------------------------------------
# sparse_topk

def topk_case(tokens: int, width: int | None, topk: int = 2048) -> BenchCase:
    def make_inputs(device, gen):
        if width is None:  # the short-circuit: every window fits in topk
            return {"logits": None, "lens": torch.randint(1, topk + 1, (tokens,), generator=gen).int().to(device)}
        return {"logits": torch.randn(tokens, width, generator=gen).to(device),
                "lens": torch.randint(width // 2, width + 1, (tokens,), generator=gen).int().to(device)}

    def make_outputs(inp):
        return {"out": torch.empty(tokens, topk, dtype=torch.int32, device=inp["lens"].device)}

    def run(inp, out, backend):
        rocmoe.sparse_topk(inp["logits"], inp["lens"], topk, max_seq_len=topk if width is None else None,
                           out=out["out"], backend=backend)

    def check(inp, out):
        logits = None if inp["logits"] is None else inp["logits"].cpu()
        ref = sparse_topk_torch(logits, inp["lens"].cpu(), topk)
        got = out["out"].cpu()
        same = all(set(got[t].tolist()) == set(ref[t].tolist()) for t in range(tokens))
        return Check(same, "index sets equal" if same else "index sets DIFFER")

    label = f"T={tokens} short-circuit topk={topk}" if width is None else f"T={tokens} L={width} topk={topk}"
    return BenchCase(
        op="sparse_topk", model="dsv32", label=label, size=width or 0, dtype="fp32",
        set_bytes=topk_bytes(tokens, width, topk), make_inputs=make_inputs, make_outputs=make_outputs, run=run,
        problem=lambda inp: topk_op.problem_of(inp["logits"], topk, None),
        bytes_moved=lambda inp: topk_bytes(tokens, width, topk), flops=lambda inp: 0,
        check=check, reference=_window_topk if width is None else _masked_topk,
        reference_args=lambda inp: (inp["lens"], topk) if width is None else (inp["logits"], inp["lens"], topk),
    )


def _masked_topk(logits: torch.Tensor, lens: torch.Tensor, topk: int) -> torch.Tensor:
    """What a user writes without rocmoe: torch.topk over the masked window."""
    cols = torch.arange(logits.shape[1], device=logits.device)
    return torch.topk(logits.masked_fill(cols >= lens[:, None], float("-inf")), topk, dim=1).indices


def _window_topk(lens: torch.Tensor, topk: int) -> torch.Tensor:
    """The short-circuit written in torch: 0..len-1 then -1."""
    slots = torch.arange(topk, device=lens.device)
    return torch.where(slots < lens[:, None], slots, -1)


def cases_for(op: str, model: str | None = None) -> list[BenchCase]:
    """Every case of ``op`` (optionally one model) at SPEC.md's shapes."""
    if op not in MODELS:
        raise ValueError(f"unknown op {op!r}")
    if model is not None and model not in MODELS[op]:
        return []
    if op == "gemma4_routing":
        return [routing_case(t, d) for d in (torch.float32, torch.bfloat16) for t in ROUTING_TOKENS]
    if op == "mxfp4_moe":
        names = [model] if model else list(MOE_MODELS)
        return [moe_case(n, t) for n in names for t in MOE_TOKENS]
    if op == "sparse_mla_decode":
        names = [model] if model else list(MLA_MODELS)
        return [mla_case(n, h, t) for n in names for h in MLA_MODELS[n].heads for t in MLA_TOKENS]
    if op == "sparse_topk":
        return [topk_case(t, w) for t in (1, 64) for w in TOPK_WIDTHS] + [topk_case(64, None)]
    raise ValueError(f"unknown op {op!r}")
