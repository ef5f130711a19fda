"""GPU checks (run with ``pytest -m gpu`` on a CUDA or ROCm machine): the
selected backend at real shapes, CUDA-graph capture, torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import is_poisoned, poison
from reference import routing_ref

import rocmoe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]


@pytest.fixture
def cuda():
    return torch.device("cuda")


def test_device_descriptor_reads_the_hardware():
    dev = rocmoe.Device.current()
    props = torch.cuda.get_device_properties(dev.index)
    assert dev.present and dev.limits.compute_units == props.multi_processor_count
    if torch.version.hip:
        assert dev.arch == props.gcnArchName.split(":")[0]
    else:
        assert dev.arch == f"sm{props.major}{props.minor}"


def test_bench_quick_cases_pass_on_gpu(cuda):
    from rocmoe.bench.quick import run_quick

    rows = run_quick(cuda, reps=5)
    assert rows and all(r["check_ok"] for r in rows), rows


@pytest.mark.parametrize("tokens", [1, 128, 65536, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routing_at_model_shapes(cuda, gen, tokens, dtype):
    logits = torch.randn(tokens, 128, generator=gen).to(dtype)
    scale = torch.rand(128, generator=gen) + 0.5
    w, ids = rocmoe.gemma4_routing(logits.to(cuda), 8, scale.to(cuda))
    sample = torch.randperm(tokens, generator=gen)[:256]
    ref_w, ref_ids = routing_ref(logits[sample], 8, scale)
    assert torch.equal(ids.cpu()[sample].long(), ref_ids)
    torch.testing.assert_close(w.cpu()[sample].double(), ref_w, rtol=1e-5, atol=1e-6)


def _replay_matches_eager(capture_fn, refill, eager_fn, outs, canonical=lambda t: t):
    """Capture once, then refill the inputs in place and replay: the graph's
    outputs must follow the new inputs. ``canonical`` maps an output to the
    form compared (for outputs whose order is unspecified)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        capture_fn()  # warm-up outside the graph (selection, conversion)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        capture_fn()
    for _ in range(2):
        refill()
        for o in outs:
            poison(o)
        graph.replay()
        torch.cuda.synchronize()
        for o in outs:
            assert not is_poisoned(o).any()
        for got, want in zip(outs, eager_fn()):
            got, want = canonical(got), canonical(want)
            if got.is_floating_point():
                torch.testing.assert_close(got, want, equal_nan=False)
            else:
                assert torch.equal(got, want)


def test_graph_capture_routing(cuda, gen):
    logits = torch.randn(64, 128, device=cuda)
    scale = torch.rand(128, device=cuda)
    out_w = torch.empty(64, 8, device=cuda)
    out_ids = torch.empty(64, 8, dtype=torch.int32, device=cuda)
    _replay_matches_eager(
        lambda: rocmoe.gemma4_routing(logits, 8, scale, out_weights=out_w, out_ids=out_ids),
        lambda: logits.copy_(torch.randn(64, 128, generator=gen).to(cuda)),
        lambda: rocmoe.gemma4_routing(logits, 8, scale), [out_w, out_ids])


def test_graph_capture_sparse_mla_decode(cuda, gen):
    q = torch.randn(4, 16, 576, device=cuda, dtype=torch.bfloat16)
    cache = torch.randn(64, 64, 576, device=cuda, dtype=torch.bfloat16)
    idx = torch.randint(-1, 4096, (4, 256), device=cuda, dtype=torch.int32)
    out = torch.empty(4, 16, 512, device=cuda, dtype=torch.bfloat16)
    lse = torch.empty(4, 16, device=cuda)

    def call(**bufs):
        return rocmoe.sparse_mla_decode(q, cache, idx, softmax_scale=0.07, **bufs)

    _replay_matches_eager(lambda: call(out=out, lse_out=lse),
                          lambda: q.copy_(torch.randn(4, 16, 576, generator=gen).to(cuda, torch.bfloat16)),
                          call, [out, lse])


def test_graph_capture_and_compile_sparse_mla_decode_at_128_heads(cuda, gen):
    # V3.2's 128 heads at T = 16: on an sm90 with the shipped table, the warp-specialised (ping-pong)
    # Gluon kernel with its key split and the reduce - captured, then under torch.compile(fullgraph=True).
    from rocmoe.backends.triton.sparse_mla_decode import launch_config

    tokens, heads = 16, 128
    q = torch.randn(tokens, heads, 576, generator=gen).to(cuda, torch.bfloat16)
    cache = torch.randn(128, 64, 576, generator=gen).to(cuda, torch.bfloat16)
    idx = torch.randint(-1, 128 * 64, (tokens, 2048), generator=gen, dtype=torch.int32).to(cuda)
    config = launch_config(rocmoe.Device.current(), tokens, heads, 2048, 576)
    if torch.version.cuda and torch.cuda.get_device_capability() == (9, 0):
        assert config.WGMMA and config.PINGPONG and config.SPLIT > 1, config
    out = torch.empty(tokens, heads, 512, device=cuda, dtype=torch.bfloat16)
    lse = torch.empty(tokens, heads, device=cuda)

    def call(**bufs):
        return rocmoe.sparse_mla_decode(q, cache, idx, softmax_scale=576 ** -0.5, backend="triton", **bufs)

    _replay_matches_eager(lambda: call(out=out, lse_out=lse),
                          lambda: q.copy_(torch.randn(tokens, heads, 576, generator=gen).to(cuda, torch.bfloat16)),
                          call, [out, lse])
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, cache, idx: rocmoe.sparse_mla_decode(q, cache, idx, softmax_scale=576 ** -0.5,
                                                                            backend="triton"), fullgraph=True)
    for got, want in zip(compiled(q, cache, idx), call()):
        torch.testing.assert_close(got, want)


def test_graph_capture_sparse_topk_with_host_bound(cuda, gen):
    lens = torch.randint(0, 2049, (64,), device=cuda, dtype=torch.int32)
    out = torch.empty(64, 2048, dtype=torch.int32, device=cuda)
    _replay_matches_eager(
        lambda: rocmoe.sparse_topk(None, lens, 2048, max_seq_len=2048, out=out),
        lambda: lens.copy_(torch.randint(0, 2049, (64,), generator=gen).to(cuda, torch.int32)),
        lambda: (rocmoe.sparse_topk(None, lens, 2048, max_seq_len=2048),), [out])


def test_torch_backend_moe_refuses_capture_clearly(cuda):
    from rocmoe.bench.cases import random_mxfp4_weights

    w = random_mxfp4_weights(4, 128, 64, "concatenated", False, cuda, torch.Generator().manual_seed(0))
    x = torch.randn(2, 128, device=cuda, dtype=torch.bfloat16)
    ids = torch.zeros(2, 1, dtype=torch.int32, device=cuda)
    tw = torch.ones(2, 1, device=cuda)
    rocmoe.mxfp4_moe(x, w, tw, ids, backend="torch")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"), torch.cuda.graph(graph):
        rocmoe.mxfp4_moe(x, w, tw, ids, backend="torch")


def test_compile_on_gpu(cuda):
    torch._dynamo.reset()
    q = torch.randn(2, 16, 512, device=cuda, dtype=torch.bfloat16)
    cache = torch.randn(8, 64, 512, device=cuda, dtype=torch.bfloat16)
    idx = torch.randint(0, 512, (2, 64), device=cuda, dtype=torch.int32)
    logits = torch.randn(32, 128, device=cuda)
    scale = torch.rand(128, device=cuda)

    def fn(q, cache, idx, logits, scale):
        out, lse = rocmoe.sparse_mla_decode(q, cache, idx, softmax_scale=0.1, d_v=448)
        w, ids = rocmoe.gemma4_routing(logits, 8, scale)
        return out, lse, w, ids

    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(q, cache, idx, logits, scale), fn(q, cache, idx, logits, scale)):
        if got.is_floating_point():
            torch.testing.assert_close(got, want)
        else:
            assert torch.equal(got, want)


def test_shape_log_skips_capture_and_histograms_asynchronously(cuda, tmp_path):
    from rocmoe import shape_log
    from rocmoe.bench.cases import random_mxfp4_weights

    shape_log._configure(tmp_path, every=1)
    try:
        logits = torch.randn(16, 128, device=cuda)
        scale = torch.rand(128, device=cuda)
        out_w = torch.empty(16, 8, device=cuda)
        out_ids = torch.empty(16, 8, dtype=torch.int32, device=cuda)
        rocmoe.gemma4_routing(logits, 8, scale, out_weights=out_w, out_ids=out_ids)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rocmoe.gemma4_routing(logits, 8, scale, out_weights=out_w, out_ids=out_ids)
        graph.replay()
        w = random_mxfp4_weights(4, 128, 64, "concatenated", False, cuda, torch.Generator().manual_seed(0))
        x = torch.randn(3, 128, device=cuda, dtype=torch.bfloat16)
        ids = torch.tensor([[0, 1], [0, 2], [0, -1]], dtype=torch.int32, device=cuda)
        rocmoe.mxfp4_moe(x, w, torch.ones(3, 2, device=cuda), ids, backend="torch")
        shape_log.flush()
        log = shape_log.load(tmp_path)
        assert [calls for _, calls in log.shapes("gemma4_routing")] == [1]  # the captured call is not counted
        (moe_shape, _), = log.shapes("mxfp4_moe")
        hist = log.histogram("mxfp4_moe", moe_shape)
        assert hist[:4] == [1, 2, 1, 0]  # expert 3 idle; experts 1, 2 one token; expert 0 three ([2, 4))
    finally:
        shape_log._configure(None, every=64)


@pytest.mark.parametrize("tokens", [1, 8, 64, 128])  # sm90: 16-head split programs, then 64-head Gluon blocks
@pytest.mark.parametrize("shape", [(576, 16, 2048, 0), (576, 64, 2048, 0), (576, 128, 2048, 0), (512, 64, 512, 128)],
                         ids=["v32-h16", "v32-h64", "v32-h128", "v4-flash"])
def test_triton_mla_at_spec_shapes(cuda, gen, tokens, shape):
    _check_mla_at_spec_shape(cuda, gen, tokens, shape)


@pytest.mark.parametrize("tokens", [1, 8])  # split launches, so partial outputs and the reduce
@pytest.mark.parametrize("shape", [(576, 64, 2048, 0), (576, 128, 2048, 0), (512, 64, 512, 128)],
                         ids=["v32-h64", "v32-h128", "v4-flash"])
def test_triton_mla_with_the_other_partial_dtype_at_spec_shapes(cuda, gen, monkeypatch, tokens, shape):
    from rocmoe.backends.triton import sparse_mla_decode as mla

    monkeypatch.setattr(mla, "HALF_PARTIALS", not mla.HALF_PARTIALS)
    _check_mla_at_spec_shape(cuda, gen, tokens, shape)


def _check_mla_at_spec_shape(cuda, gen, tokens, shape):
    from rocmoe.backends.torch.sparse_mla_decode import sparse_mla_decode_torch

    dim, heads, topk, extra = shape
    q = torch.randn(tokens, heads, dim, generator=gen).to(cuda, torch.bfloat16)
    cache = torch.randn(2 * tokens * topk // 64 + 1, 64, dim, generator=gen).to(cuda, torch.bfloat16)
    idx = torch.randint(-1, cache.shape[0] * 64, (tokens, topk), generator=gen, dtype=torch.int32).to(cuda)
    kw = {}
    if extra:
        kw = dict(extra_kv_cache=torch.randn(8, 64, dim, generator=gen).to(cuda, torch.bfloat16),
                  extra_indices=torch.randint(0, 512, (tokens, extra), generator=gen, dtype=torch.int32).to(cuda),
                  attn_sink=torch.randn(heads, generator=gen).to(cuda))
    out, lse = rocmoe.sparse_mla_decode(q, cache, idx, softmax_scale=dim ** -0.5, backend="triton", **kw)
    ref_out, ref_lse = sparse_mla_decode_torch(q, cache, idx, dim ** -0.5, 512, None, kw.get("attn_sink"),
                                               kw.get("extra_kv_cache"), kw.get("extra_indices"))
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    assert float((out.float() - ref_out).norm() / ref_out.norm()) <= 5e-3
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)


def _dv_split_tune_configs():
    from rocmoe.backends.triton.sparse_mla_decode import _TUNE_SHAPES, tune_config

    return [tune_config(shape, split) for shape in _TUNE_SHAPES if shape[-1] > 1 for split in (1, 8)]


# The sm90 tuner's candidates: up to 221 KB of shared memory a program, more than CDNA's LDS holds.
_SM90_ONLY = pytest.mark.skipif(not torch.cuda.is_available() or torch.version.cuda is None
                                or torch.cuda.get_device_capability()[0] != 9, reason="sm90's launch shapes")


@_SM90_ONLY
@pytest.mark.parametrize("config", _dv_split_tune_configs(), ids=repr)
@pytest.mark.parametrize("shape", [(576, 2048, 0), (512, 1024, 128)], ids=["v32-h128", "v4-pro"])
def test_triton_mla_dv_split_candidates_at_spec_shapes(cuda, gen, config, shape):
    # The tuner may put these in the sm90 table: each is checked at a model's size first (T = 64: one
    # program per SM without a split, and with a split and the reduce).
    from rocmoe.backends.torch.sparse_mla_decode import sparse_mla_decode_torch
    from rocmoe.backends.triton.sparse_mla_decode import launch

    dim, topk, extra = shape
    tokens, heads = 64, 128
    q = torch.randn(tokens, heads, dim, generator=gen).to(cuda, torch.bfloat16)
    cache = torch.randn(2 * tokens * topk // 64 + 1, 64, dim, generator=gen).to(cuda, torch.bfloat16)
    idx = torch.randint(-1, cache.shape[0] * 64, (tokens, topk), generator=gen, dtype=torch.int32).to(cuda)
    extra_cache = extra_idx = sink = None
    if extra:
        extra_cache = torch.randn(8, 64, dim, generator=gen).to(cuda, torch.bfloat16)
        extra_idx = torch.randint(0, 512, (tokens, extra), generator=gen, dtype=torch.int32).to(cuda)
        sink = torch.randn(heads, generator=gen).to(cuda)
    out = poison(torch.empty(tokens, heads, 512, dtype=torch.bfloat16, device=cuda))
    lse = poison(torch.empty(tokens, heads, device=cuda))
    launch(q, cache, idx, dim ** -0.5, 512, None, sink, extra_cache, extra_idx, None, out, lse, config)
    ref_out, ref_lse = sparse_mla_decode_torch(q, cache, idx, dim ** -0.5, 512, None, sink, extra_cache, extra_idx)
    assert not is_poisoned(out).any() and not is_poisoned(lse).any()
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    assert float((out.float() - ref_out).norm() / ref_out.norm()) <= 5e-3
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("width", [8192, 131072])
def test_triton_topk_at_spec_shapes(cuda, gen, tokens, width):
    logits = torch.randn(tokens, width, generator=gen).to(cuda)
    lens = torch.randint(width // 2, width + 1, (tokens,), generator=gen, dtype=torch.int32).to(cuda)
    got = rocmoe.sparse_topk(logits, lens, 2048, backend="triton")
    for t in range(tokens):
        n = int(lens[t])
        want = torch.topk(logits[t, :n], 2048).indices.sort().values
        assert torch.equal(got[t].long().sort().values, want)


def test_triton_topk_graph_capture_without_host_bound(cuda, gen):
    logits = torch.randn(4, 8192, device=cuda)
    lens = torch.tensor([100, 8192, 2048, 3000], dtype=torch.int32, device=cuda)
    out = torch.empty(4, 2048, dtype=torch.int32, device=cuda)
    _replay_matches_eager(
        lambda: rocmoe.sparse_topk(logits, lens, 2048, out=out, backend="triton"),
        lambda: logits.copy_(torch.randn(4, 8192, generator=gen).to(cuda)),
        lambda: (rocmoe.sparse_topk(logits, lens, 2048, backend="triton"),), [out],
        # Split rows reserve output slots with atomics: the order of winners may differ.
        canonical=lambda t: t.sort(dim=1).values)


def _wgmma_configs():
    from rocmoe.backends.triton.sparse_mla_decode import _WGMMA_TUNE_SHAPES, pingpong_config, wgmma_config

    # Split 3 leaves chunks of an odd number of 64-key tiles (the ping-pong kernel's last pair is half empty).
    return ([wgmma_config(shape, split) for shape in _WGMMA_TUNE_SHAPES for split in (1, 3)]
            + [pingpong_config(split) for split in (1, 3)])


@_SM90_ONLY
@pytest.mark.parametrize("config", _wgmma_configs(), ids=lambda c: (f"{'pingpong' if c.PINGPONG else 'wgmma'}-"
                                                                    f"{c.BLOCK_N}keys-{c.num_stages}stages-split{c.SPLIT}"))
@pytest.mark.parametrize("dim, extra, heads", [(576, 0, 128), (512, 40, 128), (576, 0, 80), (512, 40, 64)])
def test_triton_mla_wgmma_kernel_with_every_feature(cuda, gen, config, dim, extra, heads):
    # The Gluon kernels (the tuner may put them in the sm90 table) at the models' D: key lengths that end
    # mid-tile, -1 and out-of-range ids, NaN rows selected only past a length, V4's extra keys and the
    # sink, a query with no key, masked heads (80 = 64 + 16), with and without the split and reduce.
    from test_triton_sparse_mla_decode import _check

    from rocmoe.backends.triton.sparse_mla_decode import launch, wgmma_unsupported_reasons

    tokens, topk, rows = 5, 300, 4096
    q = torch.randn(tokens, heads, dim, generator=gen).to(torch.bfloat16)
    cache = torch.randn(rows // 64, 64, dim, generator=gen).to(torch.bfloat16)
    idx = torch.randint(-1, 3000, (tokens, topk), generator=gen, dtype=torch.int32)
    idx[0, ::7] = rows + 5  # out of range: no key
    length = torch.tensor([300, 0, 117, 1, 299], dtype=torch.int32)
    idx[2, 117:] = 3500  # past its length, pointing at NaN rows
    idx[3, 0] = -1
    kw = {"topk_length": length}
    if extra:
        kw.update(extra_kv_cache=torch.randn(8, 64, dim, generator=gen).to(torch.bfloat16),
                  extra_indices=torch.randint(-1, 515, (tokens, extra), generator=gen, dtype=torch.int32),
                  extra_topk_length=torch.tensor([40, 13, 0, 0, 31], dtype=torch.int32),
                  attn_sink=torch.randn(heads, generator=gen))
    poisoned = cache.clone()
    poisoned.view(-1, dim)[3000:] = float("nan")
    on_gpu = {k: v.to(cuda) for k, v in kw.items()}
    q_gpu, cache_gpu = q.to(cuda), poisoned.to(cuda)
    assert wgmma_unsupported_reasons(q_gpu, cache_gpu, on_gpu.get("extra_kv_cache"), config) == []
    out = poison(torch.empty(tokens, heads, 512, dtype=torch.bfloat16, device=cuda))
    lse = poison(torch.empty(tokens, heads, device=cuda))
    launch(q_gpu, cache_gpu, idx.to(cuda), dim ** -0.5, 512, on_gpu["topk_length"], on_gpu.get("attn_sink"),
           on_gpu.get("extra_kv_cache"), on_gpu.get("extra_indices"), on_gpu.get("extra_topk_length"), out, lse,
           config)
    assert not is_poisoned(out).any() and not is_poisoned(lse).any()
    out, lse = out.cpu(), lse.cpu()
    assert torch.isfinite(out).all()
    _check(out, lse, q, cache, idx, 512, scale=dim ** -0.5, **kw)
    assert (out[3] == 0).all() and (lse[3] == float("inf")).all()
