"""Run the benchmarks once and print the ratios they are judged by.

Each ``benchmarks/bench_*.py`` module declares ``RATIOS``: a list of
``(label, baseline_test, subject_test, goal)``. The ratio is ``time(baseline) / time(subject)`` (how many
times faster the subject is, from median times of the same run) and passes when it is ``>= goal``. A goal
below 1 expresses a bound ("within 4x of memset" is goal 0.25).

    python benchmarks/report.py                 # everything
    python benchmarks/report.py -k lego         # a subset (pytest -k expression)
    python benchmarks/report.py --json out.json # also write the table and raw medians
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


def load_ratios(modules):
    ratios = []
    for path in sorted(HERE.glob("bench_*.py")):
        if modules and path.stem not in modules:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for label, baseline, subject, goal in getattr(module, "RATIOS", []):
            ratios.append({"module": path.stem, "label": label, "baseline": baseline, "subject": subject,
                           "goal": goal})
    return ratios


def run_benchmarks(selection: str | None, extra: list[str]) -> tuple[dict[str, float], dict[str, dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "bench.json"
        command = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
                   f"--benchmark-json={out}", "--benchmark-min-rounds=5", "--benchmark-warmup=on", *extra]
        if selection:
            command += ["-k", selection]
        subprocess.run(command, check=False)
        if not out.exists() or not out.read_text().strip():
            sys.exit("benchmarks produced no results")
        data = json.loads(out.read_text())
    medians = {bench["name"]: bench["stats"]["median"] for bench in data["benchmarks"]}
    extras = {bench["name"]: bench["extra_info"] for bench in data["benchmarks"] if bench.get("extra_info")}
    return medians, extras


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="selection", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--json", type=pathlib.Path, help="write results here")
    args, extra = parser.parse_known_args(argv)

    medians, extras = run_benchmarks(args.selection, extra)
    rows, missing = [], []
    for ratio in load_ratios(None):
        base, subject = medians.get(ratio["baseline"]), medians.get(ratio["subject"])
        if base is None or subject is None:
            missing.append(ratio)
            continue
        value = base / subject
        rows.append({**ratio, "ratio": value, "ok": value >= ratio["goal"]})

    print("\n## Timings (median, ms)\n")
    print("| benchmark | median ms |\n|---|---:|")
    for name, median in medians.items():
        print(f"| {name} | {median * 1e3:.4g} |")
    if extras:  # what the benchmarks measured besides time (accuracy reached, products spent)
        print("\n## Other measurements\n")
        for name, info in extras.items():
            print(f"- {name}: " + ", ".join(f"{key} = {value:.3g}" if isinstance(value, float) else f"{key} = {value}"
                                            for key, value in info.items()))
    print("\n## Ratios (time of baseline / time of subject, same run)\n")
    print("| what | ratio | goal | ok |\n|---|---:|---:|:-:|")
    for row in rows:
        print(f"| {row['label']} | {row['ratio']:.3g}x | >= {row['goal']:g}x | {'yes' if row['ok'] else 'NO'} |")
    # A ratio whose benchmarks were skipped (no torch, no GPU) must not vanish from the full table unnoticed; with
    # -k, skipped and deselected look alike, and only the selection is shown.
    if not args.selection:
        for ratio in missing:
            print(f"| {ratio['label']} | not run | >= {ratio['goal']:g}x | - |")
        if missing:
            print(f"\n{len(missing)} ratio(s) not measured: their benchmarks were skipped (see the pytest output above).")
    if args.json:
        args.json.write_text(json.dumps({"medians": medians, "extra_info": extras, "ratios": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
