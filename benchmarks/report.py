"""Run the benchmarks once and print the ratios they are judged by.

Each ``benchmarks/bench_*.py`` module declares ``RATIOS``: a list of
``(label, baseline_test, subject_test, goal)``. The ratio is ``time(baseline) / time(subject)`` (how many
times faster the subject is, from median times of the same run) and passes when it is ``>= goal``. A goal
below 1 expresses a bound ("within 4x of memset" is goal 0.25).

    python benchmarks/report.py                 # everything
    python benchmarks/report.py -k lego         # a subset (pytest -k expression)
    python benchmarks/report.py --json out.json # also write the table and raw medians

Compute-bound benchmarks declare their FLOP count in ``benchmark.extra_info["flops"]`` (and optionally a goal as a
fraction of the machine's sgemm rate in ``extra_info["sgemm_goal"]``). The sgemm rate (numpy float32 matmul of
a square SGEMM_SIZE product, the median of its timings) is measured right after each such benchmark
(``extra_info["sgemm_gflops"]``, see conftest.py), and report.py prints each one's FLOP count, GFLOP/s and
fraction of that nearby rate; it also measures the rate before and after the whole run, for the machine line.
A benchmark that times several callables round by round (``conftest.interleaved``: their order rotating, so a load
that comes and goes slows them alike) reports each as the benchmark ``<test name>::<name>``, which ``RATIOS`` and
the tables treat like any other. Modules may also declare ``MEMORY``, ``(label, baseline_test, subject_test,
goal)`` over ``extra_info["peak_mib"]`` (peak resident memory of one call), judged as baseline / subject like a
ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
SGEMM_SIZE = 2048
# extra_info keys that feed the compute and memory tables rather than the free-form list
TABLE_KEYS = ("flops", "sgemm_goal", "sgemm_gflops", "peak_mib", "interleaved")


def sgemm_times(size: int = SGEMM_SIZE, repeats: int = 7) -> list[float]:
    """Seconds per numpy float32 matmul of two size x size matrices (numpy's BLAS, its default threads)."""
    import numpy as np

    rng = np.random.default_rng(0)
    A = rng.standard_normal((size, size), dtype=np.float32)
    B = rng.standard_normal((size, size), dtype=np.float32)
    A @ B  # warm up: threads started, pages touched
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        A @ B
        times.append(time.perf_counter() - start)
    return times


def median_of(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else 0.5 * (values[middle - 1] + values[middle])


def load_ratios(modules):
    ratios = []
    for path in sorted(HERE.glob("bench_*.py")):
        if modules and path.stem not in modules:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for kind in ("RATIOS", "MEMORY"):
            for label, baseline, subject, goal in getattr(module, kind, []):
                ratios.append({"module": path.stem, "kind": kind, "label": label, "baseline": baseline,
                               "subject": subject, "goal": goal})
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
    expand_interleaved(medians, extras)
    return medians, extras


def expand_interleaved(medians: dict[str, float], extras: dict[str, dict]) -> None:
    """Add each run that conftest.interleaved timed inside a benchmark as a benchmark of its own, ``<test>::<run>``:
    its median (seconds) to ``medians``, its extra_info (with the benchmark's nearby sgemm rate) to ``extras``."""
    for name, info in list(extras.items()):
        for run, measured in info.get("interleaved", {}).items():
            medians[f"{name}::{run}"] = measured["median"]
            extras[f"{name}::{run}"] = {key: value for key, value in measured.items() if key != "median"}
            if "sgemm_gflops" in info:
                extras[f"{name}::{run}"]["sgemm_gflops"] = info["sgemm_gflops"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="selection", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--json", type=pathlib.Path, help="write results here")
    args, extra = parser.parse_known_args(argv)

    load_before = os.getloadavg()
    gemm = sgemm_times()
    medians, extras = run_benchmarks(args.selection, extra)
    gemm += sgemm_times()
    load_after = os.getloadavg()
    rate = 2 * SGEMM_SIZE**3 / median_of(gemm)  # FLOP/s
    rows, memory_rows, missing = [], [], []
    for ratio in load_ratios(None):
        if ratio["kind"] == "MEMORY":
            base = extras.get(ratio["baseline"], {}).get("peak_mib")
            subject = extras.get(ratio["subject"], {}).get("peak_mib")
        else:
            base, subject = medians.get(ratio["baseline"]), medians.get(ratio["subject"])
        if base is None or subject is None:
            missing.append(ratio)
            continue
        value = base / subject if subject else float("inf")
        row = {**ratio, "ratio": value, "ok": value >= ratio["goal"]}
        if ratio["kind"] == "MEMORY":
            row.update(baseline_mib=base, subject_mib=subject)
            memory_rows.append(row)
        else:
            rows.append(row)
    compute = []
    for name, info in extras.items():
        if info.get("flops") and name in medians:
            gflops = info["flops"] / medians[name] / 1e9
            goal = info.get("sgemm_goal")
            nearby = info.get("sgemm_gflops", rate / 1e9) * 1e9  # the rate of the benchmark's own minutes
            fraction = gflops * 1e9 / nearby
            compute.append({"name": name, "flops": info["flops"], "gflops": gflops, "sgemm_gflops": nearby / 1e9,
                            "fraction": fraction, "goal": goal, "ok": None if goal is None else fraction >= goal})

    print(f"\n## Machine (same run)\n\nload average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/"
          f"{load_before[2]:.2f}, after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on "
          f"{os.cpu_count()} cores; numpy sgemm {SGEMM_SIZE}x{SGEMM_SIZE}: {rate / 1e9:.1f} GFLOP/s (median of "
          f"{len(gemm)}; min..max {2 * SGEMM_SIZE**3 / max(gemm) / 1e9:.0f}.."
          f"{2 * SGEMM_SIZE**3 / min(gemm) / 1e9:.0f})")

    print("\n## Timings (median, ms)\n")
    print("| benchmark | median ms |\n|---|---:|")
    for name, median in medians.items():
        print(f"| {name} | {median * 1e3:.4g} |")
    other = {name: {key: value for key, value in info.items() if key not in TABLE_KEYS}
             for name, info in extras.items()}
    other = {name: info for name, info in other.items() if info}
    if other:  # what the benchmarks measured besides time (accuracy reached, products spent)
        print("\n## Other measurements\n")
        for name, info in other.items():
            print(f"- {name}: " + ", ".join(f"{key} = {value:.3g}" if isinstance(value, float) else f"{key} = {value}"
                                            for key, value in info.items()))
    if compute:  # FLOPs are the GEMMs' only (elementwise work not counted)
        print("\n## Compute-bound kernels vs the sgemm rate measured right after each (same run)\n")
        print("| benchmark | GFLOP | sgemm GFLOP/s | sgemm bound ms | median ms | GFLOP/s | of sgemm | goal | ok |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|:-:|")
        for row in compute:
            goal = "" if row["goal"] is None else f">= {row['goal']:.0%}"
            ok = "" if row["ok"] is None else ("yes" if row["ok"] else "NO")
            print(f"| {row['name']} | {row['flops'] / 1e9:.4g} | {row['sgemm_gflops']:.0f} | "
                  f"{row['flops'] / row['sgemm_gflops'] / 1e6:.4g} | {medians[row['name']] * 1e3:.4g} | "
                  f"{row['gflops']:.1f} | {row['fraction']:.0%} | {goal} | {ok} |")
    if memory_rows:
        print("\n## Peak resident memory of one call (MiB above the resident set before it)\n")
        print("| what | baseline MiB | subject MiB | baseline / subject | goal | ok |\n|---|---:|---:|---:|---:|:-:|")
        for row in memory_rows:
            print(f"| {row['label']} | {row['baseline_mib']:.1f} | {row['subject_mib']:.1f} | {row['ratio']:.3g}x | "
                  f">= {row['goal']:g}x | {'yes' if row['ok'] else 'NO'} |")
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
        # standard JSON: a measurement that is not finite (an accuracy never reached) is written as null
        results = json.loads(json.dumps({"sgemm_gflops": rate / 1e9, "load_average": [load_before, load_after],
                                         "medians": medians, "extra_info": extras, "ratios": rows,
                                         "compute": compute, "memory": memory_rows}),
                             parse_constant=lambda name: None)
        args.json.write_text(json.dumps(results, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
