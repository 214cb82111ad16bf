"""Timing, reporting and result-file helpers shared by the benchmark scripts.

The benchmark machine is shared and noisy, so absolute seconds are only indicative: every comparison is measured as
a ratio within one run. The compared variants are interleaved (A, B, B, A, A, B, …), each is repeated, and the
reported figures are medians — the median time of each variant and the median of the per-repeat ratios.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from argparse import ArgumentParser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


DEFAULT_THREADS = 1


# ---------------------------------------------------------------------------------------------------- setup
def argument_parser(description: str) -> ArgumentParser:
    """A parser with the options every benchmark shares (``--threads``)."""
    parser = ArgumentParser(description=description)
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch intra-op threads (default 1: on a shared machine a second OpenMP thread is often descheduled "
        "and every parallel op waits for it; results of other thread counts go to <name>_threads<N>.json)",
    )
    return parser


def setup(threads: int) -> None:
    """Fix the thread count and disable autograd for the whole benchmark."""
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)


def result_name(name: str, threads: int) -> str:
    return name if threads == DEFAULT_THREADS else f"{name}_threads{threads}"


# ---------------------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, log: bool = True
) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times, interleaved, after ``warmup`` untimed calls of each.

    Repeat ``r`` runs the variants in their given order when ``r`` is even and reversed when odd, so that no variant
    is always first (or always right after a given other one). Returns ``{name: [seconds per repeat]}``.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(timed(variants[name]))
        if log:
            line = ", ".join(f"{name} {times[name][-1]:.3f}s" for name in names)
            print(f"  repeat {r + 1}/{repeats}: {line}", flush=True)
    return times


def ratio_summary(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Ratio of two interleaved timing series: median of per-repeat ratios, ratio of medians, and their spread."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {
        "median_ratio": median(ratios),
        "ratio_of_medians": median(numerator) / median(denominator),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min and max seconds of a timing series, plus the raw series."""
    return {"median_s": median(times), "min_s": min(times), "max_s": max(times), "samples_s": list(times)}


# ---------------------------------------------------------------------------------------------------- process
def rss_bytes() -> int:
    """Resident set size of this process (``VmRSS`` of ``/proc/self/status``), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (how busy the shared machine was)."""
    with open("/proc/loadavg") as loadavg:
        return [float(x) for x in loadavg.read().split()[:3]]


# ---------------------------------------------------------------------------------------------------- machine info
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def command_line() -> str:
    """The command that reproduces this run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_arg = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_arg = str(script)
    return shlex.join(["python", script_arg, *sys.argv[1:]])


def machine_info() -> dict[str, Any]:
    import diffusers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
    }


#: The code the streaming benchmarks measure (the rest of ``src/`` does not run in them).
STREAMING_CORE = ("src/diffusers_raven/models", "src/diffusers_raven/schedulers")


def _digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def code_info() -> dict[str, Any]:
    """The state of the code measured: the commit, whether ``src/`` (and the streaming core, the models and
    schedulers) differ from it, and SHA-256 digests of their ``.py`` files."""
    src_status = _git("status", "--porcelain", "--", "src")
    core_status = _git("status", "--porcelain", "--", *STREAMING_CORE)
    core_files = [path for folder in STREAMING_CORE for path in (REPO_ROOT / folder).rglob("*.py")]
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "src_modified_since_commit": bool(src_status) if src_status is not None else None,
        "src_sha256": _digest(list((REPO_ROOT / "src").rglob("*.py"))),
        "streaming_core": list(STREAMING_CORE),
        "streaming_core_modified_since_commit": bool(core_status) if core_status is not None else None,
        "streaming_core_sha256": _digest(core_files),
    }


# ---------------------------------------------------------------------------------------------------- output
def write_results(name: str, results: dict[str, Any], started: float | None = None) -> Path:
    """Write ``results`` with machine info to ``benchmarks/results/<name>.json``; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "machine": machine_info(),
        "code": code_info(),
        "load_average_end": load_average(),
    }
    if started is not None:
        payload["wall_time_s"] = round(time.perf_counter() - started, 1)
    payload.update(results)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain-text table (floats to 3 significant decimals)."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def header(title: str) -> None:
    info = machine_info()
    print(f"== {title}")
    print(
        f"   torch {info['torch']}, {info['torch_threads']} threads, {info['cpu_model']}, load {load_average()}",
        flush=True,
    )
