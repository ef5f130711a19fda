"""Independent fp64 references for the tests: plain loops over small inputs,
written from SPEC.md without reusing any backend code."""

from __future__ import annotations

import math

import torch

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def e8m0(s: int) -> float:
    return math.nan if s == 255 else math.ldexp(1.0, s - 127)


def dequant_loop(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/2] + [R, K/32] -> float64 [R, K], one element at a time."""
    rows, half = blocks.shape
    out = torch.empty(rows, half * 2, dtype=torch.float64)
    b, s = blocks.tolist(), scales.tolist()
    for r in range(rows):
        for i in range(half * 2):
            byte = b[r][i // 2]
            code = byte & 0xF if i % 2 == 0 else byte >> 4
            out[r, i] = E2M1[code] * e8m0(s[r][i // 32])
    return out


def routing_ref(logits: torch.Tensor, topk: int, scale: torch.Tensor):
    """-> (weights float64 [T, K], ids int64 [T, K])."""
    rows = logits.double().tolist()
    sc = scale.double().tolist()
    weights, ids = [], []
    for row in rows:
        # Python's -0.0 == 0.0, so the zeros tie and the id breaks it.
        chosen = sorted(range(len(row)), key=lambda e: (-row[e], e))[:topk]
        m = max(row[e] for e in chosen)
        ex = [math.exp(row[e] - m) for e in chosen]
        total = sum(ex)
        weights.append([v / total * sc[e] for v, e in zip(ex, chosen)])
        ids.append(chosen)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids)


def mla_ref(q, cache, indices, scale, d_v, topk_length=None, sink=None, extra_cache=None,
            extra_indices=None, extra_topk_length=None):
    """-> (out float64 [T, H, d_v], lse float64 [T, H]); cache 3-D."""
    num_tokens, heads, dim = q.shape

    def rows_of(c, idx, length, t):
        flat = c.reshape(-1, dim).double()
        keys = []
        for j, i in enumerate(idx[t].tolist()):
            if length is not None and j >= int(length[t]):
                continue
            if 0 <= i < flat.shape[0]:
                keys.append(flat[i])
        return keys

    out = torch.zeros(num_tokens, heads, d_v, dtype=torch.float64)
    lse = torch.full((num_tokens, heads), math.inf, dtype=torch.float64)
    for t in range(num_tokens):
        keys = rows_of(cache, indices, topk_length, t)
        if extra_cache is not None:
            keys += rows_of(extra_cache, extra_indices, extra_topk_length, t)
        if not keys:
            continue
        k = torch.stack(keys)
        for h in range(heads):
            s = [float(q[t, h].double() @ key) * scale for key in k]
            m = max(s)
            total = sum(math.exp(v - m) for v in s)
            l = m + math.log(total)
            o = sum(math.exp(v - l) * key[:d_v] for v, key in zip(s, k))
            if sink is not None:
                o = o / (1.0 + math.exp(float(sink[h]) - l))  # = exp(l) / (exp(l) + exp(sink))
            out[t, h] = o
            lse[t, h] = l
    return out, lse


def moe_ref(x, w1b, w1s, w2b, w2s, b1, b2, gate_up, topk_weights, topk_ids, activation, alpha, limit,
            expert_map=None, apply_on_input=False):
    """Token-by-token, slot-by-slot fp64 MoE -> float64 [M, H] (before the cast)."""
    num_experts = w1b.shape[0]
    inter = w1b.shape[1] // 2
    deq1 = {}
    deq2 = {}
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for m in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            g = int(topk_ids[m, j])
            if expert_map is not None:
                e = int(expert_map[g]) if 0 <= g < expert_map.shape[0] else -1
            else:
                e = g
            if not 0 <= e < num_experts:
                continue
            if e not in deq1:
                deq1[e] = dequant_loop(w1b[e], w1s[e])
                deq2[e] = dequant_loop(w2b[e], w2s[e])
            xin = x[m].double()
            w = float(topk_weights[m, j])
            if apply_on_input:
                xin = (xin * w).to(x.dtype).double()
            h = deq1[e] @ xin + (b1[e].double() if b1 is not None else 0.0)
            if gate_up == "interleaved":
                gate, up = h[0::2], h[1::2]
            else:
                gate, up = h[:inter], h[inter:]
            if limit is not None:
                gate = gate.clamp(max=limit)
                up = up.clamp(-limit, limit)
            if activation == "swigluoai":
                a = gate / (1 + torch.exp(-alpha * gate)) * (up + 1)
            else:
                a = gate / (1 + torch.exp(-gate)) * up
            a = a.to(x.dtype).double()
            y = deq2[e] @ a + (b2[e].double() if b2 is not None else 0.0)
            out[m] += y if apply_on_input else w * y
    return out
