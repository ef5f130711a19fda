"""The package layout: every package folder is listed for setuptools, and
rocmoe.backends.<name> resolves to backends/<name>."""

from __future__ import annotations

import importlib
from pathlib import Path

import tomllib

import rocmoe

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for init in ROOT.glob("rocmoe/**/__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for init in ROOT.glob("backends/**/__init__.py"):
        found.add(".".join(("rocmoe", *init.parent.relative_to(ROOT).parts)))
    found = {p.replace("rocmoe.backends", "rocmoe.backends", 1) for p in found}
    assert found == listed, f"pyproject packages differ from the folders: {sorted(found ^ listed)}"


def test_backends_import_as_rocmoe_backends():
    for name in ("torch", "triton", "aiter"):
        module = importlib.import_module(f"rocmoe.backends.{name}")
        assert Path(module.__file__).parent.name == name
        assert callable(module.availability_reasons)
    assert importlib.import_module("rocmoe.backends.torch.mxfp4_moe").IMPLEMENTATION.backend == "torch"


def test_version_is_set():
    assert rocmoe.__version__ and rocmoe.__version__ != "0.0.0+unknown"
