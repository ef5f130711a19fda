"""rocmoe tune: sweep -> table file -> loader -> the chosen config (interpreter on CPU)."""

from __future__ import annotations

import json

import pytest

from rocmoe import configs
from rocmoe.backends.triton.gemma4_routing import SPEC, TUNING, RoutingConfig
from rocmoe.device import Device
from rocmoe.tune import Tuning, run_tune, table_entries


def test_table_entries_split_on_geometric_midpoints():
    winners = [({"tokens": 1, "experts": 128, "logit_bits": 32}, RoutingConfig(1, 1)),
               ({"tokens": 16, "experts": 128, "logit_bits": 32}, RoutingConfig(2, 1)),
               ({"tokens": 1024, "experts": 128, "logit_bits": 32}, RoutingConfig(8, 4, 4)),
               ({"tokens": 1024, "experts": 128, "logit_bits": 16}, RoutingConfig(16, 1, 4))]
    entries = table_entries("tokens", winners)
    assert [e["when"]["tokens"] for e in entries] == [[1, 4], [5, 128], [129, None], [1, None]]
    assert all(e["when"]["experts"] == [128, 128] for e in entries)
    assert [e["when"]["logit_bits"] for e in entries] == [[32, 32]] * 3 + [[16, 16]]
    assert entries[2]["config"] == {"BLOCK_T": 8, "num_warps": 4, "LANES": 4, "KEY_BITS": 32}


def test_round_trip_tune_file_loader_choice(tmp_path, monkeypatch, kernel_device):
    arch = Device.for_torch_device(kernel_device).arch
    out = tmp_path / "gemma4_routing" / f"{arch}.json"
    # A narrow sweep keeps the interpreter fast; the winner must be one of these.
    small = [RoutingConfig(1, 1, 32), RoutingConfig(2, 1, 16)]
    tuning = Tuning(TUNING.spec, TUNING.regimes, lambda regime, device: small, TUNING.make_inputs, "tokens")
    path = run_tune(tuning, kernel_device, out=out, regimes=[{"tokens": 4, "experts": 128, "logit_bits": 32}],
                    progress=False)
    table = json.loads(path.read_text())
    assert table["provenance"]["source"] == "measured" and table["arch"] == arch
    winner = RoutingConfig(**table["entries"][0]["config"])
    assert winner in small
    monkeypatch.setattr(configs, "_USER_DIR", str(tmp_path))
    SPEC.forget()
    try:
        device = Device.for_torch_device(kernel_device)
        params, source = SPEC.choose(device, tokens=3, experts=128, logit_bits=32)
        assert params == winner and str(path) in source
        # outside the measured experts or logit width the heuristic answers
        assert SPEC.choose(device, tokens=3, experts=64, logit_bits=32)[1].startswith("heuristic")
        assert SPEC.choose(device, tokens=3, experts=128, logit_bits=16)[1].startswith("heuristic")
    finally:
        SPEC.forget()
    assert not out.with_name(out.name + ".partial.json").exists()


def test_interrupted_tune_resumes(tmp_path, kernel_device):
    arch = Device.for_torch_device(kernel_device).arch
    out = tmp_path / "gemma4_routing" / f"{arch}.json"
    calls = []

    def make_inputs(regime, device, gen):
        inputs = TUNING.make_inputs(regime, device, gen)
        original = inputs.check

        def counting(params):
            calls.append(params)
            return original(params)

        inputs.check = counting
        return inputs

    cands = [RoutingConfig(1, 1, 32), RoutingConfig(2, 2, 32)]
    tuning = Tuning(TUNING.spec, TUNING.regimes, lambda r, d: cands, make_inputs, "tokens")
    regimes = [{"tokens": 2, "experts": 64, "logit_bits": 32}, {"tokens": 8, "experts": 64, "logit_bits": 16}]
    run_tune(tuning, kernel_device, out=out, regimes=regimes, budget_s=0.0, progress=False)  # stops at once
    partial = out.with_name(out.name + ".partial.json")
    assert partial.exists() and len(json.loads(partial.read_text())["measured"]) == 1
    run_tune(tuning, kernel_device, out=out, regimes=regimes, progress=False)
    assert len(calls) == 4  # the one measured before was not measured again
    assert not partial.exists()
    assert len(json.loads(out.read_text())["entries"]) == 2


def test_logged_shapes_map_to_their_logit_width():
    device = Device.from_arch("sm90")
    for dtype, bits in (("float32", 32), ("bfloat16", 16), ("float16", 16)):
        shape = {"tokens": 5, "experts": 128, "topk": 8, "dtype": dtype}
        assert TUNING.project(shape, device) == {"tokens": 5, "experts": 128, "logit_bits": bits}


def test_heuristic_programs_cover_their_threads():
    """Every heuristic config already spans its threads (launch() need not widen it)."""
    import torch

    from rocmoe.backends.triton.gemma4_routing import BENCH_TOKENS, kernel_layout, program_tokens

    for arch in ("sm90", "gfx942", "gfx950"):
        device = Device.from_arch(arch)
        for experts in (64, 128, 1024):
            for bits, dtype in ((32, torch.float32), (16, torch.bfloat16)):
                for tokens in BENCH_TOKENS:
                    config = SPEC.heuristic(device)({"tokens": tokens, "experts": experts, "logit_bits": bits})
                    layout = kernel_layout(dtype, config, 8, experts)
                    assert program_tokens(config, layout, device.limits.warp_size) == config.BLOCK_T, (arch, config)


def test_where_bounds_parse_and_select():
    from rocmoe.tune import parse_where, select_regimes

    keys = ("tokens", "heads")
    assert parse_where(["heads=128", "tokens=8:64", "tokens=512:"], keys) == {"heads": (128, 128),
                                                                             "tokens": (512, None)}
    regimes = [{"tokens": t, "heads": h} for t in (1, 8, 64, 512) for h in (16, 128)]
    assert select_regimes(regimes, parse_where(["heads=128", "tokens=8:64"], keys)) == [
        {"tokens": 8, "heads": 128}, {"tokens": 64, "heads": 128}]
    assert select_regimes(regimes, {}) == regimes
    for bad, named in (("experts=4", "experts=4"), ("heads", "heads"), ("heads=x", "integers"),
                       ("tokens=64:8", "empty range")):
        with pytest.raises(ValueError, match=named):
            parse_where([bad], keys)


def test_merge_replaces_whole_groups_and_puts_new_entries_first():
    from rocmoe.tune import merge_entries

    def entry(lo, hi, heads, block):
        return {"when": {"tokens": [lo, hi], "heads": [heads, heads]}, "config": {"B": block}}

    old = [entry(1, 8, 16, 1), entry(9, None, 16, 2), entry(1, 20, 128, 3), entry(21, None, 128, 4)]
    new = [entry(1, 90, 128, 5), entry(91, None, 128, 6)]
    merged, kept = merge_entries(old, new, "tokens")
    assert kept == 2
    assert [e["config"]["B"] for e in merged] == [5, 6, 1, 2]


def test_entries_tuned_for_some_token_counts_cover_those_and_the_old_table_keeps_the_rest():
    # `--where tokens=8:64 --merge`: the new buckets span 8..64 only, and the old entries of the same group
    # keep their choices below 8 and above 64 (clipped), so large-T entries are not lost to a small-T run.
    from rocmoe.tune import merge_entries

    winners = [({"tokens": 8, "heads": 128}, RoutingConfig(1, 1, 32)),
               ({"tokens": 32, "heads": 128}, RoutingConfig(2, 1, 16))]
    new = table_entries("tokens", winners, span=(8, 64))
    assert [e["when"]["tokens"] for e in new] == [[8, 16], [17, 64]]

    def entry(lo, hi, heads, block):
        return {"when": {"tokens": [lo, hi], "heads": [heads, heads]}, "config": {"B": block}}

    old = [entry(1, 4, 128, 1), entry(5, 20, 128, 2), entry(21, 70, 128, 3), entry(71, None, 128, 4),
           entry(1, None, 16, 5)]
    merged, kept = merge_entries(old, new, "tokens", span=(8, 64))
    assert [(e["when"]["tokens"], e["config"]) for e in merged[2:]] == [
        ([1, 4], {"B": 1}), ([5, 7], {"B": 2}), ([65, 70], {"B": 3}), ([71, None], {"B": 4}), ([1, None], {"B": 5})]
    assert kept == 5
    # An old entry around the whole span keeps both sides; an open span keeps nothing of a tuned group.
    assert [e["when"]["tokens"] for e in merge_entries([entry(1, None, 128, 6)], new, "tokens", (8, 64))[0][2:]] \
        == [[1, 7], [65, None]]
    assert merge_entries(old, new, "tokens")[1] == 1


def test_tune_keeps_the_untuned_groups_of_an_existing_table(tmp_path, kernel_device):
    arch = Device.for_torch_device(kernel_device).arch
    out = tmp_path / "gemma4_routing" / f"{arch}.json"
    first = [RoutingConfig(1, 1, 32)]
    tuning = Tuning(TUNING.spec, TUNING.regimes, lambda regime, device: first, TUNING.make_inputs, "tokens")
    both = [{"tokens": 4, "experts": 64, "logit_bits": 32}, {"tokens": 4, "experts": 128, "logit_bits": 32}]
    run_tune(tuning, kernel_device, out=out, regimes=both, progress=False, command="first")
    second = [RoutingConfig(2, 1, 16)]
    tuning = Tuning(TUNING.spec, TUNING.regimes, lambda regime, device: second, TUNING.make_inputs, "tokens")
    keep = tmp_path / "old" / f"{arch}.json"  # a table's file is named for its arch
    keep.parent.mkdir()
    keep.write_text(out.read_text())
    run_tune(tuning, kernel_device, out=out, regimes=both[1:], progress=False, keep_from=keep, command="second")
    table = json.loads(out.read_text())
    by_experts = {e["when"]["experts"][0]: RoutingConfig(**e["config"]) for e in table["entries"]}
    assert by_experts == {64: first[0], 128: second[0]} and len(table["entries"]) == 2
    assert table["provenance"]["kept_entries"] == 1 and table["provenance"]["kept_from"]["command"] == "first"
    configs.load_table(out, SPEC)
    wrong_arch = json.loads(keep.read_text()) | {"arch": "gfx1"}
    keep.write_text(json.dumps(wrong_arch))
    with pytest.raises(configs.ConfigTableError, match="arch"):
        run_tune(tuning, kernel_device, out=out, regimes=both[1:], progress=False, keep_from=keep)


def test_compile_ahead_fills_the_cache_and_reports_what_fails(tmp_path):
    # The MLA tuner's candidates compiled for sm90 on this CPU (no GPU): one worker per share, each
    # candidate once however many token counts it is tuned at; a launch the kernel refuses is reported.
    import dataclasses

    from rocmoe.backends.triton.sparse_mla_decode import TUNING, MlaConfig
    from rocmoe.tune import compile_ahead

    device = Device.from_arch("sm90")
    regime = {"tokens": 8, "heads": 16, "keys": 2048, "head_dim": 576, "compute_units": 132}
    good = MlaConfig(16, 32, 4, 3, 1, False, 1)
    bad = dataclasses.replace(good, BLOCK_N=24)  # not a power of two: tl.arange refuses it
    jobs = [(regime, good), ({**regime, "tokens": 64}, good), (regime, bad)]
    compiled, failed = compile_ahead(TUNING, jobs, device, workers=2, cache_dir=str(tmp_path))
    assert compiled == 2
    assert len(failed) == 1 and "BLOCK_N=24" in failed[0]
    assert any(p.suffix == ".cubin" for p in tmp_path.rglob("*"))


def test_cli_where_and_merge_pass_the_regimes_and_a_copy_of_the_table(tmp_path, monkeypatch, capsys):
    from rocmoe import cli

    seen = {}

    def fake_run_tune(tuning, device, *, out, budget_s, regimes, command, keep_from, compile_workers, split_span):
        seen.update(regimes=regimes, keep=keep_from.read_text(), workers=compile_workers, span=split_span)
        return tmp_path / "table.json"

    monkeypatch.setattr("rocmoe.tune.run_tune", fake_run_tune)
    out = tmp_path / "sparse_mla_decode" / "cpu.json"  # --device cpu: the table of arch "cpu"
    args = ["tune", "--op", "sparse_mla_decode", "--device", "cpu", "--where", "heads=128", "--where", "tokens=8:64",
            "--merge", "--compile-jobs", "3", "--out", str(out)]
    assert cli.main(args) == 2 and "no sparse_mla_decode table for cpu" in capsys.readouterr().err
    out.parent.mkdir()
    out.write_text('{"the table": "kept"}')
    assert cli.main(args) == 0
    assert {(r["tokens"], r["heads"]) for r in seen["regimes"]} == {(8, 128), (64, 128)}
    assert seen["keep"] == '{"the table": "kept"}' and seen["workers"] == 3 and seen["span"] == (8, 64)
    none = ["tune", "--op", "sparse_mla_decode", "--device", "cpu", "--where", "heads=3"]
    assert cli.main(none) == 2 and "no sparse_mla_decode regime" in capsys.readouterr().err


def test_merge_keeps_the_old_entries_of_a_group_the_budget_cut_short(tmp_path, kernel_device):
    arch = Device.for_torch_device(kernel_device).arch
    out = tmp_path / "gemma4_routing" / f"{arch}.json"
    first, second = [RoutingConfig(1, 1, 32)], [RoutingConfig(2, 1, 16)]
    small = {"tokens": 4, "experts": 64, "logit_bits": 32}
    wide = [{"tokens": 4, "experts": 128, "logit_bits": 32}, {"tokens": 64, "experts": 128, "logit_bits": 32}]
    tuning = Tuning(TUNING.spec, TUNING.regimes, lambda regime, device: first, TUNING.make_inputs, "tokens")
    run_tune(tuning, kernel_device, out=out, regimes=[small, wide[0]], progress=False, command="first")
    keep = tmp_path / "old" / f"{arch}.json"
    keep.parent.mkdir()
    keep.write_text(out.read_text())
    tuning = Tuning(TUNING.spec, TUNING.regimes, lambda regime, device: second, TUNING.make_inputs, "tokens")
    # A zero budget measures one candidate: the 64-expert group whole, none of the 128-expert one.
    run_tune(tuning, kernel_device, out=out, regimes=[small, *wide], budget_s=0.0, progress=False, keep_from=keep)
    table = json.loads(out.read_text())
    by_experts = {e["when"]["experts"][0]: RoutingConfig(**e["config"]) for e in table["entries"]}
    assert by_experts == {64: second[0], 128: first[0]} and table["provenance"]["groups_cut_short"] == 1
    assert out.with_name(out.name + ".partial.json").exists()  # for the resumed run
    other = tmp_path / "other" / "gemma4_routing" / f"{arch}.json"
    with pytest.raises(RuntimeError, match="resume"):
        run_tune(tuning, kernel_device, out=other, regimes=wide, budget_s=0.0, progress=False, keep_from=keep)
