"""How far gemma4_routing is from a streaming floor, on a CUDA GPU, in one run (a
developer tool: ``python ci/routing_floor.py [--tokens T ...]``).

The floor kernel reads the same [T, E] logits in tiles of BLOCK_T tokens and
writes the same [T, K] weights and ids, with a row max in place of the
selection; the best of its tile shapes is taken. Both are timed under
CUDA-graph replay, rotating input sets past L2, as a fraction of the copy
bandwidth measured in the same run."""

from __future__ import annotations

import argparse
import functools

import torch
import triton
import triton.language as tl

from rocmoe.backends.triton.gemma4_routing import SPEC, launch
from rocmoe.bench.timing import measure_ceilings, rotating_sets, time_graph
from rocmoe.device import Device


@triton.jit
def floor_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, E: tl.constexpr, K: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < num_tokens
    x = tl.load(logits_ptr + rows[:, None] * E + tl.arange(0, E)[None, :], mask=ok[:, None], other=0.0)
    peak = tl.max(x.to(tl.float32), axis=1)
    out = rows[:, None] * K + tl.arange(0, K)[None, :]
    tl.store(weights_ptr + out, peak[:, None] + tl.zeros([BLOCK_T, K], tl.float32), mask=ok[:, None])
    tl.store(ids_ptr + out, peak[:, None].to(tl.int32) + tl.zeros([BLOCK_T, K], tl.int32), mask=ok[:, None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 65536, 262144])
    parser.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"])
    args = parser.parse_args()
    experts, topk = 128, 8
    device = torch.device("cuda")
    copy = measure_ceilings(device).copy_bytes_per_s
    print(f"copy {copy / 1e9:.0f} GB/s")
    gen = torch.Generator().manual_seed(0)
    for dtype in [getattr(torch, name) for name in args.dtype]:
        for tokens in args.tokens:
            nbytes = tokens * experts * dtype.itemsize + tokens * topk * 8
            sets = rotating_sets(device, tokens * experts * dtype.itemsize)
            logits = [torch.randn(tokens, experts, generator=gen).to(dtype).to(device) for _ in range(sets)]
            scale = (torch.rand(experts, generator=gen) + 0.5).to(device)
            weights = torch.empty(tokens, topk, device=device)
            ids = torch.empty(tokens, topk, dtype=torch.int32, device=device)
            floor = min(
                (time_graph([functools.partial(floor_kernel[(triton.cdiv(tokens, block_t),)], x, weights, ids,
                                               tokens, experts, topk, block_t, num_warps=warps) for x in logits],
                            device), block_t, warps)
                for block_t in (4, 8, 16, 32) for warps in (1, 2, 4))
            config, _ = SPEC.choose(Device.of(logits[0]), tokens=tokens, experts=experts,
                                    logit_bits=8 * dtype.itemsize)
            routing = time_graph([functools.partial(launch, x, topk, scale, weights, ids, config) for x in logits],
                                 device)
            print(f"{str(dtype)[6:]:9s} T={tokens:<7d} floor (BLOCK_T={floor[1]}, {floor[2]} warps) "
                  f"{floor[0] * 1e6:7.2f} us {nbytes / floor[0] / copy:6.1%}   routing {config} "
                  f"{routing * 1e6:7.2f} us {nbytes / routing / copy:6.1%}")


if __name__ == "__main__":
    main()
