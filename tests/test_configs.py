"""Launch-config tables: loading, validation errors, lookup, heuristic fallback."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from rocmoe import configs
from rocmoe.configs import ConfigSpec, ConfigTableError, load_table
from rocmoe.device import Device


@dataclass(frozen=True)
class ToyParams:
    BLOCK: int
    num_warps: int = 4
    FAST: bool = False


def _spec():
    return ConfigSpec(
        op="toy_op", kernel="main", params=ToyParams, regime_keys=("tokens", "heads"),
        heuristics={"hopper": lambda r: ToyParams(BLOCK=128 if r["tokens"] > 64 else 16, num_warps=8),
                    "default": lambda r: ToyParams(BLOCK=32)},
    )


def _table(**over):
    table = {
        "schema_version": 1, "op": "toy_op", "arch": "sm90",
        "provenance": {"source": "measured", "device": "NVIDIA H100", "date": "2026-11-22"},
        "keys": ["tokens"],
        "entries": [
            {"when": {"tokens": [1, 128]}, "config": {"BLOCK": 8, "num_warps": 1, "FAST": True}},
            {"when": {"tokens": [129, None]}, "config": {"BLOCK": 64}},
        ],
    }
    table.update(over)
    return table


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "_USER_DIR", str(tmp_path))
    (tmp_path / "toy_op").mkdir()
    return tmp_path


def _write(user_dir, table, arch="sm90"):
    path = user_dir / "toy_op" / f"{arch}.json"
    path.write_text(json.dumps(table))
    return path


def test_table_lookup_and_heuristic_fallback(user_dir):
    _write(user_dir, _table())
    spec = _spec()
    h100 = Device.from_arch("sm90")
    params, source = spec.choose(h100, tokens=5, heads=16)
    assert params == ToyParams(8, 1, True) and source.startswith("table ") and "measured" in source
    assert spec.choose(h100, tokens=100_000, heads=16)[0] == ToyParams(64, 4)
    # no table for sm100 (blackwell has no heuristic of its own -> default)
    assert spec.choose(Device.from_arch("sm100"), tokens=5, heads=1) == (ToyParams(32), "heuristic for blackwell")
    assert spec.source(Device.from_arch("gfx942")) == "heuristic for cdna3"


def test_no_matching_entry_falls_back_to_the_family_heuristic(user_dir):
    _write(user_dir, _table(entries=[{"when": {"tokens": [1, 8]}, "config": {"BLOCK": 8}}]))
    params, source = _spec().choose(Device.from_arch("sm90"), tokens=100, heads=2)
    assert params == ToyParams(128, 8) and source == "heuristic for hopper"


def test_missing_regime_key_is_an_error(user_dir):
    with pytest.raises(TypeError, match="regime is missing heads"):
        _spec().choose(Device.from_arch("sm90"), tokens=3)


@pytest.mark.parametrize("change, key, problem", [
    (dict(schema_version=2), "schema_version", "expected 1"),
    (dict(op="other"), "op", "expected 'toy_op'"),
    (dict(arch="sm100"), "arch", "expected the file's arch 'sm90'"),
    (dict(provenance={"source": "guessed"}), "provenance.source", "'measured' or 'heuristic'"),
    (dict(keys=["tokens", "experts"]), "keys", "unknown regime key"),
    (dict(entries=[]), "entries", "non-empty list"),
    (dict(entries=[{"when": {}, "config": {"BLOCK": 8}, "extra": 1}]), "entries[0]", "exactly 'when' and 'config'"),
    (dict(entries=[{"when": {"heads": [1, 2]}, "config": {"BLOCK": 8}}]), "entries[0].when.heads",
     "not one of the table's keys"),
    (dict(entries=[{"when": {"tokens": [5, 1]}, "config": {"BLOCK": 8}}]), "entries[0].when.tokens", "empty range"),
    (dict(entries=[{"when": {"tokens": [1]}, "config": {"BLOCK": 8}}]), "entries[0].when.tokens", "expected [lo, hi]"),
    (dict(entries=[{"when": {}, "config": {"BLOCK": 8, "waves": 2}}]), "entries[0].config.waves",
     "unknown parameter"),
    (dict(entries=[{"when": {}, "config": {"BLOCK": "8"}}]), "entries[0].config.BLOCK", "expected an int"),
    (dict(entries=[{"when": {}, "config": {"BLOCK": True}}]), "entries[0].config.BLOCK", "expected an int"),
    (dict(entries=[{"when": {}, "config": {"BLOCK": 8, "FAST": 1}}]), "entries[0].config.FAST",
     "expected true or false"),
    (dict(entries=[{"when": {}, "config": {"num_warps": 8}}]), "entries[0].config", "missing parameter(s) ['BLOCK']"),
])
def test_malformed_tables_name_file_and_key(user_dir, change, key, problem):
    path = _write(user_dir, _table(**change))
    with pytest.raises(ConfigTableError) as info:
        load_table(path, _spec())
    assert info.value.key == key and info.value.path == str(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_invalid_json_is_a_table_error(user_dir):
    path = user_dir / "toy_op" / "sm90.json"
    path.write_text("{not json")
    with pytest.raises(ConfigTableError, match="cannot read JSON"):
        _spec().choose(Device.from_arch("sm90"), tokens=1, heads=1)


def test_user_dir_wins_over_the_package(user_dir, monkeypatch, tmp_path_factory):
    package = tmp_path_factory.mktemp("package")
    (package / "toy_op").mkdir()
    (package / "toy_op" / "sm90.json").write_text(json.dumps(_table()))
    monkeypatch.setattr(configs, "PACKAGE_DIR", package)
    assert configs.find_table("toy_op", "sm90") == package / "toy_op" / "sm90.json"
    mine = _write(user_dir, _table())
    assert configs.find_table("toy_op", "sm90") == mine


def test_registered_specs_are_listed():
    spec = configs.register_spec(_spec())
    try:
        assert spec in configs.specs()
    finally:
        configs._specs.pop(("toy_op", "main"))


def test_every_shipped_table_loads_against_its_spec():
    import importlib

    shipped = sorted(configs.PACKAGE_DIR.glob("*/*.json"))
    assert shipped, "no shipped tables found"
    for path in shipped:
        module = importlib.import_module(f"rocmoe.backends.triton.{path.parent.name}")
        table = load_table(path, module.SPEC)
        assert table.provenance["source"] in ("measured", "heuristic") and table.entries
        if table.provenance["source"] == "measured":
            assert table.provenance.get("device") and table.provenance.get("command")
