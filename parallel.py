"""
The hardware a run uses: the processes (torchrun's ranks), the device of each, the CPU threads, and a check
that the machine is not shared with another heavy job. Plain `python train.py` is one process; torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK and each rank joins the process group (gloo on CPU, nccl on CUDA).
"""
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

CACHE = Path(os.environ.get("MICRODIT_CACHE", Path.home() / ".cache" / "microdit"))  # this machine's figures


def setup_distributed(device="auto"):
    """(ddp, rank, world, device). Under torchrun (RANK set) the process joins the group, gloo on CPU and nccl
    on CUDA, and a CUDA rank takes the GPU of its LOCAL_RANK; plain python is rank 0 of 1."""
    ddp = "RANK" in os.environ
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if ddp:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ddp, rank, world, device


def default_threads():
    """The CPU threads one process should use: the cores it may run on, shared by this machine's ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def check_device(device):
    """A one-line error for a device this machine does not have."""
    try:
        kind = torch.device(device).type if device != "auto" else "auto"
    except RuntimeError:
        kind = "unknown"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={device}: no CUDA device here (torch {torch.__version__}, "
                         f"cuda available: False); use --device=cpu or auto")
    index = torch.device(device).index if kind == "cuda" else None
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA devices")
    mps = kind == "mps" and torch.backends.mps.is_available()
    if kind not in ("auto", "cpu", "cuda") and not mps:
        raise ValueError(f"--device={device}: expected auto, cpu, cuda, cuda:N (or mps where available)")


def measure_peak_flops(device, dtype, n=2048, seconds=1.0):
    """Achieved FLOP/s of a large square matmul: the denominator of MFU on this machine."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    sync()
    return 2 * n ** 3 * k / (time.perf_counter() - t0)


def other_busy_processes(samples=5, local_ranks=1):
    """How many processes besides this one (and its sibling ranks) want a CPU right now, from /proc/loadavg's
    count of runnable tasks, averaged over a few samples; 0 where /proc is not there."""
    counts = []
    for _ in range(samples):
        try:
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return 0
        time.sleep(0.02)
    return max(0, round(sum(counts) / len(counts)) - local_ranks)


def busy_warning(device, dtype, measured, threads):
    """A warning (or None) when this CPU is shared: another heavy process is running, or the matmul speed just
    measured is far below this machine's own idle figure (the best one recorded in CACHE/peak_flops.json)."""
    if device.type != "cpu":
        return None
    key = f"{torch.__version__}/{dtype}/{threads} threads"
    path, best = CACHE / "peak_flops.json", {}
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    idle = best.get(key, 0.0)
    if measured and measured > idle:  # remember the best seen, as this machine's idle figure
        best[key] = measured
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(best, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass
    busy = other_busy_processes(local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    slow = measured and idle and measured < 0.5 * idle
    if not (busy or slow):
        return None
    what = (f"matmuls run at {measured / 1e9:.0f} GFLOP/s, {idle / 1e9:.0f} when this machine was idle"
            if slow else f"{busy} other busy process{'es' if busy > 1 else ''}")
    return (f"warning: this CPU is shared ({what}); each process takes {threads} threads and the threads of "
            f"jobs side by side fight for the cores: give each job --threads=N so the jobs' N add up to "
            f"{os.cpu_count()} or less (README: two jobs side by side)")
