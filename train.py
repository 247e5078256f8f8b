"""
Train a text-to-image diffusion model on latent shards. With no arguments it trains a CPU-sized MicroDiT on
the built-in shapes dataset (generated on first use) in minutes:

    python train.py                                   # the built-in default
    python train.py configs/my_run.py --max_steps=500 # a config file, then --key=value overrides
    torchrun --standalone --nproc_per_node=8 train.py configs/stage1_256_masked.py   # DDP, one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

SIGTERM or SIGINT (a preemption, Ctrl-C) finishes the current step, writes a checkpoint and exits 0; run the
same command with --resume=auto to continue bit-exactly. Under torchrun, raise --shutdown_timeout (30 s by
default, then SIGKILL) above one step plus one checkpoint write. A live run locks its out_dir (lock.py).
Exit status: 0 done (or stopped by a signal, its checkpoint written), 2 a command to change (a bad flag, value
or config file, a missing input, an out_dir holding another run), 1 a failed job (a damaged checkpoint, a full
disk, non-finite steps, an out_dir held by a live job).

Reads top to bottom: the config; this process's place in the run; train() and loop(), which reads in labelled
sections; then the pieces it calls, in the order it calls them; last, the checks of every config value.
"""
import contextlib
import copy
import json
import math
import os
import re
import sys
import time
import typing
import weakref
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

import data
import lock
import shapes
from checkpoint import (add_results, atomic_write, claim_out_dir, keep_log_until, list_checkpoints,
                        load_checkpoint, push_to_hub, read_checkpoint, remove, resolve_checkpoint,
                        save_pretrained, save_train_state, set_aside)
from config import UsageError, load_config, model_overrides, print_help
from diffusion import Denoiser, drop_captions, edm_loss, sample_sigma, training_noise
from model import PRESETS, build_model, flops_per_image, get_config, model_type
from parallel import (StopSignals, agree, busy_warning, check_device, checkpoint_blocks, default_threads,
                      full_optimizer_state, full_weights, grad_sync, ignore_stop_signals,
                      load_optimizer_state, measure_peak_flops, setup_distributed, shard)
from report import plot_run, print_plan
from sample import generate, image_grid


@dataclass
class TrainConfig:
    # data
    dataset: str = "shapes"          # "shapes": the built-in dataset, made if missing; "shards"
    data_dir: str = ""               # latent shards (index.json + shard-*.safetensors): a local folder or
                                     # hf://datasets/USER/NAME[@REV][/SUBDIR]; "" = the built-in one in
                                     # data_cache/shapes<res>_n<size>_seed<seed>_d<width>_ctx<context>
    dataset_size: int = 40_000       # built-in dataset: training images to generate (its folder is named by
                                     # size, seed, resolution, caption width and context: another is another)
    text_context: float = 0.7        # built-in dataset: the text encoder's causal context, 0 = none
    dataset_scenes: int = 0          # built-in dataset: images cycle through this many distinct scenes; 0 = a
                                     # fresh draw for each
    dataset_captions: str = "full"   # built-in dataset: "partial" names a random part of each object's
                                     # attributes in every training caption (held-out captions stay full)
    shuffle_buffer: int = 8192       # records shuffled together in memory
    num_workers: int = 0             # DataLoader workers per rank and lane
    data_lanes: int = 0              # shard streams dealt out to ranks, each filling batch_size/lanes of
                                     # every global batch; 0 = world size. A fixed value (a multiple of every
                                     # world size used) makes the data order independent of the world size
    # model
    model: str = "MicroDiT_S_nomixer"  # a preset of model.py
    model_args: str = ""             # overrides of the preset's fields, e.g. "mixer_depth=0,num_experts=0"
                                     # or "mlp_ratio=2.5:2.5" (a tuple field: values joined by ':')
    latent_size: int = 0             # 0 = the preset's; 64 for MicroDiT at 512px
    pos_interp_scale: float = 0.0    # 0 = the preset's; 2 at 512px keeps the 256px position range (as
                                     # micro_diffusion/configs/res_512_*.yaml set it)
    # diffusion (EDM, Karras et al. 2022: Table 1's preconditioning and training noise)
    P_mean: float = -0.6             # ln(sigma) ~ N(P_mean, P_std^2) during training
    P_std: float = 1.2               # (EDM's training noise distribution; sampling uses the Karras schedule)
    sigma_data: float = 0.9          # the data's std in the preconditioning; recorded in every checkpoint
    mask_ratio: float = 0.5          # fraction of patches dropped (after the patch-mixer, if any)
    unmasked_steps: int = 400        # the last this-many steps train unmasked, as the recipe's stages 2 and 4
                                     # do: sampling is always unmasked, so the model ends on what it will see.
                                     # A count, not scaled with max_steps: a run this short is warned
    caption_dropout: float = 0.1     # captions replaced by zeros, for classifier-free guidance
    # optimisation (AdamW)
    batch_size: int = 32             # global batch, whatever the world size: micro_batch x grad_accum x world
    grad_accum: int = 1              # micro-batches per optimizer step (when micro_batch = 0)
    micro_batch: int = 0             # images per rank per forward pass; > 0: grad_accum = batch_size /
                                     # (micro_batch x world), so one config fits any GPU count
    max_steps: int = 2900            # the default run: 10-14 min on 2 CPU cores (as measured)
    lr: float = 1e-3                 # peak learning rate of AdamW
    lr_schedule: str = "cosine"      # "cosine" (warmup, cosine to lr * min_lr_ratio), "constant" (warmup) or
                                     # "wsd" (warmup, constant, then decay_steps down to lr * min_lr_ratio)
    warmup_steps: int = 290          # steps of linear warmup to lr; a count, not scaled with max_steps: a
                                     # shorter run is warned
    min_lr_ratio: float = 0.33       # the floor of the cosine, and where wsd's decay ends: a fraction of lr
    weight_decay: float = 0.1        # AdamW's decoupled weight decay
    beta1: float = 0.9               # AdamW's first-moment decay
    beta2: float = 0.999             # AdamW's second-moment decay
    eps: float = 1e-8                # AdamW's denominator epsilon
    grad_clip: float = 1.0           # max gradient norm; 0 = off
    ema_decay: float = 0.999         # EMA of the weights; 0 = no EMA. Warmed up: the decay at step s is
                                     # min(ema_decay, (1 + s) / (10 + s)), below 0.999 until step 8,990
    max_bad_steps: int = 5           # a non-finite loss or gradient skips the step; this many in a row stop
    decay_steps: int = 0             # wsd: the last this-many steps decay linearly to lr * min_lr_ratio
    # system
    device: str = "auto"             # "auto" = cuda if available, else cpu
    bf16: typing.Optional[bool] = None  # bf16 autocast; None = on for CUDA, off for CPU (bf16 keeps fp32's
                                     # exponent range, so no GradScaler: fp16 autocast is not offered)
    compile: bool = False            # torch.compile the model
    fsdp: bool = False               # FSDP2: shard weights, gradients, AdamW moments and EMA over the ranks
                                     # (each block, then the root); checkpoints are the same files as DDP's
    act_ckpt: bool = False           # activation checkpointing of each block: less memory, ~1/3 more compute
    seed: int = 0                    # initial weights, noise, data order and the built-in dataset's scenes
    threads: int = 0                 # CPU threads for torch; 0 = the cores this process may use, shared by
                                     # the ranks of one machine. Two jobs side by side: give each half
    # logging, evaluation, checkpoints
    out_dir: str = "out/default"     # one run's checkpoints, log.jsonl, sample grids and loss curve
    overwrite: bool = False          # delete the run already in out_dir and start a new one there
    log_every: int = 100             # steps between log lines
    eval_every: int = 0              # steps between sample grids + scores; 0 = only at the end
    eval_n: int = 128                # held-out captions sampled at the final evaluation
    curve_n: int = 0                 # held-out captions (the first of eval_n's) sampled at the evaluations
                                     # along the way (eval_every); 0 = eval_n
    eval_steps: int = 18             # Heun steps of the evaluation sampler
    eval_guidance: float = 4.0       # classifier-free guidance of the evaluation sampler
    val_n: int = 256                 # held-out images for the validation loss (mask ratio 0)
    ckpt_every: int = 1000           # steps between checkpoints (and one at the end)
    keep_ckpts: int = 2              # newest checkpoints kept in out_dir
    push_to_hub: str = ""            # a Hub repo id: the final checkpoint (weights, config, card) is uploaded
    resume: str = ""                 # full state: "auto" = newest checkpoint of out_dir that loads, or a path
    init_from: str = ""              # when nothing is resumed: a checkpoint (or run folder) whose weights
                                     # start this run at step 0; pos_embed is recomputed for this latent size
    init_state: bool = False         # with init_from: also its optimizer state, step and data position
    peak_flops: float = 0.0          # device peak FLOP/s for MFU; 0 = measure a matmul once


class RunError(RuntimeError):
    """A run that cannot go on (non-finite steps, ranks that disagree): said in one line, checkpoints kept."""

# -----------------------------------------------------------------------------
# this process's place in the run


@dataclass
class Run:
    """What setup() fixed before the first step: the ranks, the device, how the global batch is split."""
    ddp: bool                # started by torchrun: one process per rank, gradients reduced over them
    rank: int
    world: int               # ranks in all; 1 without torchrun
    master: bool             # rank 0: the only rank that prints, evaluates and writes files
    device: torch.device
    bf16: bool               # compute in bf16 (autocast, or FSDP's mixed-precision policy on CUDA)
    dtype: torch.dtype       # bf16 or fp32: the precision the peak FLOP/s is measured in
    grad_accum: int          # micro-batches per optimizer step
    micro_batch: int         # images per rank per forward pass
    lanes: int               # data lanes: shard streams, each filling batch_size / lanes of every batch
    peak: float = 0.0        # the device's FLOP/s, MFU's denominator: set by peak_flops() once data is ready


def setup(cfg):
    """This process's Run: under torchrun it joins the process group; it takes its device and CPU threads,
    and its share of the global batch."""
    ddp, rank, world, device = setup_distributed(cfg.device)
    bf16 = cfg.bf16
    if bf16 is None:  # fast on CUDA; on CPU, bf16 matmuls are slower than fp32's
        bf16 = device.type == "cuda"
    torch.set_num_threads(cfg.threads or default_threads())
    grad_accum, micro_batch, lanes = split_batch(cfg, world)
    dtype = torch.bfloat16 if bf16 else torch.float32
    return Run(ddp, rank, world, rank == 0, device, bf16, dtype, grad_accum, micro_batch, lanes)


def split_batch(cfg, world):
    """(grad_accum, micro_batch, lanes). The global batch is batch_size on any number of ranks: each rank
    computes a contiguous 1/world of it in grad_accum micro-batches; with micro_batch set (what fits in
    memory), the accumulation follows from the world size."""
    grad_accum = cfg.batch_size // (cfg.micro_batch * world) if cfg.micro_batch else cfg.grad_accum
    micro_batch = cfg.batch_size // (grad_accum * world) if grad_accum > 0 else 0  # per rank and forward pass
    lanes = cfg.data_lanes or world
    check_batch(cfg, world, grad_accum, micro_batch, lanes)
    return grad_accum, micro_batch, lanes


def model_config(cfg):
    """The network's config: the preset, its latent size and interp scale for this run, --model_args."""
    given = {"latent_size": cfg.latent_size, "pos_interp_scale": cfg.pos_interp_scale}
    mcfg = get_config(cfg.model, **{k: v for k, v in given.items() if v})  # 0 = the preset's own
    return replace(mcfg, **model_overrides(cfg.model_args, mcfg))


def lr_at(step, cfg):
    """Linear warmup, then a cosine decay to a floor of lr * min_lr_ratio, constant, or stable then decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":  # warmup-stable-decay: constant until the last decay_steps, so that an
        # evaluation before them reads as a shorter run less its decay. Linear: a decay over the last 20%
        # matches the cosine (Hagele et al. 2024, arXiv 2405.18392, Sec. 3); their 1-sqrt shape does a little
        # better, a line is the simplest to read
        t = (step + 1 - (cfg.max_steps - cfg.decay_steps)) / max(1, cfg.decay_steps)  # the last step: t = 1
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * min(1.0, max(0.0, t)))
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def step_seed(seed, step, stream):
    """A 63-bit seed that is a pure function of (seed, step, stream): the randomness of a step never depends
    on the steps before it, so a resumed run needs no RNG state to replay it exactly."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))

# -----------------------------------------------------------------------------
# the loop


def train(cfg):
    """One run: its config checked, this process's place in it, then the run, with out_dir's lock held by rank
    0 from before anything in the folder is looked at until the run ends, however it ends."""
    t_begin = time.perf_counter()  # the wall clock split in the final record: data, training, evaluation
    check_config(cfg)
    run = setup(cfg)
    with lock.hold(cfg.out_dir, job="train.py") if run.master else contextlib.nullcontext():
        loop(cfg, run, t_begin)


def loop(cfg, run, t_begin):
    """The run: the data, the model from where the run stands, the loop, and the end of the run."""
    mcfg = model_config(cfg)
    if run.master:
        claim_out_dir(cfg.out_dir, cfg.overwrite, cfg.resume)
        warn_short_run(cfg)
    index = prepare_data(cfg, mcfg, run)
    data_s = time.perf_counter() - t_begin  # (mostly the built-in dataset's generation, on the first run)
    if run.master:
        print("config:", json.dumps(asdict(cfg)))

    net, ema = build(cfg, mcfg, run)
    step, samples, skipped, opt_state = start(cfg, run, net, ema)
    mask_at = lambda step: 0.0 if step >= cfg.max_steps - cfg.unmasked_steps else cfg.mask_ratio
    flops_at = {m: flops_per_image(mcfg, m, caption_len=index["text_shape"][0])  # per image, train step
                for m in (cfg.mask_ratio, 0.0)}
    flops_until = lambda step: sum(flops_at[mask_at(s)] for s in range(step)) * cfg.batch_size  # steps < step
    run.peak = peak_flops(cfg, run)
    if run.master:
        print_plan(cfg, run, net, flops_at, mask_at, step)
    loaders = make_loaders(cfg, run, samples)
    model, opt, plain = spread(cfg, run, net, ema, opt_state)
    D = Denoiser(model, cfg.sigma_data)
    # the full weights (net, ema) for rank 0 to evaluate and save: under FSDP, gathered by every rank
    full = lambda: [full_weights(m, p, cfg.fsdp, run.device) for m, p in ((net, plain[0]), (ema, plain[1]))]
    held = heldout(cfg, index)
    state = lambda: {"step": step, "samples": samples, "skipped": skipped, "config": asdict(cfg)}

    stop = StopSignals(run.master, lambda: step + 1)  # preemption: the step in flight ends, then a checkpoint
    gen = torch.Generator(device=run.device)  # seeded alike on every rank: the noise of the global batch
    meter, bad_in_row, stopping = Meter(cfg, run), 0, False
    t_start, step_start = time.perf_counter(), step
    while step < cfg.max_steps and not stopping:
        # ---- this step's randomness and batch. The randomness is a function of (seed, step), so a resume
        # replays it without RNG state. sigma, noise and caption dropout are drawn for the whole global batch
        # on every rank, each rank keeping its slice: any world size trains on the same noise. The token
        # masks (drawn inside the model) use the per-rank global RNG.
        gen.manual_seed(step_seed(cfg.seed, step, 0))
        torch.manual_seed(step_seed(cfg.seed, step, 1 + run.rank))
        batches = [next(it) for it in loaders]
        x = torch.cat([b["latent"] for b in batches]).to(run.device)  # (batch_size / world, C, H, W)
        y = torch.cat([b["text"] for b in batches]).to(run.device)  # (batch_size / world, L, Dy)
        part = slice(run.rank * len(x), (run.rank + 1) * len(x))  # this rank's rows of the global batch
        sigma, noise, keep = training_noise(cfg.batch_size, x.shape[1:], cfg.P_mean, cfg.P_std,
                                            cfg.caption_dropout, run.device, gen)  # (batch_size, ...)

        # ---- forward and backward, in micro-batches; the gradient clipped
        loss = forward_backward(cfg, run, D, x, drop_captions(y, keep[part]), sigma[part], noise[part],
                                mask_at(step))
        bad = clip_and_check(cfg, net, loss)

        # ---- the ranks agree to stop (a signal) or to skip the step (a non-finite loss or gradient)
        stopping, bad = agree(run.ddp, run.device, stop.requested, bad)

        # ---- update: the weights and their EMA; a skipped step changes neither
        update(cfg, opt, net, ema, step, bad)
        bad_in_row = bad_in_row + 1 if bad else 0
        if bad:
            report_bad_step(cfg, run, step, bad_in_row)
        skipped += bad
        meter.add(loss, not bad, flops_at[mask_at(step)] * cfg.batch_size)
        step, samples = step + 1, samples + cfg.batch_size

        # ---- log, evaluate, save (the meter's clock leaves evaluations and checkpoints out)
        if step % cfg.log_every == 0 or step == cfg.max_steps or step == step_start + 1:  # a first line now
            meter.log(step, skipped)
        paused = time.perf_counter()  # the meter's clock stops until the evaluation and the save are done
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            weights = full()
            if run.master:  # (on the first curve_n held-out captions: a curve of the run, not its result)
                results = evaluate(cfg, run, weights[1] or weights[0], held, step, cfg.curve_n or cfg.eval_n)
                print(f"step {step:6d} | eval " + " ".join(f"{k} {v:.3f}" for k, v in results.items()),
                      flush=True)
                log(cfg, {"step": step, "samples": samples, "flops": flops_until(step), **results,
                          "eval_s": round(time.perf_counter() - paused, 2)})
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping:
            weights, opt_state = full(), full_optimizer_state(net, opt, cfg.fsdp, run.device)
            if run.master:
                save_checkpoint(cfg, *weights, opt_state, held.extra, state())
        meter.t0 += time.perf_counter() - paused

    stop.restore()
    if step == step_start:  # no step here: the weights it started with (else those of the last checkpoint)
        weights = full()
    if run.master:
        times = dict(begin=t_begin, data_s=data_s, train_s=time.perf_counter() - t_start,
                     steps=step - step_start, flops=flops_until(step))
        finish(cfg, run, weights, held, state(), stopping, times)
    if run.ddp:  # the ranks tear down together, the models before the process group they use (gloo can hang)
        dist.barrier()
        del D, model, net, ema, opt
        dist.destroy_process_group()

# -----------------------------------------------------------------------------
# before the loop: the out_dir, the data, the model and where the run starts


def warn_short_run(cfg):
    """A run shorter than its warmup or its unmasked end is said at once: they are counts of steps, which a
    short run (--max_steps=6) inherits from the default run unscaled."""
    short = []
    if cfg.warmup_steps > cfg.max_steps > 0:
        short.append(f"warmup_steps={cfg.warmup_steps} (the learning rate never leaves its warmup: it ends "
                     f"at {cfg.max_steps / cfg.warmup_steps:.0%} of --lr)")
    if cfg.unmasked_steps >= cfg.max_steps > 0 and cfg.mask_ratio:
        short.append(f"unmasked_steps={cfg.unmasked_steps} (no step is masked)")
    if short:
        print(f"warning: a short run: max_steps={cfg.max_steps} but {' and '.join(short)}; lower them for a "
              f"run this short", flush=True)


def prepare_data(cfg, mcfg, run):
    """The dataset's index.json, its shards checked against it; the built-in dataset is written on first use,
    sized for the model, in a folder named by everything that defines it."""
    if cfg.dataset == "shapes":  # the built-in images are the latents: their size follows the model's
        res, text_dim = mcfg.latent_size, mcfg.caption_dim
        if not cfg.data_dir:
            name = f"shapes{res}_n{cfg.dataset_size}_seed{cfg.seed}_d{text_dim}_ctx{cfg.text_context:g}"
            if cfg.dataset_scenes:
                name += f"_scenes{cfg.dataset_scenes}"
            if cfg.dataset_captions == "partial":
                name += "_partial"
            cfg.data_dir = f"data_cache/{name}"
        try:  # rank 0 writes it holding its folder's lock: another job making it meanwhile is waited for
            if run.master:  # (a no-op when the same dataset is already there; an error if a different one is)
                with lock.hold(cfg.data_dir, "train.py", wait=True):
                    data.make_shapes_dataset(cfg.data_dir, cfg.dataset_size, res=res, seed=cfg.seed,
                                             text_dim=text_dim, context=cfg.text_context,
                                             scenes=cfg.dataset_scenes, captions=cfg.dataset_captions)
        except KeyboardInterrupt:  # (a dataset is one once its index.json is there, written last)
            raise KeyboardInterrupt(f"stopped while writing the built-in dataset in {cfg.data_dir}, before "
                                    f"any training; the next run writes it again") from None
        if run.ddp:  # the other ranks wait until rank 0 has written it
            dist.barrier()
    index = data.read_index(cfg.data_dir)
    data.check_shards(cfg.data_dir, index)  # a missing or truncated shard now, not when training reaches it
    workers = max(1, cfg.num_workers)  # each data lane's shards are split over its workers
    if len(index["shards"]) < run.lanes * workers:
        raise UsageError(f"--num_workers={cfg.num_workers}: {cfg.data_dir} has {len(index['shards'])} "
                         f"shards, too few for {run.lanes} data lanes x {workers} workers: use fewer")
    C, H, W = index["latent_shape"]
    if (C, H) != (mcfg.latent_channels, mcfg.latent_size) or index["text_shape"][-1] != mcfg.caption_dim:
        raise UsageError(f"model {cfg.model} expects latents ({mcfg.latent_channels}, {mcfg.latent_size}, "
                         f"{mcfg.latent_size}) and captions of width {mcfg.caption_dim}; {cfg.data_dir} "
                         f"holds latents {tuple(index['latent_shape'])} and captions "
                         f"{tuple(index['text_shape'])}")
    return index


def build(cfg, mcfg, run):
    """(net, ema): the network and its EMA: on rank 0 only (the rank that evaluates and saves it), or under
    FSDP on every rank, to be sharded like the weights."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    net = build_model(mcfg).to(run.device)
    ema = None
    if cfg.ema_decay > 0 and (run.master or cfg.fsdp):
        ema = copy.deepcopy(net).eval().requires_grad_(False)
    return net, ema


def start(cfg, run, net, ema):
    """(step, samples, skipped, AdamW's state or None) after loading the weights that start this run. resume:
    this run's own full state, "auto" the newest checkpoint of out_dir that loads; init_from: another run (a
    previous recipe stage)."""
    found = None
    if cfg.resume == "auto":
        for folder in list_checkpoints(cfg.out_dir):
            try:
                found = "resumed from", folder, read_checkpoint(folder)
                break
            except (ValueError, OSError) as e:  # a truncated or corrupt file: say which, fall back
                if run.master:  # (set aside, so that pruning by step never prefers it)
                    print(f"warning: checkpoint {folder} does not load ({type(e).__name__}: {e}); "
                          f"moved aside as {set_aside(folder)}, trying an older one")
    elif cfg.resume:
        found = "resumed from", cfg.resume, read_checkpoint(cfg.resume)
    if found is None and cfg.init_from:
        folder = resolve_checkpoint(cfg.init_from)
        found = "started from", folder, read_checkpoint(folder, full=cfg.init_state)
    step, samples, skipped, opt_state = 0, 0, 0, None
    if found is None and cfg.resume == "auto" and run.master:
        print(f"no checkpoint in {cfg.out_dir} to resume: starting fresh")
    if found is not None:
        how, folder, ckpt = found
        state, opt_state = load_checkpoint(ckpt, folder, net, ema)
        if ckpt["opt"] is not None:
            step, samples, skipped = state["step"], state["samples"], state.get("skipped", 0)
        if run.master:
            weights_only = " (weights only)" if ckpt["opt"] is None else ""
            print(f"{how} {folder} at step {step}{weights_only}")
    if run.ddp:  # every rank starts at the same step: with several nodes, out_dir must be on shared storage
        agreed = torch.tensor([step, -step], device=run.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        if agreed.sum() != 0:
            raise RunError(f"rank {run.rank} starts at step {step}, another rank does not: "
                           f"is {cfg.out_dir} shared?")
    if run.master:
        keep_log_until(cfg.out_dir, step)
    return step, samples, skipped, opt_state


def peak_flops(cfg, run):
    """The device's FLOP/s for MFU: --peak_flops, or a matmul timed now that the dataset is written (while it
    was being made, the CPU was busy), with a warning on rank 0 when this CPU is shared."""
    measured = None if cfg.peak_flops else measure_peak_flops(run.device, run.dtype)
    if run.master:
        warning = busy_warning(run.device, run.dtype, measured, torch.get_num_threads())
        if warning:
            print(warning, flush=True)
    return cfg.peak_flops or measured


def make_loaders(cfg, run, samples):
    """One endless batch iterator per data lane of this rank. Each global batch is `lanes` blocks of
    batch_size/lanes records, block l from shard stream l (its own shards): rank r reads lanes
    [r, r+1) * lanes/world, its contiguous 1/world of every global batch. A fixed data_lanes gives the same
    global batches on every world size that divides it."""
    per_lane = cfg.batch_size // run.lanes
    # their own generator: a seed drawn from the global RNG would shift a resumed run's noise
    loaders = [iter(torch.utils.data.DataLoader(
        data.ShardStream(cfg.data_dir, seed=cfg.seed, rank=lane, world_size=run.lanes,
                         shuffle_buffer=cfg.shuffle_buffer, start=samples // run.lanes, batch_size=per_lane),
        batch_size=per_lane, num_workers=cfg.num_workers, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(cfg.seed)))
        for lane in range(run.rank * run.lanes // run.world, (run.rank + 1) * run.lanes // run.world)]
    LOADERS.update(loaders)
    return loaders


LOADERS = weakref.WeakSet()  # this process's DataLoader iterators, stopped by main() when a run fails


def spread(cfg, run, net, ema, opt_state):
    """(model, opt, plain): the network as it runs (activation checkpointing, FSDP or DDP, compile), AdamW
    over its parameters (sharded under FSDP) with the state a checkpoint gave, and under FSDP rank 0's
    unsharded copies (net, ema) that evaluation and checkpoints gather the weights into."""
    plain = [None, None]
    if cfg.fsdp and run.master:  # (taken before sharding, on the CPU: the GPU holds only shards)
        plain = [None if m is None else copy.deepcopy(m).cpu() for m in (net, ema)]
    if cfg.act_ckpt:
        checkpoint_blocks(net)
    if cfg.fsdp:
        shard(net, run.device, run.bf16)
        if ema is not None:
            shard(ema, run.device, run.bf16)
    # fused: one kernel for all the parameters instead of several per tensor (on CPU too)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, fused=run.device.type in ("cpu", "cuda"))
    if opt_state is not None:
        load_optimizer_state(net, opt, opt_state, cfg.fsdp)
    model = torch.compile(net) if cfg.compile else net  # compile after .to(device), before the DDP wrap
    if run.ddp and not cfg.fsdp:
        device_ids = [run.device] if run.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids)
    return model, opt, plain


@dataclass
class Heldout:
    """What evaluations score the model on, and what every checkpoint records beside its weights."""
    val: typing.Optional[dict]  # held-out latents and captions for the validation loss; None: no val split
    prompts: list               # held-out captions to sample and score: the built-in dataset's, else none
    extra: dict                 # the checkpoint's config.json beside the weights (see heldout)


def heldout(cfg, index):
    """The Heldout of this run's dataset, read once before the loop. config.json records the frozen encoders
    the data was made with (sample.py rebuilds them), sigma_data, the training config and the prompts."""
    meta = index["meta"]
    val = data.load_all(os.path.join(cfg.data_dir, "val")) if data.has_split(cfg.data_dir, "val") else None
    # only the built-in dataset can score what its samples show
    prompts = shapes.heldout_captions(cfg.eval_n) if meta.get("dataset") == "shapes" else []
    # (datasets written before encoder specs existed name only the built-in encoder's size)
    text_encoder = meta.get("text_encoder") or {"type": "builtin", "dim": meta["text_dim"],
                                                "max_len": meta["max_len"]}
    latents = meta.get("latents") or {"type": meta.get("latent", "pixels")}
    extra = {"text_encoder": text_encoder, "latents": latents, "sigma_data": cfg.sigma_data,
             "train": asdict(cfg), "eval_prompts": prompts}
    return Heldout(val, prompts, extra)

# -----------------------------------------------------------------------------
# one step: forward and backward, the update, the log line


def forward_backward(cfg, run, D, x, y, sigma, noise, mask_ratio):
    """The loss of this rank's part of the batch, its gradients accumulated over micro-batches; DDP and FSDP
    reduce them over the ranks on the last micro-batch only."""
    # FSDP on CUDA computes in bf16 through its mixed-precision policy instead of autocast
    autocast = run.bf16 and not (cfg.fsdp and x.device.type == "cuda")
    loss = torch.zeros((), device=x.device)
    for i in range(0, len(x), run.micro_batch):
        mb = slice(i, i + run.micro_batch)
        sync = i + run.micro_batch == len(x) or not run.ddp
        with grad_sync(D.net, run.ddp, cfg.fsdp, sync), \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            micro_loss = edm_loss(D, x[mb], y[mb], sigma[mb], noise[mb], mask_ratio)
            (micro_loss / run.grad_accum).backward()
        loss += micro_loss.detach() / run.grad_accum
    return loss


def clip_and_check(cfg, net, loss):
    """The gradient clipped to grad_clip; whether the step is bad: a non-finite loss or gradient norm."""
    bad = ~loss.isfinite()
    if cfg.grad_clip > 0:  # the norm of the all-reduced gradient: the same on every rank
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        if cfg.fsdp:  # a DTensor, replicated over the ranks
            norm = norm.full_tensor()
        bad |= ~norm.isfinite()
    return bad


def update(cfg, opt, net, ema, step, bad):
    """The optimizer's step at this step's learning rate, and the EMA's; a bad step updates neither the
    weights, nor the EMA, nor AdamW's moments, and its batch is passed over."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    if not bad:
        opt.step()
        if ema is not None:
            update_ema(ema, net, step, cfg.ema_decay)
    opt.zero_grad(set_to_none=True)


@torch.no_grad()
def update_ema(ema, net, step, decay):
    """EMA of the weights, warmed up: early weights are forgotten quickly."""
    decay = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p.detach(), 1 - decay)


def report_bad_step(cfg, run, step, bad_in_row):
    """A skipped step is said; max_bad_steps of them in a row stop the run."""
    if run.master:
        print(f"step {step + 1:6d} | non-finite loss or gradient: skipped ({bad_in_row} in a row)",
              flush=True)
    if bad_in_row >= cfg.max_bad_steps:
        raise RunError(f"step {step + 1}: {bad_in_row} steps in a row with a non-finite loss or gradient "
                       f"(max_bad_steps={cfg.max_bad_steps}); stopping. The checkpoints in {cfg.out_dir} "
                       f"hold finite weights: lower lr or grad_clip, check the data, then resume")


class Meter:
    """What happened since the last log line (mean loss of the good steps, time, FLOPs), then the line with
    the step, of how many, and the time left at the pace so far (evaluations and checkpoints left out)."""

    def __init__(self, cfg, run):
        self.cfg, self.run = cfg, run
        self.train_s, self.steps = 0.0, 0  # the pace of this run so far
        self.reset()

    def reset(self):
        self.t0, self.n, self.flops = time.perf_counter(), 0, 0.0  # every step's time and work
        self.loss_sum, self.n_ok = 0.0, 0  # the good steps' losses

    def add(self, loss, ok, flops):
        if ok:  # a skipped step's loss is not finite
            self.loss_sum += loss
            self.n_ok += 1
        self.n += 1
        self.flops += flops

    def log(self, step, skipped):
        cfg, run = self.cfg, self.run
        loss = torch.as_tensor(self.loss_sum / self.n_ok if self.n_ok else float("nan"), device=run.device)
        if run.ddp:  # gloo has no ReduceOp.AVG
            dist.all_reduce(loss)
            loss /= run.world
        dt = (time.perf_counter() - self.t0) / self.n
        self.train_s, self.steps = self.train_s + dt * self.n, self.steps + self.n
        if run.master:
            ips, mfu = cfg.batch_size / dt, self.flops / (dt * self.n) / run.world / run.peak
            eta = round((cfg.max_steps - step) * self.train_s / self.steps)
            line = (f"step {step:6d}/{cfg.max_steps} | loss {loss.item():.4f} | lr {lr_at(step - 1, cfg):.2e}"
                    f" | {dt * 1000:.0f} ms/step | {ips:.0f} img/s | MFU {mfu:.1%} | "
                    f"ETA {eta // 60}m{eta % 60:02d}s")
            if skipped:
                line += f" | skipped {skipped}"
            print(line, flush=True)
            log(cfg, {"step": step, "loss": loss.item(), "ms_per_step": dt * 1000, "img_per_s": ips,
                      "skipped": skipped})
        self.reset()


def log(cfg, record):
    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")

# -----------------------------------------------------------------------------
# evaluation, checkpoints and the end of a run


@torch.no_grad()
def evaluate(cfg, run, net, held, step, n_captions):
    """Validation loss at mask ratio 0, and the first n_captions held-out captions sampled and scored (with a
    sample grid)."""
    n_val = 0 if held.val is None else min(cfg.val_n, len(held.val["latent"]))
    prompts = held.prompts[:n_captions]
    sampled = f", {len(prompts)} captions sampled ({cfg.eval_steps} Heun steps) and scored" if prompts else ""
    print(f"step {step:6d} | evaluating: validation loss on {n_val} images{sampled}", flush=True)
    home = next(net.parameters()).device  # under FSDP rank 0's full copy waits on the CPU between uses
    with torch.random.fork_rng():  # evaluation must not shift the training RNG stream
        torch.manual_seed(1234)
        D = Denoiser(net.to(run.device), cfg.sigma_data)
        results = {}
        if held.val is not None and cfg.val_n > 0:
            x = held.val["latent"][:cfg.val_n].to(run.device)
            y = held.val["text"][:cfg.val_n].to(run.device)
            losses = []
            for i in range(0, len(x), 64):
                sigma = sample_sigma(len(x[i:i + 64]), cfg.P_mean, cfg.P_std, run.device)
                losses.append(edm_loss(D, x[i:i + 64], y[i:i + 64], sigma, torch.randn_like(x[i:i + 64])))
            results["val_loss"] = float(torch.stack(losses).mean())
        if prompts:
            images = generate(D, held.extra, prompts, seed=0, steps=cfg.eval_steps,
                              guidance=cfg.eval_guidance)
            image_grid(images[:64], cols=8).save(os.path.join(cfg.out_dir, f"samples-{step:07d}.png"))
            results.update({f"acc_{k}": v for k, v in shapes.score(images, prompts).items()})
    net.to(home)
    return results


def save_checkpoint(cfg, net, ema, opt_state, extra, state):
    """Write ckpt-<step> atomically, then keep only the newest keep_ckpts."""
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise RunError(f"step {state['step']}: non-finite weights; not writing a checkpoint")
    path = os.path.join(cfg.out_dir, f"ckpt-{state['step']:07d}")
    with atomic_write(path) as tmp:
        os.makedirs(tmp)
        save_pretrained(tmp, net, ema, extra)
        save_train_state(tmp, opt_state, state)
    for old in [c for c in list_checkpoints(cfg.out_dir) if c != path][cfg.keep_ckpts - 1:]:
        remove(old)  # never the checkpoint just written
    return path


def finish(cfg, run, weights, held, state, stopped, times):
    """The end of a run on rank 0: the final evaluation, in the log and the model card; the loss curve; the
    upload. weights: (net, ema); times: begin (train()'s start, perf_counter), data_s and train_s (the loop's
    seconds), steps (taken by this process), flops (training FLOPs of all the run's steps)."""
    step = state["step"]
    if stopped:
        print(f"stopped by signal at step {step}; checkpoint written, the same command with --resume=auto "
              f"continues it", flush=True)
        return
    final = os.path.join(cfg.out_dir, f"ckpt-{step:07d}")
    if not os.path.isdir(final):  # --max_steps=0: the initial weights are the result ({}: AdamW's state)
        save_checkpoint(cfg, *weights, {}, held.extra, state)
    t_eval = time.perf_counter()
    results = evaluate(cfg, run, weights[1] or weights[0], held, step, cfg.eval_n)  # the EMA's, if any
    now = time.perf_counter()
    split = dict(data_s=times["data_s"], train_s=times["train_s"], eval_s=now - t_eval,
                 wall_s=now - times["begin"])
    print(f"done: {step} steps ({times['steps']} here) in {split['train_s']:.0f}s | final "
          + " ".join(f"{k} {v:.3f}" for k, v in results.items()))
    print("wall clock: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in split.items()), flush=True)
    log(cfg, {"step": step, "final": True, "samples": state["samples"], "flops": times["flops"],
              **{k: round(v, 2) for k, v in split.items()}, **results})
    add_results(final, results)  # the model card states what was measured
    plot_run(os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "curve.png"))
    if cfg.push_to_hub:
        try:
            print(f"uploaded {final} to the Hub: {push_to_hub(final, cfg.push_to_hub)}")
        except Exception as e:  # the run is done and saved: say how to upload it later
            raise RunError(f"--push_to_hub={cfg.push_to_hub}: the upload failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]}); {final} is complete, upload it later with "
                           f"checkpoint.push_to_hub") from None


def main(argv):
    if {"-h", "--help"} & set(argv):
        print_help(TrainConfig, __doc__)
        return
    try:  # exit status: 1 for a failed job, 2 for a usage error (see the docstring)
        train(load_config(TrainConfig, argv))
        return
    except KeyboardInterrupt as e:  # the second Ctrl-C, or one before the training began
        message, code = str(e) or "stopped without a checkpoint; the newest one in out_dir is kept", 1
    except (ValueError, OSError, RunError) as e:  # bad input, a damaged file, a full disk, a live job
        lines = str(e).strip().splitlines()
        # a DataLoader worker's error arrives as "Caught ValueError in DataLoader worker..." + its traceback,
        # whose last line is the error itself
        message = "error: " + (lines[-1] if str(e).startswith("Caught ") else lines[0])
        code = 2 if isinstance(e, UsageError) else 1
    for it in list(LOADERS):  # a failed run's DataLoader workers ignore SIGTERM: stop them, or the exit waits
        getattr(it, "_shutdown_workers", lambda: None)()  # for them forever (torch has no public close)
    print(f"train.py: {message}", file=sys.stderr, flush=True)
    sys.exit(code)

# -----------------------------------------------------------------------------
# checks: every value before any work


def check_config(cfg):
    """Every value checked before any work, with a one-line error that names the flag and what it may be."""
    def need(ok, key, what):
        if not ok:
            raise UsageError(f"--{key}={getattr(cfg, key)!r}: must be {what}")
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    for key in ("dataset_size", "shuffle_buffer", "batch_size", "grad_accum", "log_every", "ckpt_every",
                "keep_ckpts", "max_bad_steps", "eval_steps"):
        need(getattr(cfg, key) >= 1, key, ">= 1")
    for key in ("num_workers", "data_lanes", "latent_size", "unmasked_steps", "micro_batch", "max_steps",
                "warmup_steps", "decay_steps", "seed", "threads", "eval_every", "eval_n", "curve_n", "val_n",
                "dataset_scenes"):
        need(getattr(cfg, key) >= 0, key, ">= 0")
    need(finite(cfg.P_mean), "P_mean", "a finite number")
    for key in ("pos_interp_scale", "lr", "weight_decay", "grad_clip", "eval_guidance", "peak_flops"):
        need(finite(getattr(cfg, key)) and getattr(cfg, key) >= 0, key, "a finite number >= 0")
    for key in ("P_std", "sigma_data", "eps"):
        need(finite(getattr(cfg, key)) and getattr(cfg, key) > 0, key, "a finite number > 0")
    for key in ("text_context", "mask_ratio", "beta1", "beta2", "ema_decay"):
        need(0 <= getattr(cfg, key) < 1, key, "in [0, 1)")
    for key in ("caption_dropout", "min_lr_ratio"):
        need(0 <= getattr(cfg, key) <= 1, key, "in [0, 1]")
    need(cfg.dataset in ("shapes", "shards"), "dataset", "'shapes' (built in) or 'shards'")
    need(cfg.dataset_captions in ("full", "partial"), "dataset_captions", "'full' or 'partial'")
    need(cfg.lr_schedule in ("cosine", "constant", "wsd"), "lr_schedule",
         "'wsd' (warmup-stable-decay), 'cosine' or 'constant'")
    need(cfg.lr_schedule != "wsd" or cfg.decay_steps >= 1, "decay_steps", ">= 1 with --lr_schedule=wsd")
    need(cfg.model in PRESETS, "model", f"a preset of model.py: {', '.join(PRESETS)}")
    need(cfg.out_dir.strip(), "out_dir", "a folder")
    need(not cfg.push_to_hub or re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.push_to_hub), "push_to_hub",
         "a Hub repo id user/name")
    need(cfg.resume in ("", "auto") or os.path.isdir(cfg.resume), "resume", "'auto' or a checkpoint folder")
    need(not (cfg.resume and cfg.overwrite), "overwrite", "false with --resume (it deletes what resumes)")
    hub_id = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+(/.+)?", cfg.init_from)  # user/name[/file.pt]
    need(not cfg.init_from or os.path.exists(cfg.init_from) or hub_id, "init_from",
         "a checkpoint, a run folder or a Hub id")
    need(cfg.init_from or not cfg.init_state, "init_state", "false without --init_from")
    shards = cfg.data_dir.startswith("hf://") or os.path.isfile(os.path.join(cfg.data_dir, "index.json"))
    need(cfg.dataset == "shapes" or shards, "data_dir",
         "a folder of latent shards (with index.json) or hf://datasets/USER/NAME for --dataset=shards")
    check_device(cfg.device)
    mcfg = model_config(cfg)
    need(model_type(mcfg) == "MicroDiT" or not cfg.mask_ratio, "mask_ratio", f"0 for {cfg.model}: no patches")
    need(mcfg.latent_size % getattr(mcfg, "patch_size", 1) == 0, "latent_size", "a multiple of the patch")
    try:  # the network is built and run once on the meta device: no memory, no time
        with torch.device("meta"):
            x = torch.zeros(1, mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size)
            build_model(mcfg)(x, torch.zeros(1), torch.zeros(1, 1, mcfg.caption_dim), cfg.mask_ratio)
    except (ValueError, RuntimeError) as e:
        first_line = str(e).splitlines()[0]
        raise UsageError(f"--model={cfg.model} (with --model_args/--latent_size): {first_line}") from None
    split_batch(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # torchrun's world: no process group joined yet


def check_batch(cfg, world, grad_accum, micro_batch, lanes):
    """The global batch splits over the ranks, the micro-batches and the data lanes (see split_batch)."""
    if (not micro_batch or micro_batch * grad_accum * world != cfg.batch_size
            or cfg.micro_batch not in (0, micro_batch)):
        raise UsageError(f"--batch_size={cfg.batch_size} does not split into world size {world} x grad_accum "
                         f"x micro-batch (grad_accum={cfg.grad_accum}, micro_batch={cfg.micro_batch}; "
                         f"see TrainConfig)")
    if lanes % world or cfg.batch_size % lanes:
        raise UsageError(f"--data_lanes={lanes} must be a multiple of the world size {world} and divide "
                         f"batch_size={cfg.batch_size}")


if __name__ == "__main__":
    main(sys.argv[1:])
