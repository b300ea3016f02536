"""What every benchmark prints about where it ran: hardware line and peak memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from pathlib import Path

import torch

#: the real data the benchmarks read (never copied into the repository)
SHARED_DATA = Path(
    os.environ.get("DEFECTSCOPE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware_line() -> str:
    """Cores, CPU model, torch version and threads, and the load average now."""
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"hardware: {os.cpu_count()} cores, CPU {cpu_model()}, torch {torch.__version__} "
        f"threads {torch.get_num_threads()}, load average {load}"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Resident memory of this process now, MiB (Linux /proc; the peak if /proc is absent)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mib()


def elpv_paths(n: int) -> list[Path]:
    """``n`` ELPV good-cell image paths (mono then poly), repeated when there are fewer cells than asked."""
    from defectscope.data.elpv import CELL_TYPES, elpv_split

    cells: list[Path] = []
    for cell_type in CELL_TYPES:
        cells += elpv_split(cell_type, n_train=None, test_good=0).train
    return [cells[i % len(cells)] for i in range(n)]


def child_result(cmd: list[str]) -> dict | str:
    """Run a benchmark child process; the JSON object on its last stdout line, or its last stderr line on failure."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {out.returncode}"
    return json.loads(out.stdout.strip().splitlines()[-1])
