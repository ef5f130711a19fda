"""The rocmoe command: info (tables and JSON) and bench --quick."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import rocmoe
from rocmoe.cli import main


def _run(*args, env=None):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, env=env)


def test_info_json_describes_every_op_and_backend():
    result = _run("rocmoe", "info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["versions"]["rocmoe"] == rocmoe.__version__
    assert info["device"]["arch"] in ("cpu", "sm90", "sm100", "sm80", "gfx942", "gfx950", "xpu")
    assert [o["op"] for o in info["ops"]] == ["gemma4_routing", "mxfp4_moe", "sparse_mla_decode", "sparse_topk"]
    for op in info["ops"]:
        rows = {b["backend"]: b for b in op["backends"]}
        assert set(rows) == {"aiter", "triton", "torch"}
        assert sum(b["selected"] for b in rows.values()) == 1 and op["error"] is None
        for b in rows.values():
            assert b["available"] == (not b["reasons"])


def test_info_describes_an_arch_without_its_hardware(capsys):
    assert main(["info", "--arch", "gfx942", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {k: info["device"][k] for k in ("arch", "family", "present", "warp_size")} == \
        {"arch": "gfx942", "family": "cdna3", "present": False, "warp_size": 64}
    assert info["default_order"] == ["aiter", "triton", "torch"]
    for op in info["ops"]:
        rows = {b["backend"]: b for b in op["backends"]}
        assert sum(b["selected"] for b in rows.values()) == 1 and op["error"] is None
        assert rows["triton"]["available"] and rows["triton"]["config"] == "heuristic for cdna3"
    assert main(["info", "--arch", "sm90"]) == 0
    assert "described from its arch" in capsys.readouterr().out


@pytest.mark.parametrize("args, named", [(["--device", "gfx942"], "--device"), (["--arch", "mi300"], "--arch")])
def test_info_names_the_argument_it_cannot_read(capsys, args, named):
    assert main(["info", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rocmoe info: {named}") and repr(args[1]) in err


def test_info_table_via_python_m():
    result = _run(sys.executable, "-m", "rocmoe", "info")
    assert result.returncode == 0, result.stderr
    assert "op x backend" in result.stdout and "selected" in result.stdout


def test_info_table_prints_reasons_verbatim(monkeypatch):
    """Reasons hold brackets ('rocmoe[cuda]'); the table must not eat them as markup."""
    import io

    from rocmoe import info as info_mod

    info = info_mod.collect(rocmoe.Device.from_arch("cpu"))
    info["ops"][0]["backends"][1]["reasons"] = ["triton is not installed (pip install 'rocmoe[cuda]')"]
    buffer = io.StringIO()
    info_mod.render(info, file=buffer)
    assert "rocmoe[cuda]" in buffer.getvalue()


def test_info_reports_a_bad_env_value(monkeypatch):
    import os

    env = dict(os.environ, ROCMOE_BACKEND="trtion")
    result = _run("rocmoe", "info", "--json", env=env)
    assert result.returncode == 0
    info = json.loads(result.stdout)
    assert info["env"] == {"ROCMOE_BACKEND": "trtion"}
    for op in info["ops"]:
        assert "unknown backend 'trtion'" in op["error"]
        assert not any(b["selected"] for b in op["backends"])


def test_info_reports_an_unsatisfiable_request():
    import os

    env = dict(os.environ, ROCMOE_MXFP4_MOE_BACKEND="aiter")
    info = json.loads(_run("rocmoe", "info", "--json", env=env).stdout)
    moe = next(op for op in info["ops"] if op["op"] == "mxfp4_moe")
    assert "no backend can run mxfp4_moe" in moe["error"] and "ROCMOE_MXFP4_MOE_BACKEND" in moe["error"]
    others = [op for op in info["ops"] if op["op"] != "mxfp4_moe"]
    assert all(op["error"] is None for op in others)


def test_bench_quick_runs_checks_and_writes_json(tmp_path, capsys):
    path = tmp_path / "quick.json"
    code = main(["bench", "--quick", "--device", "cpu", "--json", str(path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads(path.read_text())
    results = data["results"]
    assert {r["op"] for r in results} == {"gemma4_routing", "mxfp4_moe", "sparse_mla_decode", "sparse_topk"}
    assert all(r["check_ok"] and r["median_s"] > 0 for r in results)
    assert "rocmoe bench --quick" in printed and "GPU numbers need a GPU" in printed


def test_bench_quick_fails_loudly_on_an_impossible_backend(capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--op", "gemma4_routing", "--backend", "aiter"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_full_bench_validates_its_model_filter(capsys):
    assert main(["bench", "--op", "sparse_topk", "--model", "gemma4-26b-a4b"]) == 2
    assert "valid: dsv32" in capsys.readouterr().err


def test_unknown_op_is_rejected():
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--op", "attention"])
