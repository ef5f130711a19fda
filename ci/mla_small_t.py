"""Where small-batch sparse_mla_decode spends its time, on a CUDA GPU, in one run (a
developer tool: ``python ci/mla_small_t.py [--tokens 1 8]``).

Per benchmark model and head count at small T, under CUDA-graph replay: the
whole call with the chosen config, the decode kernel alone and the reduce
kernel alone, the whole call with the reduce's other tiles (the six fastest),
then the whole call at other split counts; beside them one and
two minimal Triton kernels (what launches alone cost). ``--partials fp32 half``
repeats the breakdown with each partial-output dtype of a split launch
(``HALF_PARTIALS``), one after the other."""

from __future__ import annotations

import argparse
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from rocmoe.backends.triton import sparse_mla_decode as mla
from rocmoe.bench.cases import MLA_MODELS
from rocmoe.bench.timing import time_graph
from rocmoe.device import Device


@triton.jit
def _tiny(x_ptr):
    tl.store(x_ptr + tl.arange(0, 32), tl.load(x_ptr + tl.arange(0, 32)) + 1)


class _Skip:
    """Stands in for a kernel that a timing leaves out."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def reduce_variants(calls, chosen, keys, inputs, device) -> None:
    """The whole call with other reduce tiles (heads x d_v block) and warps."""
    shipped = mla.REDUCE_BLOCK_H, mla.REDUCE_WARPS, mla.reduce_blocks
    block_s = mla.next_power_of_2(mla.key_chunks(keys, chosen)[1])  # the partials the launch writes
    results = []
    for block_h in (1, 2, 4, 8, 16):
        for tile in (1024, 2048, 4096, 8192):
            block_dv = tile // (block_s * block_h)
            if not 16 <= block_dv <= 512:
                continue
            for warps in (1, 2, 4, 8):
                if not 4 <= tile // (32 * warps) <= 64:
                    continue
                mla.REDUCE_BLOCK_H, mla.REDUCE_WARPS = block_h, warps
                mla.reduce_blocks = lambda split, dv=block_dv: (mla.next_power_of_2(split), dv)
                seconds = time_graph(calls(chosen), device)
                results.append((seconds, block_h, block_dv, warps, inputs.check(chosen)))
    mla.REDUCE_BLOCK_H, mla.REDUCE_WARPS, mla.reduce_blocks = shipped
    for seconds, block_h, block_dv, warps, ok in sorted(results)[:6]:
        print(f"{'':20s} reduce BLOCK_H={block_h} BLOCK_DV={block_dv} warps={warps}: whole {seconds * 1e6:6.1f} us "
              f"{'ok' if ok else 'WRONG'}", flush=True)


def breakdown(calls, chosen, device) -> tuple[float, float, float]:
    """Seconds under graph replay of the whole call, the decode kernel alone and the reduce alone."""
    decode, reduce = mla.sparse_mla_decode_kernel, mla.sparse_mla_reduce_kernel
    gluon, pingpong_kernel = mla._gluon_kernel, mla._pingpong_kernel
    pingpong = pingpong_kernel()
    whole = time_graph(calls(chosen), device)
    mla.sparse_mla_reduce_kernel = _Skip()
    alone = time_graph(calls(chosen), device)
    # The reduce alone: whichever decode kernel the config launches is skipped.
    mla.sparse_mla_reduce_kernel, mla.sparse_mla_decode_kernel = reduce, _Skip()
    mla._gluon_kernel, mla._pingpong_kernel = _Skip, lambda: pingpong and (_Skip(), pingpong[1])
    try:
        tail = time_graph(calls(chosen), device)
    finally:
        mla.sparse_mla_decode_kernel, mla._gluon_kernel, mla._pingpong_kernel = decode, gluon, pingpong_kernel
    return whole, alone, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=list(MLA_MODELS))
    parser.add_argument("--warm", action="store_true",
                        help="one input set, so every call finds its inputs in L2 (cold DRAM reads are the default)")
    parser.add_argument("--no-sweep", action="store_true", help="only the chosen config's breakdown")
    parser.add_argument("--partials", nargs="+", choices=("fp32", "half"), default=None,
                        help="the breakdown with fp32 and/or 16-bit partial outputs, one after the other "
                             "(default: the shipped choice alone)")
    args = parser.parse_args()
    device = torch.device("cuda")
    x = torch.zeros(32, device=device)
    one = time_graph([lambda: _tiny[(1,)](x)], device, calls_per_graph=100)
    two = time_graph([lambda: (_tiny[(1,)](x), _tiny[(1,)](x))], device, calls_per_graph=100)
    print(f"minimal kernel {one * 1e6:.2f} us, two in a row {two * 1e6:.2f} us", flush=True)
    gen = torch.Generator().manual_seed(0)
    gpu = Device.current()
    shipped_partials = mla.HALF_PARTIALS
    for name in args.models:
        model = MLA_MODELS[name]
        keys = model.topk + model.extra
        for heads in model.heads:
            for tokens in args.tokens:
                inputs = mla.TUNING.make_inputs(mla._regime(gpu, tokens, heads, keys, model.dim), device, gen)
                chosen = mla.launch_config(gpu, tokens, heads, keys, model.dim)

                def calls(cfg, inputs=inputs):
                    sets = 1 if args.warm else inputs.num_sets
                    return [functools.partial(inputs.launch, cfg, i) for i in range(sets)]

                for partials in args.partials or [None]:
                    if partials is not None:
                        mla.HALF_PARTIALS = partials == "half"
                    whole, alone, tail = breakdown(calls, chosen, device)
                    label = "" if partials is None else f" {partials} partials"
                    print(f"{name:10s} H={heads:<3d} T={tokens:<2d} {chosen}{label}: whole {whole * 1e6:6.1f} us, "
                          f"decode {alone * 1e6:6.1f}, reduce {tail * 1e6:6.1f}  "
                          f"{'ok' if inputs.check(chosen) else 'WRONG'}", flush=True)
                mla.HALF_PARTIALS = shipped_partials
                if args.no_sweep:
                    continue
                if mla.key_chunks(keys, chosen)[1] > 1:
                    reduce_variants(calls, chosen, keys, inputs, device)
                timed = {mla.key_chunks(keys, chosen)}  # splits that cut the keys alike launch alike
                for split in (1, 2, 4, 8, 16, 32, 64):
                    cfg = dataclasses.replace(chosen, SPLIT=split)
                    if mla.key_chunks(keys, cfg) in timed or keys // split < chosen.BLOCK_N:
                        continue
                    timed.add(mla.key_chunks(keys, cfg))
                    print(f"{'':20s} SPLIT={split:<3d} whole {time_graph(calls(cfg), device) * 1e6:6.1f} us",
                          flush=True)


if __name__ == "__main__":
    main()
