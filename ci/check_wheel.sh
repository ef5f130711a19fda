#!/usr/bin/env bash
# Builds the wheel, proves it carries rocmoe.backends and the config tables,
# installs it into a fresh venv (no source tree on the path) and runs the
# rocmoe command from there. Also builds from an export with no git metadata,
# which must get the fallback version rather than fail.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip install -q build

echo "== wheel from the git checkout"
python -m build --wheel --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/rocmoe-*.whl)"
echo "built $(basename "$wheel")"
python - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["rocmoe/__init__.py", "rocmoe/_version.py", "rocmoe/cli.py", "rocmoe/configs/__init__.py",
        "rocmoe/backends/__init__.py", "rocmoe/backends/torch/mxfp4_moe.py",
        "rocmoe/backends/torch/sparse_mla_decode.py", "rocmoe/backends/triton/__init__.py",
        "rocmoe/backends/aiter/__init__.py"]
missing = [n for n in need if n not in names]
stray = [n for n in names if n.startswith(("backends/", "tests/"))]
if missing or stray:
    sys.exit(f"wheel is wrong: missing {missing}, stray top-level {stray}")
print(f"wheel holds {len(names)} files, rocmoe.backends included")
PY

echo "== fresh venv with the wheel"
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0 "$wheel"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import rocmoe, rocmoe.backends.torch.mxfp4_moe as m
assert "site-packages" in rocmoe.__file__ and "site-packages" in m.__file__, (rocmoe.__file__, m.__file__)
print("imports from", rocmoe.__file__, "version", rocmoe.__version__)
PY
"$work/venv/bin/rocmoe" info
"$work/venv/bin/rocmoe" bench --quick --op gemma4_routing --op sparse_topk --op sparse_mla_decode

echo "== wheel from an export without git metadata"
mkdir "$work/export"
git -C "$repo" archive HEAD | tar -x -C "$work/export"
python -m build --wheel --outdir "$work/dist-export" "$work/export" >"$work/build2.log" 2>&1 || { cat "$work/build2.log"; exit 1; }
ls "$work"/dist-export/rocmoe-0.1.0.dev0-*.whl
echo "check_wheel: ok"
