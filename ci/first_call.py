"""First-call latency of each op in this (fresh) process, and how many new
Triton cache entries the calls wrote - 0 means nothing was compiled.

    TRITON_CACHE_DIR=DIR python3 ci/first_call.py --label NAME --json OUT

Each op runs one benchmark case (``rocmoe.bench.cases``) after its inputs are
on the GPU and synchronised, so the first call's time is the op alone: Triton's
cache lookups, any compiling (kernel and launcher), loading, launching.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

import torch

import rocmoe
from rocmoe.bench.cases import cases_for

# (op, model, case label): one case per launch pipeline.
PICKS = [
    ("gemma4_routing", None, "T=128 E=128 K=8 bfloat16"),
    ("sparse_topk", None, "T=64 L=32768 topk=2048"),
    ("sparse_topk", None, "T=64 short-circuit topk=2048"),
    ("sparse_mla_decode", "dsv32", "T=8 H=128 D=576 topk=2048 bs=64"),
    ("sparse_mla_decode", "dsv4-flash", "T=1 H=64 D=512 topk=512+128 bs=64"),
    ("mxfp4_moe", "gpt-oss-20b", "M=8 E=32 k=4 H=2880 I=2880"),
    ("mxfp4_moe", "gpt-oss-20b", "M=512 E=32 k=4 H=2880 I=2880"),
]


def entries(cache_dir: str) -> set[str]:
    return set(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else set()


def triton_driver() -> None:
    from triton.runtime import driver

    driver.active.get_current_target()
    driver.active.utils  # noqa: B018  # built or loaded on first touch


def backend_probes() -> None:
    from rocmoe.device import Device
    from rocmoe.info import collect

    collect(Device.current())


def custom_op_machinery() -> None:
    logits = torch.randn(2, 128, device="cuda")
    rocmoe.gemma4_routing(logits, 8, torch.ones(128, device="cuda"), backend="torch")
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--profile", action="store_true", help="profile the first op's first call")
    args = parser.parse_args()
    cache_dir = os.environ["TRITON_CACHE_DIR"]
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []
    # One-time process costs, timed apart so the op rows show the op alone:
    # Triton's driver (its utility module: built by gcc, or loaded from the
    # cache), rocmoe's backend probes, and torch's custom-op machinery (its
    # first call imports dynamo, sympy and more: seconds, whatever the backend).
    for name, step in (("triton driver", triton_driver), ("rocmoe backend probes", backend_probes),
                       ("torch custom-op first call (torch backend)", custom_op_machinery)):
        before = entries(cache_dir)
        start = time.perf_counter()
        step()
        took = time.perf_counter() - start
        rows.append({"op": name, "first_ms": took * 1e3, "new_cache_entries": len(entries(cache_dir) - before)})
        print(f"{args.label:12s} {name:77s} first {took * 1e3:9.1f} ms  {'':18s}"
              f"new cache entries {rows[-1]['new_cache_entries']:3d}", flush=True)
    for op, model, label in PICKS:
        case = next(c for c in cases_for(op, model) if c.label == label)
        inputs = case.make_inputs(device, gen)
        outputs = case.make_outputs(inputs)
        torch.cuda.synchronize()
        before = entries(cache_dir)
        profiler = cProfile.Profile() if args.profile and not rows[3:] else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        case.run(inputs, outputs, "triton")
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        start = time.perf_counter()
        case.run(inputs, outputs, "triton")
        torch.cuda.synchronize()
        second = time.perf_counter() - start
        check = case.check(inputs, outputs)
        rows.append({"op": op, "model": case.model, "case": case.label, "first_ms": first * 1e3,
                     "second_ms": second * 1e3, "new_cache_entries": len(entries(cache_dir) - before),
                     "check": check.ok})
        print(f"{args.label:12s} {op:18s} {case.model:12s} {case.label:45s} first {first * 1e3:9.1f} ms  "
              f"second {second * 1e3:7.3f} ms  new cache entries {rows[-1]['new_cache_entries']:3d}  "
              f"check {'ok' if check.ok else 'FAILED ' + check.detail}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"label": args.label, "rocmoe": rocmoe.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
