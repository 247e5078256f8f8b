"""
What a run reports: its plan and price in GPU-hours and dollars, and its curves.

train.py prints each run's plan and price before it starts and draws its curves when it ends; scaling.py
prices the whole MicroDiT recipe with the same figures (`python scaling.py cost`). Both read them here, so
that the training script does not load the scaling laws' machinery (and the encoders, FID and memory models
behind it).
"""
import json

import numpy as np

from checkpoint import atomic_write
from model import num_params

# -----------------------------------------------------------------------------
# price

# NVIDIA's H100 SXM datasheet gives BF16 Tensor Core 1,979 TFLOPS "with sparsity" (2:4); dense is half of that
H100_BF16_PEAK = 989.4e12  # FLOP/s, bf16 dense
# the MicroDiT paper (arXiv 2407.15811) prices its run at $3.75 per H100-hour: $1,890 for 2.6 days on 8 GPUs
PRICE_PER_GPU_HOUR = 3.75  # dollars per H100-hour
DEFAULT_MFU = 0.4          # assumed for pricing; the paper's own run implies less: `python scaling.py cost`


def gpu_hours(flops, gpu_peak=H100_BF16_PEAK, mfu=DEFAULT_MFU):
    """GPU-hours to do `flops` at a fraction `mfu` of the GPU's peak FLOP/s."""
    return flops / (gpu_peak * mfu) / 3600


def dollars(hours, price=PRICE_PER_GPU_HOUR):
    return hours * price


def print_plan(cfg, run, net, flops_at, mask_at, step):
    """What a train.py run is, before its first step: the model, its FLOPs and price, the device and the batch
    arithmetic (cfg: train.py's TrainConfig; run: its Run; flops_at: training FLOPs per image, by mask)."""
    total = sum(flops_at[mask_at(s)] for s in range(step, cfg.max_steps)) * cfg.batch_size
    unmasked = ""
    if cfg.unmasked_steps and cfg.mask_ratio:
        unmasked = f", the last {cfg.unmasked_steps} steps unmasked"
    bf16 = " bf16" if run.bf16 else ""
    print(f"model {cfg.model}: {num_params(net):,} parameters, {flops_at[cfg.mask_ratio] / 1e9:.2f} training "
          f"GFLOPs per image at mask ratio {cfg.mask_ratio}{unmasked}; device {run.device}{bf16}, "
          f"peak {run.peak / 1e12:.2f} TFLOP/s (measured matmul)")
    # (`python scaling.py cost` prices the whole recipe, at any MFU and price)
    print(f"this run: {total:.2e} training FLOPs, {gpu_hours(total):.2g} H100-hours = "
          f"${dollars(gpu_hours(total)):.2g} at {DEFAULT_MFU:.0%} MFU and ${PRICE_PER_GPU_HOUR}/hour "
          f"(scaling.py)")
    print(f"batch {cfg.batch_size} = {run.world} ranks x {run.grad_accum} accumulation x {run.micro_batch} "
          f"micro-batch; {run.lanes} data lanes")

# -----------------------------------------------------------------------------
# curves: a run's log.jsonl (train.py) and a sweep's results (experiments.py) are JSON lines


def read_jsonl(path):
    """The records of a JSONL file, with a one-line error naming the line that is not JSON."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
    return rows


def pyplot():
    """matplotlib's pyplot, drawing to files (Agg): loaded only when a plot is made, as it takes a second."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    fig.tight_layout()
    with atomic_write(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, dpi=110, format="png")
    pyplot().close(fig)


def plot_run(log_path, path):
    """A training run's curves from its log.jsonl: the training loss by step and, when the run has them,
    its evaluations (validation loss; the accuracy of its samples per attribute)."""
    plt, rows = pyplot(), read_jsonl(log_path)
    train = np.array([(r["step"], r["loss"]) for r in rows if np.isfinite(r.get("loss", np.nan))])
    train = train.reshape(-1, 2)  # (steps logged, 2)
    evals = [r for r in rows if "val_loss" in r or "acc_mean" in r]
    accs = [k for k in ("acc_shape", "acc_colour", "acc_position", "acc_mean") if any(k in r for r in evals)]
    if accs:  # a second panel for the accuracies
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    else:
        fig, axes = plt.subplots(1, 1, figsize=(5, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot(train[:, 0], train[:, 1], label="training loss (mean since the last line)")
    val = [(r["step"], r["val_loss"]) for r in evals if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (mask 0)")
    ax.set(yscale="log", xlabel="step", ylabel="EDM loss", title="loss")
    ax.legend(fontsize=7)
    for k in accs:
        points = [(r["step"], r[k]) for r in evals if k in r]
        axes[0, 1].plot(*zip(*points), "o-", label=k.removeprefix("acc_"))
    if accs:
        axes[0, 1].set(xlabel="step", ylabel="accuracy on held-out captions", ylim=(0, 1.02), title="samples")
        axes[0, 1].legend(fontsize=7)
    save_figure(fig, path)
