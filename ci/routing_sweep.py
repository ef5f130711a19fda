"""Time gemma4_routing launch configs on a CUDA GPU under CUDA-graph replay, with the
device copy bandwidth measured in the same run (a developer tool:
``python ci/routing_sweep.py --tokens 128 262144 --config 32,4,8,32 ...``)."""

from __future__ import annotations

import argparse
import functools

import torch

from rocmoe.backends.triton.gemma4_routing import SPEC, RoutingConfig, launch
from rocmoe.bench.timing import measure_ceilings, rotating_sets, time_graph
from rocmoe.device import Device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 1024, 8192, 65536, 262144])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--config", nargs="*", default=[], help="BLOCK_T,warps,LANES,KEY_BITS (default: the chosen)")
    parser.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--once", action="store_true", help="one launch per config, untimed (for a profiler)")
    args = parser.parse_args()
    device = torch.device("cuda")
    ceilings = None if args.once else measure_ceilings(device)
    if ceilings:
        print(f"copy {ceilings.copy_bytes_per_s / 1e9:.0f} GB/s")
    gen = torch.Generator().manual_seed(0)
    for dtype in [getattr(torch, name) for name in args.dtype]:
        for tokens in args.tokens:
            sets = rotating_sets(device, tokens * args.experts * dtype.itemsize)
            logits = [torch.randn(tokens, args.experts, generator=gen).to(dtype).to(device) for _ in range(sets)]
            scale = (torch.rand(args.experts, generator=gen) + 0.5).to(device)
            w = torch.empty(tokens, args.topk, device=device)
            ids = torch.empty(tokens, args.topk, dtype=torch.int32, device=device)
            chosen, _ = SPEC.choose(Device.of(logits[0]), tokens=tokens, experts=args.experts,
                                    logit_bits=8 * dtype.itemsize)
            configs = [chosen] + [RoutingConfig(*map(int, c.split(","))) for c in args.config]
            nbytes = tokens * args.experts * dtype.itemsize + tokens * args.topk * 8
            for config in configs:
                calls = [functools.partial(launch, x, args.topk, scale, w, ids, config) for x in logits]
                if args.once:
                    calls[0]()
                    torch.cuda.synchronize()
                    continue
                seconds = time_graph(calls, device)
                print(f"{str(dtype)[6:]:9s} T={tokens:<7d} {config}  {seconds * 1e6:8.2f} us  "
                      f"{nbytes / seconds / ceilings.copy_bytes_per_s * 100:5.1f}% copy")


if __name__ == "__main__":
    main()
