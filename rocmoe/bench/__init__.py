"""``rocmoe bench``: checked, roofline-aware benchmarks (``--quick``: one small
real-model shape per op)."""

from rocmoe.bench.cases import BenchCase, cases_for
from rocmoe.bench.runner import run_bench

__all__ = ["BenchCase", "cases_for", "run_bench"]
