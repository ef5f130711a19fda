#!/usr/bin/env bash
# Every linter the project holds itself to, at pinned versions (the lint
# extra): ruff on the Python, hadolint on the Dockerfiles, actionlint on the
# workflow (it runs shellcheck over the workflow's run: blocks) and shellcheck
# on the scripts. Run from anywhere; installs the tools into the active env.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only the tools (rocmoe itself, and torch with it, is not needed to lint).
mapfile -t tools < <(python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["lint"]))')
python -m pip install -q "${tools[@]}"
echo "== ruff"
ruff check .
echo "== hadolint"
hadolint docker/Dockerfile.cuda docker/Dockerfile.rocm docker/Dockerfile.xpu
echo "== actionlint"
actionlint -version | head -1
actionlint .github/workflows/*.yml
echo "== shellcheck"
shellcheck .ci/run ci/*.sh docker/*.sh
echo "lint: ok"
