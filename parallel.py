"""
The hardware a run uses: the processes (torchrun's ranks) and the signals that stop them, the device of each,
the CPU threads, and a check that the machine is not shared with another heavy job. Plain `python train.py`
is one process; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK and each rank joins the process group (gloo on
CPU, nccl on CUDA). Beyond DDP: FSDP2 (each block's parameters, gradients and AdamW moments sharded over the
ranks) and activation checkpointing, and the full (gathered) state that checkpoints hold whatever the sharding.
"""
import contextlib
import functools
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from config import UsageError
from model import Block, IFAttention, Resample, ResBlock, TransformerBlock

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
    rank, world = 0, 1  # plain python: one process
    if ddp:
        rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ddp, rank, world, device


def default_threads():
    """The CPU threads one process should use: the cores it may run on, shared by this machine's ranks."""
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on (taskset, cgroups)
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def check_device(device):
    """A one-line error (a UsageError) for a device this machine does not have."""
    kind = "auto"
    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            kind = "unknown"
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={device}: no CUDA device here (torch {torch.__version__}, "
                         f"cuda available: False); use --device=cpu or auto")
    index = torch.device(device).index if kind == "cuda" else None
    if index is not None and index >= torch.cuda.device_count():
        raise UsageError(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA devices")
    mps = kind == "mps" and torch.backends.mps.is_available()
    if kind not in ("auto", "cpu", "cuda") and not mps:
        raise UsageError(f"--device={device}: expected auto, cpu, cuda, cuda:N (or mps where available)")


class StopSignals:
    """SIGTERM or Ctrl-C (a preemption, a user): said at once, then the step is finished, a checkpoint written
    and the run exits 0. A second Ctrl-C stops at once, without a checkpoint (KeyboardInterrupt)."""

    def __init__(self, master, next_step):
        self.master = master  # only the master process prints
        self.next_step = next_step  # () -> the step being finished, for the message
        self.requested = False  # a stop was asked for
        self.handlers = {}  # the handlers replaced, to restore
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.handlers[sig] = signal.signal(sig, self.on_signal)

    def on_signal(self, sig, frame):
        if self.requested and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.master:
            again = "; press Ctrl-C again to stop without one" if sig == signal.SIGINT else ""
            print(f"\n{signal.Signals(sig).name}: finishing step {self.next_step()}, then writing a "
                  f"checkpoint{again}", flush=True)

    def restore(self):
        for sig, handler in self.handlers.items():  # signals act as usual again
            signal.signal(sig, handler)


def agree(ddp, device, stop_requested, bad):
    """(stopping, bad) as the ranks agree: a signal may reach them at different steps, and a loss may be
    non-finite on one rank only, so a flag raised on any rank holds on every rank."""
    flags = torch.stack([torch.tensor(float(stop_requested), device=device), bad.float()])
    if ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]  # (stopping, bad)


def ignore_stop_signals(worker_id):
    """DataLoader workers ignore SIGINT and SIGTERM: a signal to the whole process group (Ctrl-C, a cluster's
    preemption) must not kill them while the main process finishes its step and writes its checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def measure_peak_flops(device, dtype, n=2048, seconds=1.0):
    """Achieved FLOP/s of a large square matmul: the denominator of MFU on this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():  # CUDA runs the matmuls asynchronously: wait for them before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize()

    a @ b  # warm-up
    sync()
    t0 = time.perf_counter()
    k = 0  # matmuls done
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
    path = CACHE / "peak_flops.json"
    best = {}  # {key: the best FLOP/s seen}
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
    if slow:
        what = f"matmuls run at {measured / 1e9:.0f} GFLOP/s, {idle / 1e9:.0f} when this machine was idle"
    elif busy == 1:
        what = "1 other busy process"
    else:
        what = f"{busy} other busy processes"
    return (f"warning: this CPU is shared ({what}); each process takes {threads} threads and the threads of "
            f"jobs side by side fight for the cores: give each job --threads=N so the jobs' N add up to "
            f"{os.cpu_count()} or less (README: two jobs side by side)")


# -----------------------------------------------------------------------------
# FSDP2 and activation checkpointing. A block is a unit of both: MicroDiT's mixer and backbone blocks; the
# UNet's ResBlocks, transformer blocks (IF: attention blocks) and resamplers (its levels are containers that
# are never called, so they cannot be the unit; a SpatialTransformer is not one but its TransformerBlocks are:
# SDXL's 10-deep middle one would be gathered and recomputed at once, a third of the network). The rest
# (embeddings, caption path, final layer) is the root's.


def blocks(net):
    """(name, module) of every block of a network; none nests inside another."""
    kinds = (Block, ResBlock, TransformerBlock, IFAttention, Resample)
    return [(name, m) for name, m in net.named_modules() if isinstance(m, kinds)]


def shard(net, device, bf16):
    """FSDP2 on each block, then on the root: between its forward and backward, a block's parameters are
    gathered whole; the rest of the time each rank holds 1/world of them, of their gradients and AdamW's
    moments. On CUDA with bf16: bf16 compute, fp32 gradient reduction (the weights stay fp32)."""
    mixed = bf16 and device.type == "cuda"
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if mixed else MixedPrecisionPolicy()
    for _, block in blocks(net):
        fully_shard(block, mp_policy=mp)
    return fully_shard(net, mp_policy=mp)


def checkpoint_blocks(net):
    """Activation checkpointing: each block keeps only its input for the backward pass and recomputes its
    activations then (non-reentrant; the module tree and state-dict names are unchanged)."""
    for _, block in blocks(net):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def grad_sync(model, ddp, fsdp, sync):
    """The context of a micro-batch's backward: gradients are reduced over the ranks on the last one only."""
    if fsdp:
        model.set_requires_gradient_sync(sync)
    if ddp and not fsdp and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def full_weights(module, plain, fsdp, device):
    """A module holding the full weights of `module`, for rank 0 to evaluate and save: the module itself, or
    under FSDP `plain` (rank 0's unsharded copy) loaded with them. Under FSDP every rank must call this:
    gathering the shards is a collective."""
    if not fsdp or module is None:
        return module
    options = StateDictOptions(full_state_dict=True, cpu_offload=device.type == "cuda")
    sd = get_model_state_dict(module, options=options)
    if plain is not None:
        plain.load_state_dict(sd)
    return plain


def full_optimizer_state(net, opt, fsdp, device):
    """AdamW's state as checkpoints hold it, {param index: {exp_avg, exp_avg_sq, step}}, gathered whole under
    FSDP (a collective: every rank calls it; the full tensors are on rank 0)."""
    if not fsdp:
        return opt.state_dict()["state"]
    options = StateDictOptions(full_state_dict=True, cpu_offload=device.type == "cuda")
    sd = get_optimizer_state_dict(net, opt, options=options)
    index = {name: i for i, (name, _) in enumerate(net.named_parameters())}
    return {index[name]: state for name, state in sd["state"].items()}


def load_optimizer_state(net, opt, per_param, fsdp):
    """Load a checkpoint's AdamW state (by param index) into this run's optimizer, sharded under FSDP. lr,
    betas and weight decay come from this run's config, not from the checkpoint's."""
    if not fsdp:
        return opt.load_state_dict({"state": per_param, "param_groups": opt.state_dict()["param_groups"]})
    names = [name for name, _ in net.named_parameters()]
    full = StateDictOptions(full_state_dict=True)
    groups = get_optimizer_state_dict(net, opt, options=full)["param_groups"]
    state = {names[i]: s for i, s in per_param.items()}  # FSDP's optimizer state is keyed by parameter name
    set_optimizer_state_dict(net, opt, {"state": state, "param_groups": groups}, options=full)
