"""Run every benchmark in bench/ and write one Markdown table.

Each ``bench_*.py`` prints JSON objects, one per line (see README.md). A
benchmark that needs a service which is not running reports an error row
instead of stopping the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(path: Path, timeout: float) -> list[dict[str, object]]:
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE.parent,
        )
    except subprocess.TimeoutExpired:
        return [{"bench": path.stem, "error": f"timed out after {timeout:.0f}s"}]
    rows = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        rows.append({"bench": path.stem, "error": f"exit {proc.returncode}: {tail}"})
    for row in rows:
        row.setdefault("seconds", round(time.monotonic() - started, 1))
    return rows


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def table(rows: list[dict[str, object]]) -> str:
    head = "| benchmark | figure | Mycel | baseline | ratio (x better) | aim | notes |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['bench']} | error | | | | | {row['error']} |")
            continue
        unit = row.get("unit", "")
        lines.append(
            "| {bench} | {figure} | {value} {unit} | {baseline} {unit} ({bname}) "
            "| {ratio} | {aim} | {notes} |".format(
                bench=row.get("bench", ""),
                figure=row.get("figure", ""),
                value=fmt(row.get("value")),
                unit=unit,
                baseline=fmt(row.get("baseline")),
                bname=row.get("baseline_name", ""),
                ratio=fmt(row.get("ratio")),
                aim=row.get("aim", ""),
                notes=row.get("notes", ""),
            )
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="only these (e.g. hub ws)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default=str(HERE / "results" / "report.md"))
    args = parser.parse_args()
    paths = sorted(HERE.glob("bench_*.py"))
    if args.names:
        paths = [p for p in paths if any(n in p.stem for n in args.names)]
    rows: list[dict[str, object]] = []
    for path in paths:
        print(f"running {path.name} ...", file=sys.stderr, flush=True)
        found = run_one(path, args.timeout)
        for row in found:
            print(json.dumps(row), file=sys.stderr)
        rows += found
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = "# Benchmark report\n\n" + table(rows)
    out.write_text(report, encoding="utf-8")
    print(report)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
