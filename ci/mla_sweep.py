"""Time sparse_mla_decode launch configs on a CUDA GPU under CUDA-graph replay,
each checked first with the tuner's check (the fp32 torch reference), with the copy bandwidth
and matmul rate measured in the same run (a developer tool:
``python ci/mla_sweep.py --model dsv32 --heads 128 --tokens 8 64 --config 32,32,8,2,1 ...``)."""

from __future__ import annotations

import argparse
import functools

import torch

from rocmoe.backends.triton.sparse_mla_decode import TUNING, MlaConfig, _regime, launch_config
from rocmoe.bench.cases import MLA_MODELS, mla_flops
from rocmoe.bench.timing import measure_ceilings, time_graph
from rocmoe.device import Device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dsv32", choices=sorted(MLA_MODELS))
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 128])
    parser.add_argument("--config", nargs="*", default=[],
                        help="BLOCK_H,BLOCK_N,warps,stages,SPLIT[,IDS_AHEAD[,DV_SPLIT[,WGMMA[,PINGPONG]]]] (SPLIT 0: "
                             "the chosen config's)")
    parser.add_argument("--only", action="store_true", help="time only --config, not the chosen config")
    parser.add_argument("--once", action="store_true", help="one launch per config, untimed (for a profiler)")
    args = parser.parse_args()
    model = MLA_MODELS[args.model]
    heads = args.heads or model.heads[-1]
    device = torch.device("cuda")
    if args.once:
        ceilings = None
    else:
        ceilings = measure_ceilings(device)
        print(f"{torch.cuda.get_device_name()}: copy {ceilings.copy_bytes_per_s / 1e9:.0f} GB/s, "
              f"bf16 matmul {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s")
    gen = torch.Generator().manual_seed(0)
    keys = model.topk + model.extra
    gpu = Device.current()
    for tokens in args.tokens:
        # The tuner's inputs, launch and reference check for this regime, so
        # the sweep and `rocmoe tune` judge a config the same way.
        regime = _regime(gpu, tokens, heads, keys, model.dim)
        inputs = TUNING.make_inputs(regime, device, gen)
        chosen = launch_config(gpu, tokens, heads, keys, model.dim)
        configs = [] if args.only else [chosen]
        for text in args.config:
            fields = [*map(int, text.split(","))]
            bh, bn, warps, stages, split, ahead, dv_split, wgmma, pingpong = fields + [0, 1, 0, 0][len(fields) - 5:]
            configs.append(MlaConfig(bh, bn, warps, stages, split or chosen.SPLIT, bool(ahead), dv_split, bool(wgmma),
                                     bool(pingpong)))
        key_bytes = tokens * keys * model.dim * 2
        for config in configs:
            if args.once:
                inputs.launch(config, 0)
                torch.cuda.synchronize()
                continue
            try:
                ok = inputs.check(config)
                seconds = time_graph([functools.partial(inputs.launch, config, i) for i in range(inputs.num_sets)],
                                     device)
            except Exception as exc:  # a config that fails to compile or launch is a result
                print(f"T={tokens:<4d} H={heads} {config}  FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            flops = mla_flops(tokens, heads, keys, model.dim, 512) / seconds
            key_rate = key_bytes / seconds
            print(f"T={tokens:<4d} H={heads} {config}  {seconds * 1e6:8.1f} us  {flops / 1e12:6.1f} TFLOP/s "
                  f"({flops / ceilings.bf16_flops_per_s * 100:4.1f}%)  keys {key_rate / 1e9:6.0f} GB/s "
                  f"({key_rate / ceilings.copy_bytes_per_s * 100:4.1f}% copy)  {'ok' if ok else 'WRONG'}")


if __name__ == "__main__":
    main()
