"""Where the split top-k path spends its time, per kernel, on a CUDA GPU.

For each benchmark shape (T in {1, 64}, L in {8192, 32768, 131072}, topk
2048) and a few launch configs around the one the op would choose, prints:
the whole call under CUDA-graph replay, the bare ``torch.topk`` on rows
masked beforehand (the mask not timed) in the same way, and each kernel's
time from the torch profiler. A developer tool: ``python ci/topk_breakdown.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from rocmoe.backends.triton.sparse_topk import HEAD_COUNTERS, HEAD_STRIDE, choose_config, launch_select, workspace_numel
from rocmoe.bench.timing import time_graph
from rocmoe.device import Device

TOPK = 2048
INPUT_SETS = 4


def kernel_times(run, calls: int = 10) -> dict[str, float]:
    """Mean device µs per call of each kernel ``run`` launches."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            times.setdefault(event.name.split("(")[0][:40], []).append(event.device_time_total)
    return {name: statistics.fmean(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radix", type=int, nargs="*", default=None, help="RADIX_BITS to try (default: the chosen)")
    parser.add_argument("--sample", type=int, nargs="*", default=None, help="SAMPLE sizes to try (default: the chosen)")
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    for tokens in (1, 64):
        for width in (8192, 32768, 131072):
            logits = [torch.randn(tokens, width, generator=gen).to(device) for _ in range(INPUT_SETS)]
            lens = torch.randint(width // 2, width + 1, (tokens,), generator=gen).int().to(device)
            out = torch.empty(tokens, TOPK, dtype=torch.int32, device=device)
            cols = torch.arange(width, device=device)
            masked = [x.masked_fill(cols >= lens[:, None], float("-inf")) for x in logits]
            bare = time_graph([lambda m=m: torch.topk(m, TOPK, dim=1) for m in masked], device)
            chosen = choose_config(Device.of(logits[0]), tokens, width)
            configs = {chosen}
            for split in (chosen.SPLIT // 2, chosen.SPLIT * 2):
                if split > 1 and width // split >= chosen.BLOCK:
                    configs.add(dataclasses.replace(chosen, SPLIT=split))
            for block in (chosen.BLOCK * 2, chosen.BLOCK * 4):
                if chosen.SPLIT > 1 and width // chosen.SPLIT >= block:
                    configs.add(dataclasses.replace(chosen, BLOCK=block))
            if chosen.SPLIT > 1:
                # The other way to the bounds, and the other way to the slots.
                configs.add(dataclasses.replace(chosen, SAMPLE=0 if chosen.SAMPLE else 4096))
                configs.add(dataclasses.replace(chosen, AGGREGATE=1 - chosen.AGGREGATE))
            for sample in args.sample or ():
                configs.add(dataclasses.replace(chosen, SAMPLE=sample))
            for radix in args.radix or ():
                configs.add(dataclasses.replace(chosen, RADIX_BITS=radix))
            for config in sorted(configs, key=repr):
                workspace = torch.empty(workspace_numel(tokens, width, TOPK, sample=config.SAMPLE), dtype=torch.int32,
                                        device=device)
                calls = [lambda x=x, c=config, w=workspace, n=lens, o=out: launch_select(x, n, TOPK, o, c, workspace=w)
                         for x in logits]
                total = time_graph(calls, device)
                parts = kernel_times(calls[0])
                head = workspace[:tokens * HEAD_STRIDE].view(tokens, HEAD_STRIDE)
                winners, candidates = head[:, HEAD_COUNTERS].float(), head[:, HEAD_COUNTERS + 1].float()
                print(f"T={tokens} L={width} {config}{' (chosen)' if config == chosen else ''}: "
                      f"{total * 1e6:.1f} µs, bare torch.topk {bare * 1e6:.1f} µs ({bare / total:.2f}x), "
                      f"winners/row mean {winners.mean():.0f}, candidates/row mean {candidates.mean():.0f} "
                      f"max {candidates.max():.0f} | "
                      + " ".join(f"{name.removeprefix('sparse_topk_')}={t:.1f}" for name, t in parts.items()),
                      flush=True)


if __name__ == "__main__":
    main()
