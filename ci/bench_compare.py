"""Compare two ``rocmoe bench --json`` results of one op, row by row: the
triton times of a run with a previous launch table against a run with the new
one, made on the same machine in one call (a developer tool:
``python ci/bench_compare.py old.json new.json`` prints a markdown table)."""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("previous", help="bench JSON with the previous table (triton rows)")
    parser.add_argument("new", help="bench JSON with the new table (triton rows; torch rows too, if run)")
    args = parser.parse_args()
    with open(args.previous) as f:
        previous = json.load(f)
    with open(args.new) as f:
        new = json.load(f)
    for label, run in (("previous", previous), ("new", new)):
        c = run["ceilings"]
        print(f"{label}: {run['environment']['device']['name']}, copy {c['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
              f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, minimal kernel "
              f"{c['launch_floor_s'] * 1e6:.2f} us")
    before = {(r["model"], r["shape"]): r for r in previous["rows"] if r["backend"] == "triton"}
    torch_rows = {(r["model"], r["shape"]): r for r in new["rows"] if r["backend"] == "torch"}
    print("\n| shape | triton µs | previous table's triton µs | new vs previous | torch µs | triton vs torch "
          "| triton TFLOP/s | % bf16 peak | triton GB/s | % copy BW | check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in new["rows"]:
        key = (row["model"], row["shape"])
        if row["backend"] != "triton" or key not in before:
            continue
        old, ref = before[key], torch_rows.get(key)
        checks = [row["check_ok"], old["check_ok"], *([ref["check_ok"]] if ref else [])]
        torch_cols = (f"{ref['graph_s'] * 1e6:.1f} | {ref['graph_s'] / row['graph_s']:.1f}x" if ref else "- | -")
        flops = f"{row['tflop_per_s']:.0f} | {row['frac_bf16_peak'] * 100:.0f}%" if row.get("tflop_per_s") else "- | -"
        bandwidth = f"{row['gb_per_s']:.0f} | {row['frac_copy_bw'] * 100:.0f}%" if row.get("gb_per_s") else "- | -"
        print(f"| {row['model']} {row['shape']} | {row['graph_s'] * 1e6:.1f} | {old['graph_s'] * 1e6:.1f} | "
              f"{old['graph_s'] / row['graph_s']:.2f}x | {torch_cols} | {flops} | {bandwidth} | "
              f"{'ok' if all(checks) else 'FAILED'} |")


if __name__ == "__main__":
    main()
