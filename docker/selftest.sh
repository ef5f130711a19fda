#!/usr/bin/env bash
# What a rocmoe image runs by default: the environment report, the test suite
# with this vendor's markers, and the quick benchmark as JSON.
#   selftest.sh cuda|rocm|xpu [OUT_DIR]
# OUT_DIR (default /opt/rocmoe/out, mount a volume there) receives info.json,
# pytest.xml and bench.json. Exits non-zero if any step fails.
set -euo pipefail
vendor=${1:?usage: selftest.sh cuda|rocm|xpu [OUT_DIR]}
out=${2:-/opt/rocmoe/out}
case "$vendor" in
  cuda) markers="gpu or not (rocm or xpu or slow)" ;;
  rocm) markers="gpu or rocm or not (xpu or slow)" ;;
  xpu) markers="xpu or not (gpu or rocm or slow)" ;;
  *) echo "selftest.sh: vendor must be cuda, rocm or xpu, got '$vendor'" >&2; exit 2 ;;
esac
mkdir -p "$out"
echo "== rocmoe info"
rocmoe info
rocmoe info --json >"$out/info.json"
echo "== tests (-m \"$markers\")"
# From the tests' own folder: the installed package is what gets imported.
cd /opt/rocmoe/selftest
python3 -m pytest tests -p no:cacheprovider -q -m "$markers" \
  --ignore=tests/test_packaging.py --ignore=tests/test_readme.py --junitxml="$out/pytest.xml"
echo "== rocmoe bench --quick"
rocmoe bench --quick --json "$out/bench.json"
