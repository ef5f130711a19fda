"""Check and time the work-in-progress warp-specialised sm90 MLA kernel
(``ci/mla_pingpong_kernel.py``) against the shipped Gluon kernel, on a CUDA sm90 GPU
(a developer tool; never run yet):

    python ci/mla_pingpong.py --pytest        # the Gluon kernel's GPU feature test, run by it
    python ci/mla_pingpong.py --model dsv32 --heads 128 --tokens 8 64 512

The shipped launch (``sparse_mla_decode.launch``) is used unchanged: its Gluon kernel is
swapped for a wrapper that runs the ping-pong kernel for 64-key launches when enabled, so the
split, the reduce, the tuner's inputs and its reference check are the shipped ones. Each timed
config is checked first; both kernels are timed in the same process under CUDA-graph replay."""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from rocmoe.backends.triton import sparse_mla_decode as mla


class _Swap:
    """Stands in for the Gluon kernel in ``launch``: ``enabled`` picks the ping-pong kernel for
    launches of 64 keys a step (the others go to the shipped kernel)."""

    def __init__(self, shipped):
        from mla_pingpong_kernel import MAXNREG, sparse_mla_decode_pingpong_kernel  # beside this script

        self.shipped, self.pingpong, self.maxnreg = shipped, sparse_mla_decode_pingpong_kernel, MAXNREG
        self.enabled = True

    def __getitem__(self, grid):
        def run(*args, STAGES, P_SWIZZLE, num_warps, BLOCK_N, **kwargs):
            if not self.enabled or BLOCK_N != 64:
                return self.shipped[grid](*args, STAGES=STAGES, P_SWIZZLE=P_SWIZZLE, num_warps=num_warps,
                                          BLOCK_N=BLOCK_N, **kwargs)
            return self.pingpong[grid](*args, BLOCK_N=BLOCK_N, num_warps=4, maxnreg=self.maxnreg, **kwargs)

        return run


def _install() -> _Swap:
    swap = _Swap(mla._gluon_kernel())
    mla._gluon_kernel = lambda: swap
    return swap


def main() -> None:
    from rocmoe.bench.cases import MLA_MODELS, mla_flops
    from rocmoe.bench.timing import measure_ceilings, time_graph
    from rocmoe.device import Device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dsv32", choices=sorted(MLA_MODELS))
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--pytest", nargs=argparse.REMAINDER, default=None,
                        help="run the rest of the command line as pytest arguments, with the swap (default: the "
                        "Gluon kernel's GPU tests)")
    args = parser.parse_args()
    swap = _install()
    if args.pytest is not None:
        import pytest

        sys.exit(pytest.main(args.pytest or ["tests/test_gpu.py", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                             "-k", "wgmma_kernel or 128_heads or mla_at_spec"]))
    model = MLA_MODELS[args.model]
    heads = args.heads or model.heads[-1]
    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s")
    gen = torch.Generator().manual_seed(0)
    keys = model.topk + model.extra
    gpu = Device.current()
    for tokens in args.tokens:
        regime = mla._regime(gpu, tokens, heads, keys, model.dim)
        inputs = mla.TUNING.make_inputs(regime, device, gen)
        chosen = mla.launch_config(gpu, tokens, heads, keys, model.dim)
        config = chosen if chosen.WGMMA and chosen.BLOCK_N == 64 else mla.wgmma_config((64, 2), chosen.SPLIT)
        for enabled in (False, True, False, True):
            swap.enabled = enabled
            name = "pingpong" if enabled else "shipped "
            try:
                ok = inputs.check(config)
                seconds = time_graph([functools.partial(inputs.launch, config, i) for i in range(inputs.num_sets)],
                                     device)
            except Exception as exc:  # a failure is a result here
                print(f"T={tokens:<4d} H={heads} {name} FAILED {type(exc).__name__}: {str(exc)[:300]}")
                continue
            flops = mla_flops(tokens, heads, keys, model.dim, 512) / seconds
            print(f"T={tokens:<4d} H={heads} {name} SPLIT={config.SPLIT:<3d} {seconds * 1e6:8.1f} us "
                  f"{flops / 1e12:6.1f} TFLOP/s  {'ok' if ok else 'WRONG'}", flush=True)


if __name__ == "__main__":
    main()
