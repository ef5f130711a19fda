#!/usr/bin/env bash
# The release artefacts: `python -m build` makes an sdist and a pure-Python
# wheel. The wheel must hold every module of rocmoe and rocmoe.backends and
# every config table of the tree, and nothing else top-level; installed into a
# fresh venv (no source tree on the path) it runs `rocmoe info` and the CPU
# test suite. The sdist must build the same wheel, and an export with no git
# metadata must get the fallback version rather than fail.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip install -q build

echo "== sdist + wheel from the git checkout"
python -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/rocmoe-*.whl)"
sdist="$(ls "$work"/dist/rocmoe-*.tar.gz)"
echo "built $(basename "$wheel") and $(basename "$sdist")"
python - "$repo" "$wheel" "$sdist" <<'PY'
import pathlib, sys, tarfile, zipfile
repo, wheel, sdist = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
names = set(zipfile.ZipFile(wheel).namelist())
need = {str(p.relative_to(repo)) for p in repo.glob("rocmoe/**/*.py")}
need |= {str(p.relative_to(repo)) for p in repo.glob("rocmoe/configs/**/*.json")}
need |= {"rocmoe/backends/" + str(p.relative_to(repo / "backends")) for p in repo.glob("backends/**/*.py")}
missing = sorted(need - names)
tops = {n.split("/")[0] for n in names}
stray = sorted(t for t in tops if t != "rocmoe" and not t.endswith(".dist-info"))
if missing or stray:
    sys.exit(f"wheel is wrong: missing {missing}, stray top-level {stray}")
tables = sorted(n for n in names if n.startswith("rocmoe/configs/") and n.endswith(".json"))
print(f"wheel holds {len(names)} files: every module of rocmoe and rocmoe.backends, config tables {tables}")
members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
lost = sorted(m for m in ("pyproject.toml", "README.md", "backends/triton/mxfp4_moe.py", "tests/conftest.py")
              if m not in members)
if lost:
    sys.exit(f"sdist lacks {lost}")
PY

echo "== wheel from the sdist"
python -m build --wheel --outdir "$work/dist-sdist" "$sdist" >"$work/build-sdist.log" 2>&1 \
  || { cat "$work/build-sdist.log"; exit 1; }
python - "$wheel" "$work"/dist-sdist/rocmoe-*.whl <<'PY'
import sys, zipfile
a, b = (set(zipfile.ZipFile(w).namelist()) for w in sys.argv[1:3])
if a != b:
    sys.exit(f"the sdist builds another wheel: {sorted(a ^ b)}")
print("the sdist builds the same wheel")
PY

echo "== fresh venv with the wheel"
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0 "${wheel}[cpu,test]"
mkdir "$work/scratch"
cp -r "$repo/tests" "$work/scratch/"
cd "$work/scratch"
"$work/venv/bin/python" - <<'PY'
import rocmoe, rocmoe.backends.torch.mxfp4_moe as m
assert "site-packages" in rocmoe.__file__ and "site-packages" in m.__file__, (rocmoe.__file__, m.__file__)
print("imports from", rocmoe.__file__, "version", rocmoe.__version__)
PY
"$work/venv/bin/rocmoe" info
# The CPU suite against the installed wheel (the two tests that read the
# source tree itself - package folders, README - ran in the checkout).
# The repository's pytest settings (markers, the default CPU selection), with
# the scratch folder as rootdir: the source tree is not importable from there.
"$work/venv/bin/python" -m pytest tests -c "$repo/pyproject.toml" --rootdir "$work/scratch" -p no:cacheprovider -q \
  --ignore=tests/test_packaging.py --ignore=tests/test_readme.py 2>&1 | tail -3

echo "== the rocm extra on a CPU machine: AITER installed, reported unavailable with the true reason"
"$work/venv/bin/pip" install -q "${wheel}[rocm]"
"$work/venv/bin/rocmoe" info --json | "$work/venv/bin/python" -c '
import json, sys
info = json.load(sys.stdin)
assert info["versions"].get("amd-aiter"), info["versions"]
for op in info["ops"]:
    (aiter,) = [b for b in op["backends"] if b["backend"] == "aiter"]
    want = ["AITER needs a ROCm build of torch (this torch was built without HIP)"]
    assert not aiter["available"] and aiter["reasons"] == want, (op["op"], aiter)
print("amd-aiter", info["versions"]["amd-aiter"], "installed; every op reports:", want[0])
'

echo "== wheel from an export without git metadata"
mkdir "$work/export"
git -C "$repo" archive HEAD | tar -x -C "$work/export"
python -m build --wheel --outdir "$work/dist-export" "$work/export" >"$work/build2.log" 2>&1 \
  || { cat "$work/build2.log"; exit 1; }
ls "$work"/dist-export/rocmoe-0.1.0.dev0-*.whl
echo "check_wheel: ok"
