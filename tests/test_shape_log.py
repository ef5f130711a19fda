"""ROCMOE_SHAPE_LOG: shapes counted per op, MoE tokens-per-expert histograms,
files merged, and `rocmoe tune --from-log` tuning the logged regimes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import rocmoe
from rocmoe import cli, shape_log


@pytest.fixture
def log_dir(tmp_path):
    shape_log._configure(tmp_path, every=1)
    try:
        yield tmp_path
    finally:
        shape_log._configure(None, every=64)


def _route(tokens: int, experts: int = 64, topk: int = 4):
    logits = torch.randn(tokens, experts)
    rocmoe.gemma4_routing(logits, topk, torch.rand(experts) + 0.5, backend="torch")


def test_off_by_default_and_then_writes_nothing(tmp_path):
    if os.environ.get(shape_log.ENV):
        pytest.skip("the suite itself runs with ROCMOE_SHAPE_LOG set")
    assert shape_log.ENABLED is False
    _route(3)
    assert shape_log.flush() is None


def test_counts_each_distinct_shape(log_dir):
    for tokens in (3, 3, 3, 100):
        _route(tokens)
    rocmoe.sparse_topk(None, torch.tensor([1, 2], dtype=torch.int32), 8, max_seq_len=2, backend="torch")
    path = shape_log.flush()
    assert path.parent == log_dir and path.name == f"shapes-{os.uname().nodename}-{os.getpid()}.json"
    log = shape_log.load(log_dir)
    routing = dict((shape["tokens"], calls) for shape, calls in log.shapes("gemma4_routing"))
    assert routing == {3: 3, 100: 1}
    (shape, calls), = log.shapes("sparse_topk")
    assert calls == 1 and shape == {"tokens": 2, "seq_len": 0, "topk": 8, "paged": False, "backend": "torch"}


def test_moe_histogram_by_hand(log_dir):
    # Experts 0..7, two of them remote under the map; -1 ids skipped.
    topk_ids = torch.tensor([[0, 1], [0, 2], [0, 5], [3, -1], [0, 1]], dtype=torch.int32)
    expert_map = torch.tensor([0, 1, 2, 3, -1, 4, -1, 5], dtype=torch.int32)
    shape = {"tokens": 5, "experts": 8}
    shape_log.record_moe_histogram(shape, topk_ids, 6, expert_map)
    shape_log.flush()
    hist = shape_log.load(log_dir).histogram("mxfp4_moe", shape)
    # local experts 0..5 get tokens 4, 2, 1, 1, 1 (global 5), 0 (global 7)
    expected = [0] * shape_log.HISTOGRAM_BUCKETS
    expected[0] = 1          # idle: local 5
    expected[1] = 3          # one token: local 2, 3, 4
    expected[2] = 1          # two or three: local 1
    expected[3] = 1          # four to seven: local 0
    assert hist == expected


def test_moe_histogram_sampled_every_n(tmp_path):
    shape_log._configure(tmp_path, every=3)
    try:
        ids = torch.randint(0, 4, (6, 2), dtype=torch.int32)
        for _ in range(7):
            shape_log.record_moe_histogram({"tokens": 6}, ids, 4, None)
        shape_log.flush()
        data = json.loads(next(tmp_path.glob("shapes-*.json")).read_text())
        (entry,) = data["histograms"]
        assert entry["samples"] == 2 and sum(entry["experts_by_tokens"]) == 2 * 4
    finally:
        shape_log._configure(None, every=64)


def test_regimes_from_log_rounds_merges_and_keeps_the_hottest():
    log = shape_log.ShapeLog()
    for tokens, calls in ((3, 5), (4, 2), (100, 50), (1000, 1), (7, 1)):
        log.calls[shape_log._key("gemma4_routing", {"tokens": tokens, "experts": 128, "topk": 8})] = calls
    def project(shape):
        return {"tokens": shape["tokens"], "experts": shape["experts"]}

    regimes = shape_log.regimes_from_log(log, "gemma4_routing", project, "tokens", max_regimes=2)
    # 3 and 4 merge into 4 (7 calls), 7 -> 8 (1 call), 100 -> 128 (50), 1000 -> 1024 (1)
    assert regimes == [{"tokens": 4, "experts": 128}, {"tokens": 128, "experts": 128}]


def test_merges_files_of_several_processes(tmp_path):
    code = ("import torch, rocmoe\n"
            "rocmoe.gemma4_routing(torch.randn(5, 32), 2, torch.rand(32) + 0.5, backend='torch')\n")
    env = {**os.environ, shape_log.ENV: str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert len(list(tmp_path.glob("shapes-*.json"))) == 2
    (shape, calls), = shape_log.load(tmp_path).shapes("gemma4_routing")
    assert calls == 2 and shape["tokens"] == 5 and shape["experts"] == 32


def test_load_rejects_an_empty_or_foreign_directory(tmp_path):
    with pytest.raises(ValueError, match="no shapes-"):
        shape_log.load(tmp_path)
    (tmp_path / "shapes-x-1.json").write_text("{\"something\": 1}")
    with pytest.raises(ValueError, match="not a rocmoe shape log"):
        shape_log.load(tmp_path)


def test_tune_from_log_tunes_the_logged_regimes(log_dir, monkeypatch, capsys):
    for tokens in (3, 3, 200):
        _route(tokens, experts=128)
    shape_log.flush()
    seen = {}

    def fake_run_tune(tuning, device, *, out, budget_s, regimes, command, **options):
        seen["regimes"], seen["options"] = regimes, options
        return log_dir / "table.json"

    monkeypatch.setattr("rocmoe.tune.run_tune", fake_run_tune)
    assert cli.main(["tune", "--op", "gemma4_routing", "--from-log", str(log_dir), "--device", "cpu"]) == 0
    assert seen["regimes"] == [{"tokens": 4, "experts": 128, "logit_bits": 32},
                               {"tokens": 256, "experts": 128, "logit_bits": 32}]
    assert seen["options"]["keep_from"] is None  # the logged regimes' table replaces the file unless --merge
    assert "tuning 2 logged regime(s)" in capsys.readouterr().out


def test_tune_from_log_without_calls_of_the_op(log_dir, capsys):
    rocmoe.sparse_topk(None, torch.tensor([1], dtype=torch.int32), 8, max_seq_len=1, backend="torch")
    shape_log.flush()
    assert cli.main(["tune", "--op", "gemma4_routing", "--from-log", str(log_dir), "--device", "cpu"]) == 2
    assert "has no gemma4_routing calls" in capsys.readouterr().err
