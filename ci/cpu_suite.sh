#!/usr/bin/env bash
# The CPU test suite, exactly as the README tells a new user to run it.
# Expects torch to be installed already (the README's "torch first" step).
set -euo pipefail
cd "$(dirname "$0")/.."
# README test command (tests/test_readme.py checks that the README shows this line):
pip install -e ".[cpu,test]" && pytest
