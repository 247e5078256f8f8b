"""
The papers' experiments in miniature, each a real train.py run on the built-in dataset, as a user runs it:

    python experiments.py sweep [--out results/scaling_sweep.jsonl]      # 3 model sizes x 3 budgets
    python experiments.py ablate [--tables masking,moe] [--seeds 0,1] [--jobs 2]   # the ablations
    python experiments.py ablate --report                               # print the tables of the rows
    python experiments.py tune [--names half,b32] [--seeds 0] [--threads 1]   # the default run's knobs

The sweep's rows are fitted by `python scaling.py fit`. The ablations give every run the same training FLOPs
(a cheaper variant takes more steps), >= 2 seeds each, and table each variant as mean +- half the range; the
curve tables (masking256, unet_depth) record each run's accuracy along the way and report the FLOPs each
variant needs to reach an accuracy (`--budget` raises their budget; `--device=cuda` runs them on a GPU).
Every command resumes: rows already in its JSONL are not run again, and a run stopped part-way continues from
its checkpoint.
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np

import data
from model import PRESETS, flops_per_image, get_config, param_count
from report import pyplot, save_figure
from scaling import Help, fit_power_law, load_rows, read_jsonl

# -----------------------------------------------------------------------------
# Running train.py: sweep and ablate both launch it as a user would, and read the closing record it appends to
# out_dir/log.jsonl after its final evaluation ({"final": true, "val_loss", "acc_shape", ...}).


def run_train(run_dir, flags, extra_args=()):
    """Run `python train.py --key=value ... --out_dir=run_dir --resume=auto`, its output in
    run_dir/stdout.txt; returns the run's results: final_loss, the accuracies, the wall clock of the command
    (wall_s, Python's start included) and train.py's split of it (data_s, train_s, eval_s). A run stopped
    part-way continues on the next call (the times are then the last call's)."""
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "train.py", *(f"--{k}={v}" for k, v in flags.items()), f"--out_dir={run_dir}",
           "--resume=auto", *extra_args]
    t0 = time.time()
    with open(os.path.join(run_dir, "stdout.txt"), "a") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"train.py failed in {run_dir} (exit {code}); its output: {run_dir}/stdout.txt")
    log = os.path.join(run_dir, "log.jsonl")
    finals = []  # the closing records: one per call that ran to its end
    if os.path.exists(log):
        finals = [r for r in read_jsonl(log) if r.get("final")]
    if not finals:  # stopped by a signal: train.py checkpointed, and --resume=auto continues it next time
        raise RuntimeError(f"{run_dir}: train.py stopped before its end; run the same command to resume it")
    accs = [finals[-1][f"acc_{k}"] for k in ("shape", "colour", "position")]
    times = {k: finals[-1][k] for k in ("data_s", "train_s", "eval_s") if k in finals[-1]}
    return dict(final_loss=finals[-1]["val_loss"], acc_shape=accs[0], acc_colour=accs[1],
                acc_position=accs[2], acc_mean=sum(accs) / 3, **times,
                wall_s=round(time.time() - t0, 1), curve=read_curve(log))


def read_curve(log):
    """A run's evaluations from its log.jsonl, in step order, the final one last: [{step, samples, flops,
    val_loss, acc_shape, acc_colour, acc_position, acc_mean, eval_s, final}] (the FLOPs are the training FLOPs
    of the steps before it, as train.py counts them; a point redone after a resume is kept once, the last)."""
    keys = ("step", "samples", "flops", "val_loss", "acc_shape", "acc_colour", "acc_position", "acc_mean",
            "eval_s", "final")
    points = {r["step"]: {k: r[k] for k in keys if k in r} for r in read_jsonl(log) if "flops" in r}
    return [points[s] for s in sorted(points)]


def append_jsonl(path, row):
    with open(path, "a") as f:  # one line per finished run: an interrupted sweep keeps what it finished
        f.write(json.dumps(row) + "\n")

# -----------------------------------------------------------------------------
# sweep: small train.py runs on the built-in dataset

SWEEP_MODELS = ["MicroDiT_XS", "MicroDiT_S", "MicroDiT_M"]  # CPU-sized presets of model.py, smallest first
SWEEP_STEPS = [250, 500, 1000]                             # training budgets, in optimizer steps
SWEEP_BATCH = 32                                           # images per step
SWEEP_MASK_RATIO = 0.5                                     # passed to train.py, so the FLOPs counted match


def sweep(out_path="results/scaling_sweep.jsonl", models=SWEEP_MODELS, steps_list=SWEEP_STEPS,
          batch_size=SWEEP_BATCH, mask_ratio=SWEEP_MASK_RATIO, run_root="out/sweep"):
    """Train and evaluate every (model, steps) pair; append one JSON line per run to out_path."""
    unknown = [m for m in models if m not in PRESETS]
    if unknown:
        raise ValueError(f"sweep: unknown presets {unknown}; model.py has {list(PRESETS)}")
    done = set()  # an interrupted sweep resumes: runs already in out_path are not repeated
    if os.path.exists(out_path):
        done = {(r["model"], r["steps"]) for r in read_jsonl(out_path)}
    for model in models:
        f_img = flops_per_image(PRESETS[model], mask_ratio, train=True, caption_len=24)  # built-in 24 tokens
        for steps in steps_list:
            if (model, steps) in done:
                continue
            # each budget is its own run with its own schedule (warmup, then cosine to the end),
            # as in Chinchilla
            results = run_train(os.path.join(run_root, f"{model}_{steps}"), dict(
                model=model, max_steps=steps, warmup_steps=steps // 10, batch_size=batch_size,
                mask_ratio=mask_ratio, unmasked_steps=0))
            row = dict(model=model, params=param_count(PRESETS[model]), steps=steps,
                       images=steps * batch_size, flops=f_img * steps * batch_size, **results)
            append_jsonl(out_path, row)
            print(json.dumps(row))


# -----------------------------------------------------------------------------
# Ablations: the papers' claims in miniature. Every run gets the same training FLOPs, the budget C of the
# base run (MicroDiT_S at the recipe's 75% masking, 1,000 steps of 32 images, the last 10% unmasked as the
# recipe's stage 2), so a cheaper variant takes more steps. Each variant runs with >= 2 seeds (the seed
# also draws its own dataset).

ABLATION_BATCH = 32
ABLATION_BASE_STEPS = 1000
ABLATION_SEEDS = (0, 1)  # the seeds of a table not in TABLE_SEEDS
TABLE_SEEDS = {"masking256": (0, 1, 2), "unet_depth": (0, 1, 2), "data": (0, 1, 2)}
ABLATION_DATASET_SIZE = 40_000
ABLATION_UNMASKED = 0.1  # fraction of a masked run's steps trained unmasked at its end (recipe: 30K of 280K)
# A variant's training FLOPs are those of its `ref` variant x `budget`; a reference (ref None) takes `steps` x
# --base-steps steps; `steps_of` gives it the same steps as another variant instead (the equal-steps framing).
# `data`: train.py's options of the built-in dataset. `eval`: train.py's evaluation options, where a table's
# models cost as much to sample as to train (256 tokens, or a UNet at full resolution): CURVE_EVAL.
BASE = dict(model="MicroDiT_S", mask_ratio=0.75, model_args={}, budget=1.0, ref="deferred75", steps=1.0,
            steps_of=None, data={}, eval={})
# The curve tables' evaluations: along the way on the first 16 of the 128 held-out captions, at the end on all
# 128; 12 Heun steps (not 18) in both, as sampling these models costs as much as training them (on one core
# a point on 32 captions took 42 s, about 60 no-masking steps of MicroDiT_S_2)
CURVE_EVAL = dict(eval_n=128, curve_n=16, eval_steps=12)
S_2 = dict(model="MicroDiT_S_2", ref="deferred256", eval=CURVE_EVAL)  # 256 tokens, the mixer 43% at mask 0.75
UNET_C = dict(model="UNet_S", mask_ratio=0.0, model_args=dict(base_channels=24, head_dim=24),
              eval=CURVE_EVAL)  # 2.36M params
VARIANTS = {  # name -> what differs from BASE
    "deferred75": dict(ref=None),
    "nomask": dict(mask_ratio=0.0),
    "naive75": dict(model_args=dict(mixer_depth=0)),  # the same backbone, masked without a patch-mixer
    # unmasked and narrower, about the base's step cost (0.42 vs 0.45 training GFLOPs per image)
    "small": dict(mask_ratio=0.0, model_args=dict(dim=96, mixer_dim=96, mixer_depth=1)),
    "mask25": dict(mask_ratio=0.25),
    "mask50": dict(mask_ratio=0.5),
    "dense": dict(model_args=dict(num_experts=0)),  # a SwiGLU FFN of the same width in every block
    # the layer-wise widths' means
    "uniform": dict(model_args=dict(qkv_ratio=(0.75, 0.75), mlp_ratio=(2.5, 2.5))),
    "unet": dict(model="UNet_S", mask_ratio=0.0),  # 4.2M parameters against MicroDiT_S's 3.9M
    "quarter": dict(budget=0.25),
    "half": dict(budget=0.5),
    # masking256: MicroDiT_S_2, whose deferred run is 250 steps (of the default 1,000 --base-steps) x the
    # budget: ~8 min per x1 on one core (1.75 s per masked step of 32)
    "deferred256": {**S_2, "ref": None, "steps": 0.25},
    "nomask256": {**S_2, "mask_ratio": 0.0},
    "naive256": {**S_2, "model_args": dict(mixer_depth=0)},
    # unmasked, 0.73M parameters: 0.85 training GFLOPs per image against the masked steps' 0.83
    "small256": {**S_2, "mask_ratio": 0.0, "model_args": dict(dim=64, depth=6, mixer_depth=0)},
    # unet_depth: about equal parameters (2.40M vs 2.36M), one deeper in transformer blocks, one wider
    "unet_c": {**UNET_C, "ref": None, "steps": 0.2},  # 200 steps x --budget, ~1.0 s each on one core
    "unet_td": {**UNET_C, "ref": "unet_c",
                "model_args": dict(base_channels=16, head_dim=16, transformer_depth=(0, 1, 5), mid_depth=5)},
    # data: the deferred75 run's model and steps on other training sets (evaluated on the same full captions)
    "partial_captions": dict(steps_of="deferred75", data=dict(dataset_captions="partial")),
    "scenes2000": dict(steps_of="deferred75", data=dict(dataset_scenes=2000)),
}
ABLATION_TABLES = {  # name -> (the papers' claim, [(row label, variant)])
    "masking": ("Deferred masking with a patch-mixer beats naive masking, no masking and a smaller unmasked "
                "model of the same step cost, at equal compute (MicroDiT paper)",
                [("no masking", "nomask"), ("naive 75% masking, no patch-mixer", "naive75"),
                 ("deferred 75% masking, patch-mixer", "deferred75"),
                 ("smaller model, no masking", "small")]),
    "mask_ratio": ("With the patch-mixer, masking up to 75% costs little quality at equal compute "
                   "(MicroDiT paper)",
                   [("0", "nomask"), ("0.25", "mask25"), ("0.5", "mask50"), ("0.75", "deferred75")]),
    "moe": ("Expert-choice MoE beats a dense FFN (MicroDiT paper)",
            [("expert-choice MoE, every 2nd block", "deferred75"), ("dense FFN", "dense")]),
    "layer_scaling": ("Layer-wise scaled widths beat uniform widths (MicroDiT paper)",
                      [("layer-wise scaling", "deferred75"), ("uniform widths", "uniform")]),
    "unet": ("At matched size the backbone matters: the scaling paper compares UNets and transformers; here "
             "UNet_S against MicroDiT_S, about the same parameters, at equal FLOPs",
             [("MicroDiT_S, 75% masking", "deferred75"), ("MicroDiT_S, no masking", "nomask"),
              ("UNet_S", "unet")]),
    "compute": ("Quality follows a power law of training compute, S = 0.47 C^0.02 "
                "(scaling paper, TIFA, C in GFLOPs)",
                [("C/4", "quarter"), ("C/2", "half"), ("C", "deferred75")]),
    "masking256": ("At MicroDiT_XL_2's proportions (256 tokens, a backbone 4x deeper than the mixer, the "
                   "mixer 43% of the forward FLOPs at 75% masking; XL_2: 38%), deferred masking beats "
                   "naive masking, no masking and a smaller unmasked model at equal FLOPs (MicroDiT paper)",
                   [("no masking", "nomask256"), ("naive 75% masking, no patch-mixer", "naive256"),
                    ("deferred 75% masking, patch-mixer", "deferred256"),
                    ("smaller model (dim 64, 6 blocks), no masking", "small256")]),
    "unet_depth": ("More transformer blocks at the low-resolution levels beat more channels at about equal "
                   "parameters (scaling paper, Table 1's TD vs C UNets), at equal FLOPs",
                   [("deeper: C 16, transformer depth (0, 1, 5), middle 5", "unet_td"),
                    ("wider: C 24, transformer depth (0, 1, 1), middle 1", "unet_c")]),
    "data": ("Dense captions and diverse scenes matter (scaling paper): captions naming every attribute beat "
             "captions naming a random half of them, and the full set (40,000 images of about 7,100 distinct "
             "scenes) beats 2,000 distinct scenes, at equal steps; all scored on full held-out captions",
             [("full captions, 40,000 images", "deferred75"), ("partial captions", "partial_captions"),
              ("2,000 distinct scenes", "scenes2000")]),
}
ABLATION_KEYS = ("run", "variant", "seed", "model", "mask_ratio", "model_args", "params", "steps",
                 "unmasked_steps", "images", "flops", "final_loss", "acc_shape", "acc_colour", "acc_position",
                 "acc_mean", "wall_s")
# The curve tables: every run evaluates about CURVE_POINTS times along the way (eval_every = steps / 8),
# each record with the training FLOPs so far, so that one run gives a curve of accuracy against FLOPs. A
# table's budget is its base runs' steps x `budget` (--budget overrides it): the defaults are the budgets of
# the committed rows (docs/RESULTS.md), what three seeds of every variant cost in about 2 hours on two
# cores; a GPU (--device=cuda) takes them higher until the leading variant passes 0.8. The learning rate is
# warmup-stable-decay (train.py's wsd), the decay over the last DECAY of the steps: a point before the decay
# reads as the end of a shorter run less its decay (a lower bound), where
# under a cosine every point but the last is a run still at a high learning rate. `claimed`: the variant the
# claim says wins; `equal_steps`: the variant at whose step count the report reads every curve (the claim's
# equal-steps framing, read off the curves instead of runs of their own).
CURVE_TABLES = {"masking256": dict(claimed="deferred256", equal_steps="nomask256", budget=2.0),
                "unet_depth": dict(claimed="unet_td", equal_steps=None, budget=1.0)}
CURVE_POINTS = 8
DECAY = 0.2
THRESHOLDS = (0.5, 0.8)  # the mean accuracies whose FLOPs the report gives; a verdict needs the last passed


def model_args_text(overrides):
    """{field: value} -> train.py's --model_args text, e.g. "mixer_depth=0,mlp_ratio=2.5:2.5"."""
    parts = []
    for k, v in overrides.items():
        if isinstance(v, tuple):  # train.py reads a tuple as its items joined by ':'
            v = ":".join(map(str, v))
        parts.append(f"{k}={v}")
    return ",".join(parts)


COUNTED = {}  # the FLOP counter runs the model on the meta device, ~1 s a call: each config once a process


def ablation_runs(tables, seeds=None, base_steps=ABLATION_BASE_STEPS, batch_size=ABLATION_BATCH, budget=None):
    """The runs the tables need, each once: {run: dict(variant, seed, model, mask_ratio, model_args, data,
    steps, ...)}; seeds: every table's, or None for each table's own (TABLE_SEEDS, else ABLATION_SEEDS);
    budget: the curve tables' multiplier of their steps, or None for each one's own (CURVE_TABLES)."""
    unknown = [t for t in tables if t not in ABLATION_TABLES]
    if unknown:
        raise ValueError(f"ablate: unknown tables {unknown}; choose from {list(ABLATION_TABLES)}")

    def flops(cfg, mask_ratio):  # training FLOPs per image at one mask ratio, with the built-in 24 tokens
        key = (repr(cfg), mask_ratio)
        if key not in COUNTED:
            COUNTED[key] = flops_per_image(cfg, mask_ratio, train=True, caption_len=24)
        return COUNTED[key]

    def per_image(cfg, mask_ratio):  # training FLOPs per image, averaged over the masked and unmasked steps
        if not mask_ratio:
            return flops(cfg, 0.0)
        return (1 - ABLATION_UNMASKED) * flops(cfg, mask_ratio) + ABLATION_UNMASKED * flops(cfg, 0.0)

    def plan(variant, scale):  # (config, steps, unmasked steps, training FLOPs) of one run of the variant
        spec = {**BASE, **VARIANTS[variant]}
        cfg = replace(get_config(spec["model"]), **spec["model_args"])
        f_avg = per_image(cfg, spec["mask_ratio"])
        if spec["steps_of"]:
            steps = plan(spec["steps_of"], scale)[1]
        elif spec["ref"]:  # the reference's FLOPs x budget, in whole steps
            steps = round(spec["budget"] * plan(spec["ref"], scale)[3] / (f_avg * batch_size))
        else:
            steps = round(spec["steps"] * base_steps * scale)
        steps = max(1, steps)
        unmasked = round(ABLATION_UNMASKED * steps) if spec["mask_ratio"] else 0
        # one image's FLOPs through all the steps, masked then unmasked; times the batch
        image_flops = (steps - unmasked) * flops(cfg, spec["mask_ratio"]) + unmasked * flops(cfg, 0.0)
        return cfg, steps, unmasked, image_flops * batch_size

    runs = {}
    for t in tables:
        scale = (budget or CURVE_TABLES[t]["budget"]) if t in CURVE_TABLES else 1.0
        for _, variant in ABLATION_TABLES[t][1]:
            spec = {**BASE, **VARIANTS[variant]}
            cfg, steps, unmasked, run_flops = plan(variant, scale)
            curve = {}  # a curve table's run: evaluations along the way, wsd, the budget in its name
            if t in CURVE_TABLES:
                curve = dict(budget=scale, lr_schedule="wsd", decay_steps=max(1, round(DECAY * steps)),
                             eval_every=max(1, steps // CURVE_POINTS), curve_n=spec["eval"]["curve_n"])
            for seed in seeds or TABLE_SEEDS.get(t, ABLATION_SEEDS):
                texts = {k: model_args_text(spec[k]) for k in ("model_args", "data", "eval")}
                runs[f"{variant}_x{scale:g}_s{seed}" if curve else f"{variant}_s{seed}"] = dict(
                    variant=variant, seed=seed, model=spec["model"], mask_ratio=spec["mask_ratio"], **texts,
                    params=param_count(cfg), steps=steps, unmasked_steps=unmasked, images=steps * batch_size,
                    flops=run_flops, **curve)
    return runs


def ablate(out_path, tables=tuple(ABLATION_TABLES), seeds=None, jobs=2,
           base_steps=ABLATION_BASE_STEPS, batch_size=ABLATION_BATCH, run_root="out/ablate",
           data_root="data_cache", dataset_size=ABLATION_DATASET_SIZE, train_args=(), budget=None,
           device="auto"):
    """Train and evaluate every run the tables need, `jobs` at a time, on train.py's --device; one JSON line
    per finished run."""
    runs = ablation_runs(tables, seeds, base_steps, batch_size, budget)
    done = set()  # an interrupted ablation resumes: finished runs are not repeated
    if os.path.exists(out_path):
        done = {r["run"] for r in read_jsonl(out_path)}
    todo = {k: r for k, r in runs.items() if k not in done}
    print(f"ablate: {len(runs)} runs ({len(runs) - len(todo)} already in {out_path}), {jobs} at a time")

    def options(r):  # train.py's dataset_* flags of a run
        return VARIANTS[r["variant"]].get("data", {})

    def data_dir(r):  # one folder per seed and dataset options
        tag = "".join(f"_{k.removeprefix('dataset_')}{v}" for k, v in sorted(options(r).items()))
        return os.path.join(data_root, f"ablate_shapes32_seed{r['seed']}{tag}")

    datasets = {}  # folder -> a run that reads it: each dataset is written once, before the runs using it
    for r in todo.values():
        datasets[data_dir(r)] = r
    for folder, r in datasets.items():
        dataset_options = {k.removeprefix("dataset_"): v for k, v in options(r).items()}
        data.make_shapes_dataset(folder, dataset_size, res=32, seed=r["seed"], text_dim=64, **dataset_options)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    lock = threading.Lock()

    def run(name, r):
        flags = dict(model=r["model"], mask_ratio=r["mask_ratio"], model_args=r["model_args"],
                     max_steps=r["steps"], warmup_steps=r["steps"] // 10, unmasked_steps=r["unmasked_steps"],
                     batch_size=batch_size, seed=r["seed"], data_dir=data_dir(r), dataset_size=dataset_size,
                     threads=threads, ckpt_every=r["steps"])
        flags.update(options(r))
        flags.update(VARIANTS[r["variant"]].get("eval", {}))
        flags.update({k: r[k] for k in ("lr_schedule", "decay_steps", "eval_every") if k in r})
        flags["device"] = device
        results = run_train(os.path.join(run_root, name), flags, train_args)
        row = dict(run=name, **r, **results)
        with lock:
            append_jsonl(out_path, row)
            print(f"ablate: {name}: {r['steps']} steps, val loss {row['final_loss']:.4f}, mean accuracy "
                  f"{row['acc_mean']:.3f}, {row['wall_s']:.0f}s", flush=True)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run, k, r) for k, r in todo.items()]
        try:
            for future in futures:
                future.result()
        except BaseException:
            # the first failure (or Ctrl-C): no new runs start; finished ones stay in out_path
            pool.shutdown(cancel_futures=True)
            raise


def ablation_tables(rows, tables=tuple(ABLATION_TABLES), budget=None, plot_dir=None):
    """Markdown tables: each row a variant, its numbers the mean +- half the range over seeds; a curve table's
    report instead (curve_report, its plot in plot_dir)."""
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    def cell(rs, k, fmt):  # "mean ± half the range" of field k over the seeds' rows
        values = [r[k] for r in rs]
        half_range = (max(values) - min(values)) / 2
        return f"{np.mean(values):{fmt}} ± {half_range:{fmt}}"

    out = []
    for t in tables:
        if t in CURVE_TABLES:
            out += curve_report(t, rows, budget, plot_dir)
            continue
        claim, table_rows = ABLATION_TABLES[t]
        out += [f"### {t}", "", f"Claim: {claim}.", "",
                "| variant | params | train GFLOPs | steps (unmasked) | seeds | val loss (mask 0) | shape | "
                "colour | position | mean accuracy | wall s |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, v in table_rows:
            rs = by_variant.get(v, [])
            if not rs:
                out.append(f"| {label} | not run |" + " |" * 9)
                continue
            unmasked = rs[0]["unmasked_steps"] if rs[0]["mask_ratio"] else "all"
            out.append(f"| {label} | {rs[0]['params'] / 1e6:.2f}M | {rs[0]['flops'] / 1e9:,.0f} | "
                       f"{rs[0]['steps']} ({unmasked}) | "
                       f"{len(rs)} | {cell(rs, 'final_loss', '.4f')} | {cell(rs, 'acc_shape', '.3f')} | "
                       f"{cell(rs, 'acc_colour', '.3f')} | {cell(rs, 'acc_position', '.3f')} | "
                       f"{cell(rs, 'acc_mean', '.3f')} | {np.mean([r['wall_s'] for r in rs]):.0f} |")
        if t == "compute":
            pts = [r for label, v in table_rows for r in by_variant.get(v, [])]
            if len({r["flops"] for r in pts}) >= 2:
                gf = [r["flops"] / 1e9 for r in pts]
                a, b = fit_power_law(gf, [r["acc_mean"] for r in pts])
                la, lb = fit_power_law(gf, [r["final_loss"] for r in pts])
                out += ["", f"Fitted on these {len(pts)} runs (C in GFLOPs): "
                        f"mean accuracy = {a:.3g} C^{b:.3f}; val loss = {la:.3g} C^{lb:.3f}. "
                        "The paper: TIFA S = 0.47 C^0.02."]
        out.append("")
    return "\n".join(out)


# -----------------------------------------------------------------------------
# The curve tables' report: the FLOPs each variant needs to reach an accuracy, read off its runs' curves,
# and a verdict only where the budget can decide it


def flops_to(curve, threshold):
    """The training FLOPs at a run's first evaluation whose mean accuracy reaches threshold; inf if none does
    (an upper bound at the curve's resolution: the point before it had not reached it)."""
    return next((p["flops"] for p in curve if p.get("acc_mean", 0) >= threshold), np.inf)


def verdict(finals, claimed, bar=THRESHOLDS[-1]):
    """(verdict, why) from {variant: its seeds' final mean accuracies}. Drawn only where the leading
    variant's median passed `bar`; a gap counts only beyond the seeds' spread: every seed of one variant above
    every seed of the other."""
    median = {v: float(np.median(a)) for v, a in finals.items()}
    lead = max(median, key=median.get)
    if median[lead] < bar:
        return "undecided at this budget", f"the leading variant, {lead}, reached {median[lead]:.3f} < {bar}"
    above = lambda a, b: min(finals[a]) > max(finals[b])
    rivals = [v for v in finals if v != claimed]
    if all(above(claimed, v) for v in rivals):
        return "reproduced", f"every seed of {claimed} above every seed of {', '.join(rivals)}"
    if beaters := [v for v in rivals if above(v, claimed)]:
        return "not reproduced", f"every seed of {', '.join(beaters)} above every seed of {claimed}"
    tied = [v for v in rivals if not above(claimed, v)]
    return "undecided at this budget", f"{claimed}'s seeds overlap those of {', '.join(tied)}"


def curve_report(t, rows, budget=None, plot_dir=None):
    """A curve table's report, as markdown lines: per variant its seeds, final accuracy (on all eval_n
    captions), the FLOPs to each of THRESHOLDS, the accuracy at the equal-steps variant's step count and the
    cost of the evaluations along the way; the verdict; the plot of accuracy against FLOPs in plot_dir.
    budget: the runs' budget to report, or None for the largest that has rows."""
    claim, table_rows = ABLATION_TABLES[t]
    spec, variants = CURVE_TABLES[t], [v for _, v in table_rows]
    mine = [r for r in rows if r["variant"] in variants and "budget" in r and r.get("curve")]
    budget = budget or max((r["budget"] for r in mine), default=spec["budget"])
    by_variant = {v: [r for r in mine if r["variant"] == v and r["budget"] == budget] for v in variants}
    out = [f"### {t}, budget x{budget:g}", "", f"Claim: {claim}.", ""]
    if not any(by_variant.values()):
        return out + [f"No runs with curves at budget x{budget:g} yet: `python experiments.py ablate "
                      f"--tables={t} --budget={budget:g}` runs them.", ""]
    eq = by_variant.get(spec["equal_steps"]) or [{}]
    eq_steps = eq[0].get("steps")
    head = ["variant", "seeds", "steps", "final mean accuracy: median (range)", "val loss: median",
            *(f"FLOPs to {x}: median" for x in THRESHOLDS)]
    head += [f"mean accuracy at {eq_steps} steps"] * bool(eq_steps) + ["evaluations along the way"]
    out += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, v in table_rows:
        rs = by_variant[v]
        if not rs:
            out.append(f"| {label} | not run |" + " |" * (len(head) - 2))
            continue
        acc = [r["acc_mean"] for r in rs]
        cells = [label, len(rs), rs[0]["steps"], f"{np.median(acc):.3f} ({min(acc):.3f}-{max(acc):.3f})",
                 f"{np.median([r['final_loss'] for r in rs]):.4f}"]
        for x in THRESHOLDS:  # inf (not reached) counts in the median: most seeds must reach it
            reached = [flops_to(r["curve"], x) for r in rs]
            n = f"{np.isfinite(reached).sum()}/{len(rs)} seeds"
            cells.append(f"{np.median(reached):.3g} ({n})" if np.isfinite(np.median(reached)) else
                         f"not reached ({n})")
        if eq_steps:  # the last evaluation at or before that step count
            points = [max((p for p in r["curve"] if p["step"] <= eq_steps), key=lambda p: p["step"],
                          default={}) for r in rs]
            seen = [p for p in points if p]
            cells.append(f"{np.median([p['acc_mean'] for p in seen]):.3f} (step {seen[0]['step']})" if seen
                         else "-")
        cells.append(evaluation_cost(rs))
        out.append("| " + " | ".join(map(str, cells)) + " |")
    evals = sorted({r.get("eval") or "train.py's defaults" for rs in by_variant.values() for r in rs})
    out += ["", f"Each run evaluates every eval_every steps on the first curve_n held-out captions, and at "
            f"its end on all eval_n ({'; '.join(evals)}): the final accuracy is the last evaluation's."]
    finals = {v: [r["acc_mean"] for r in rs] for v, rs in by_variant.items()}
    seeds = len(TABLE_SEEDS[t])
    if short := [v for v in variants if len(finals[v]) < seeds]:
        word, why = "undecided at this budget", f"fewer than {seeds} seeds of {', '.join(short)}"
    else:
        word, why = verdict(finals, spec["claimed"])
    out += ["", f"Verdict: **{word}** ({why}). A verdict is drawn only where the leading variant's median "
            f"final mean accuracy passed {THRESHOLDS[-1]}, and a gap counts only where every seed of one "
            f"variant is above every seed of the other. FLOPs to an accuracy: the first evaluation that "
            f"reached it."]
    if plot_dir is not None:
        path = os.path.join(plot_dir, f"{t}_curves.png")
        plot_curves(t, table_rows, by_variant, path)
        out += ["", f"Plot: {path}"]
    return out + [""]


def evaluation_cost(rs):
    """The evaluations along the way of a variant's runs: how many, and their median wall clock as a fraction
    of the training loop's time without them."""
    along = [[p for p in r["curve"] if not p.get("final")] for r in rs]
    spent = [sum(p.get("eval_s", 0) for p in a) for a in along]
    share = [s / (r["train_s"] - s) for s, r in zip(spent, rs) if r.get("train_s", 0) > s]
    return f"{len(along[0])}" + (f": {np.median(share):.0%} of the training time" if share else "")


def plot_curves(t, table_rows, by_variant, path):
    """Mean accuracy against training FLOPs, one line per variant: the median over seeds, the band their
    range (the points along the way on curve_n captions, the last on all eval_n)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for label, v in table_rows:
        rs = by_variant[v]
        if not rs:
            continue
        steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in rs)))  # every seed's
        at = [{p["step"]: p for p in r["curve"]} for r in rs]
        flops = [at[0][s]["flops"] for s in steps]
        acc = np.array([[a[s].get("acc_mean", np.nan) for s in steps] for a in at])  # (seeds, points)
        line, = ax.plot(flops, np.median(acc, 0), "o-", ms=3, label=label)
        ax.fill_between(flops, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2, lw=0)
    for x in THRESHOLDS:
        ax.axhline(x, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="training FLOPs", ylabel="mean accuracy, held-out captions", ylim=(0, 1.02),
           title=f"{t}: median and range over seeds")
    ax.legend(fontsize=6, loc="upper left")
    save_figure(fig, path)


# -----------------------------------------------------------------------------
# tune: the default run (`python train.py`) with some of its knobs changed, one full run at a time, as a user
# runs it (the built-in dataset generated in each run's own folder, the final evaluation on the 128 held-out
# captions); its wall clock split into data generation, training and evaluation.

PREVIOUS = dict(model="MicroDiT_S", batch_size=64, max_steps=2000, warmup_steps=200, unmasked_steps=250,
                mask_ratio=0.5, lr=1e-3, min_lr_ratio=0.33, ema_decay=0.999, eval_steps=18,
                model_args="")  # the default before tuning; every candidate names all of these knobs
TUNING = {"previous": ("the default before the tuning", PREVIOUS)}


def then(name, prev, what, **changes):
    """A candidate: `prev`'s knobs with `changes`, and why it was tried."""
    TUNING[name] = (what, {**TUNING[prev][1], **changes})


then("half", "previous", "800 steps (100 unmasked), EMA 0.995 to match the shorter run",
     max_steps=800, warmup_steps=80, unmasked_steps=100, ema_decay=0.995)
then("half_lr2", "half", "`half` at twice the learning rate", lr=2e-3)
then("b32", "half", "twice the steps at half the batch: the same images, twice the updates",
     batch_size=32, max_steps=1600, warmup_steps=160, unmasked_steps=200, ema_decay=0.9975)
then("naive75", "previous", "no patch-mixer, 75% masked (naive masking beat deferred at equal FLOPs in the "
     "masking ablation): a masked step costs a third of the default's", model_args="mixer_depth=0",
     mask_ratio=0.75, unmasked_steps=200)
then("naive75_1600", "naive75", "`naive75` in 1,600 steps",
     max_steps=1600, warmup_steps=160, unmasked_steps=160)
then("naive75_u400", "naive75", "shape was the weak attribute (0.80): twice the unmasked steps at the end, "
     "in 1,800 steps to keep the time", max_steps=1800, warmup_steps=180, unmasked_steps=400)
then("naive75_u400_lr01", "naive75_u400", "the same with the cosine down to 0.1 of the peak lr",
     min_lr_ratio=0.1)
# train.py's defaults since the tuning (its preset MicroDiT_S_nomixer is MicroDiT_S with mixer_depth=0):
then("naive50_b32", "naive75", "more of each image seen (half masked) and twice the updates per image "
     "(batch 32), in about naive75's time; became the default", batch_size=32, mask_ratio=0.5,
     max_steps=2900, warmup_steps=290, unmasked_steps=400)
then("naive50_b32_2700", "naive50_b32", "`naive50_b32` measured 0.502x the previous default's wall "
     "clock: 200 fewer masked steps (shape fell to 0.84 on seed 2: not taken)", max_steps=2700,
     warmup_steps=270)
then("naive50_b32_u200", "naive50_b32", "an unmasked step costs 1.5-2x a masked one and 400 unmasked steps "
     "did not beat 200 at 75% masking: 200 of them, the same 2,900 steps (shape fell to 0.86 on seed 2: not "
     "taken)", unmasked_steps=200)
then("naive50_b32_u100", "naive50_b32_u200", "100 unmasked steps; seed 0 only (`naive50_b32_u200` missed "
     "on seed 2, so this line was not pursued)", unmasked_steps=100)
then("naive50_b32_u200_ema998", "naive50_b32_u200", "EMA 0.998 for the unmasked steps' share of the average: "
     "the same weights bit for bit, as the EMA's warm-up min(decay, (1 + step) / (10 + step)) is below "
     "0.998 for the whole run", ema_decay=0.998)
then("naive75_b32", "naive75", "twice the updates per image (batch 32), in about naive75's time",
     batch_size=32, max_steps=3800, warmup_steps=380, unmasked_steps=400)
then("naive50", "naive75", "half masked instead of 75%: more of each image seen, fewer steps in equal time",
     mask_ratio=0.5, max_steps=1500, warmup_steps=150)
TUNE_KEYS = ("run", "name", "seed", "threads", *PREVIOUS, "final_loss", "acc_shape", "acc_colour",
             "acc_position", "acc_mean", "data_s", "train_s", "eval_s", "wall_s")


def tune(out_path="results/tuning.jsonl", names=tuple(TUNING), seeds=(0,), threads=0, run_root="out/tune"):
    """One `python train.py` per (candidate, seed), one at a time; a JSON line per finished run (resumable,
    as every command here)."""
    unknown = [n for n in names if n not in TUNING]
    if unknown:
        raise ValueError(f"tune: unknown candidates {unknown}; choose from {list(TUNING)}")
    done = set()  # runs already in out_path are not repeated
    if os.path.exists(out_path):
        done = {r["run"] for r in read_jsonl(out_path)}
    for name in names:
        for seed in seeds:
            run = f"{name}_s{seed}"
            if run in done:
                continue
            knobs = TUNING[name][1]
            run_dir = os.path.join(run_root, run)  # its dataset inside it: generated in the run, as by a user
            results = run_train(run_dir, dict(**knobs, seed=seed, threads=threads,
                                              data_dir=os.path.join(run_dir, "data")))
            append_jsonl(out_path, dict(run=run, name=name, seed=seed, threads=threads, **knobs, **results))
            print(f"tune: {run}: mean accuracy {results['acc_mean']:.3f} (shape {results['acc_shape']:.3f}), "
                  f"wall {results.get('wall_s', 0):.0f}s", flush=True)


def tuning_table(rows):
    """Markdown: one row per candidate, the mean over its seeds."""
    out = ["| candidate | why | knobs changed from `previous` | seeds | steps x batch | val loss | shape "
           "| colour | position | mean | data s | train s | eval s | wall s |", "|---" * 14 + "|"]
    for name, (what, knobs) in TUNING.items():
        rs = [r for r in rows if r["name"] == name]  # its seeds
        if not rs:
            continue
        keys = ("final_loss", "acc_shape", "acc_colour", "acc_position", "acc_mean", "data_s", "train_s",
                "eval_s", "wall_s")
        mean = {k: np.mean([r[k] for r in rs]) for k in keys}
        changed = ", ".join(f"{k} {v}" for k, v in knobs.items() if v != PREVIOUS[k]) or "-"
        cells = [name, what, changed, len(rs), f"{knobs['max_steps']} x {knobs['batch_size']}",
                 f"{mean['final_loss']:.4f}"]
        cells += [f"{mean[k]:.3f}" for k in ("acc_shape", "acc_colour", "acc_position", "acc_mean")]
        cells += [f"{mean[k]:.0f}" for k in ("data_s", "train_s", "eval_s", "wall_s")]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    sub = p.add_subparsers(dest="cmd", required=True)
    def add(name, text):  # a subcommand whose --help starts with its one-line description
        return sub.add_parser(name, help=text, description=text, formatter_class=Help)

    s = add("sweep", "train and evaluate a grid of small models (calls train.py)")
    s.add_argument("--out", default="results/scaling_sweep.jsonl", help="results JSONL, one row per run")
    a = add("ablate", "the papers' ablations in miniature, at equal FLOPs (calls train.py)")
    a.add_argument("--out", default="results/ablations.jsonl", help="rows JSONL, one per finished run")
    a.add_argument("--tables", default=",".join(ABLATION_TABLES), help="comma-separated, from: "
                   + ", ".join(ABLATION_TABLES))
    a.add_argument("--seeds", default="", help="comma-separated seeds for every table; default: "
                   + "; ".join(f"{t} {','.join(map(str, s))}" for t, s in TABLE_SEEDS.items())
                   + f"; the others {','.join(map(str, ABLATION_SEEDS))}")
    a.add_argument("--jobs", type=int, default=2, help="runs at a time, each with cpu_count/jobs threads")
    a.add_argument("--base-steps", type=int, default=ABLATION_BASE_STEPS,
                   help="the budget C, in base-run steps")
    a.add_argument("--budget", type=float, default=None, help="the curve tables' budget, a multiple of their "
                   "base runs' steps; None: each table's own (" + ", ".join(
                       f"{t} x{c['budget']:g}" for t, c in CURVE_TABLES.items()) + "); with --report: the "
                   "budget to report, None: the largest that has rows")
    a.add_argument("--device", default="auto", help="train.py's --device for every run: auto, cpu, cuda, ...")
    a.add_argument("--run-root", default="out/ablate", help="one train.py out_dir per run below it")
    a.add_argument("--data-root", default="data_cache", help="one built-in dataset per seed below it")
    a.add_argument("--dataset-size", type=int, default=ABLATION_DATASET_SIZE, help="built-in dataset size")
    a.add_argument("--train-args", default="",
                   help="extra train.py arguments for every run, e.g. '--eval_n=64'")
    a.add_argument("--report", action="store_true", help="only print the tables of --out")
    t = add("tune", "the default run with some knobs changed, one run at a time (calls train.py)")
    t.add_argument("--out", default="results/tuning.jsonl", help="rows JSONL, one per finished run")
    t.add_argument("--names", default=",".join(TUNING), help="comma-separated candidates, from: "
                   + ", ".join(TUNING))
    t.add_argument("--seeds", default="0", help="comma-separated seeds")
    t.add_argument("--threads", type=int, default=0, help="train.py's --threads (0: every core)")
    t.add_argument("--run-root", default="out/tune", help="one train.py out_dir per run below it")
    t.add_argument("--report", action="store_true", help="only print the table of --out")
    p.epilog = "\n".join(f"python experiments.py {name} ...:\n{q.format_help()}"
                         for name, q in sub.choices.items())
    args = p.parse_args(argv)
    try:
        if args.cmd == "sweep":
            return sweep(args.out)
        if args.cmd == "tune":
            if not all(x.strip().isdigit() for x in args.seeds.split(",")) or args.threads < 0:
                p.error("tune: --seeds must be comma-separated integers and --threads >= 0")
            names = [n for n in args.names.split(",") if n]
            if unknown := [n for n in names if n not in TUNING]:
                p.error(f"tune: unknown --names {unknown}; choose from {', '.join(TUNING)}")
            if not args.report:
                tune(args.out, names, [int(x) for x in args.seeds.split(",")], args.threads, args.run_root)
            print(tuning_table(load_rows(args.out, TUNE_KEYS)))
            return
        tables = [t for t in args.tables.split(",") if t]
        unknown = [t for t in tables if t not in ABLATION_TABLES]
        if unknown:
            p.error(f"ablate: unknown --tables {unknown}; choose from {', '.join(ABLATION_TABLES)}")
        if args.budget is not None and not args.budget > 0:
            p.error(f"ablate: --budget must be > 0, got {args.budget}")
        if not args.report:
            if args.seeds and not all(x.strip().isdigit() for x in args.seeds.split(",")):
                p.error(f"ablate: --seeds must be comma-separated integers, got {args.seeds!r}")
            if args.jobs < 1 or args.base_steps < 1:
                p.error("ablate: need --jobs >= 1 and --base-steps >= 1")
            seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
            ablate(args.out, tables, seeds, args.jobs, args.base_steps,
                   run_root=args.run_root, data_root=args.data_root, dataset_size=args.dataset_size,
                   train_args=args.train_args.split(), budget=args.budget, device=args.device)
        print(ablation_tables(load_rows(args.out, ABLATION_KEYS), tables, args.budget,
                              plot_dir=os.path.dirname(args.out) or "."))
    except (ValueError, OSError, RuntimeError) as e:  # one line, the rows kept: exit 2 for a file the command
        # names that is not there (--report), 1 for a failed or stopped run or damaged rows
        p.exit(2 if isinstance(e, FileNotFoundError) else 1, f"experiments.py: error: {e}\n")


if __name__ == "__main__":
    main()
