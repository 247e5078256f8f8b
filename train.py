"""
Train a text-to-image diffusion model on latent shards. With no arguments it trains a CPU-sized MicroDiT on
the built-in shapes dataset (generated on first use) in minutes:

    python train.py                                   # the built-in default
    python train.py configs/my_run.py --max_steps=500 # a config file, then --key=value overrides
    torchrun --standalone --nproc_per_node=8 train.py configs/stage1_256_masked.py   # DDP, one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...

SIGTERM or SIGINT (a preemption, Ctrl-C) finishes the current step, writes a checkpoint and exits 0; run the
same command with --resume=auto to continue bit-exactly. Under torchrun, raise --shutdown_timeout (30 s by
default, then SIGKILL) above one step plus one checkpoint write.

Reads top to bottom: the config, the setup steps as small functions, then train(): the loop.
"""
import copy
import inspect
import json
import math
import os
import re
import sys
import textwrap
import time
import traceback
import typing
import weakref
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist

import data
import shapes
from checkpoint import (add_results, atomic_write, list_checkpoints, load_checkpoint, push_to_hub,
                        read_checkpoint, remove, resolve_checkpoint, save_pretrained, save_train_state)
from diffusion import Denoiser, drop_captions, edm_loss, sample_sigma, training_noise
from model import PRESETS, build_model, flops_per_image, get_config, model_type, num_params
from parallel import (StopSignals, busy_warning, check_device, checkpoint_blocks, default_threads,
                      full_optimizer_state, full_weights, grad_sync, ignore_stop_signals,
                      load_optimizer_state, measure_peak_flops, setup_distributed, shard)
from sample import generate, image_grid
from scaling import DEFAULT_MFU, PRICE_PER_GPU_HOUR, dollars, gpu_hours, plot_run


class RunError(RuntimeError):
    """A run that cannot go on (non-finite steps, ranks that disagree): said in one line, checkpoints kept."""


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
    pos_interp_scale: float = 0.0    # 0 = the preset's; 2 at 512px keeps the 256px position range (SPEC A2)
    # diffusion (EDM, SPEC A3)
    P_mean: float = -0.6             # ln(sigma) ~ N(P_mean, P_std^2) during training
    P_std: float = 1.2               # (EDM's training noise distribution; sampling uses the Karras schedule)
    sigma_data: float = 0.9          # the data's std in the preconditioning; recorded in every checkpoint
    mask_ratio: float = 0.5          # fraction of patches dropped (after the patch-mixer, if any)
    unmasked_steps: int = 400        # the last this-many steps train unmasked, as the recipe's stages 2 and 4
                                     # do: sampling is always unmasked, so the model ends on what it will see
    caption_dropout: float = 0.1     # captions replaced by zeros, for classifier-free guidance
    # optimisation (AdamW)
    batch_size: int = 32             # global batch, whatever the world size: micro_batch x grad_accum x world
    grad_accum: int = 1              # micro-batches per optimizer step (when micro_batch = 0)
    micro_batch: int = 0             # images per rank per forward pass; > 0: grad_accum = batch_size /
                                     # (micro_batch x world), so one config fits any GPU count
    max_steps: int = 2900            # the default run: 10-14 min on 2 CPU cores (as measured)
    lr: float = 1e-3                 # peak learning rate of AdamW
    lr_schedule: str = "cosine"      # "cosine" (warmup, cosine to lr * min_lr_ratio) or "constant" (warmup)
    warmup_steps: int = 290
    min_lr_ratio: float = 0.33       # the floor of the cosine, as a fraction of lr
    weight_decay: float = 0.1        # AdamW's decoupled weight decay
    beta1: float = 0.9               # AdamW's first-moment decay
    beta2: float = 0.999             # AdamW's second-moment decay
    eps: float = 1e-8                # AdamW's denominator epsilon
    grad_clip: float = 1.0           # max gradient norm; 0 = off
    ema_decay: float = 0.999         # EMA of the weights; 0 = no EMA. Warmed up: the decay at step s is
                                     # min(ema_decay, (1 + s) / (10 + s)), below 0.999 until step 8,990
    max_bad_steps: int = 5           # a non-finite loss or gradient skips the step; this many in a row stop
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
    eval_n: int = 128                # held-out captions sampled at each evaluation
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


def parse_value(key, text, typ):
    """'--key=value' text -> a value of type typ (bool, int, float, str, Optional); errors name the key."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        if text.lower() == "none":
            return None
        typ = [t for t in typing.get_args(typ) if t is not type(None)][0]
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}: expected true or false, got {text!r}")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{key}: expected {typ.__name__}, got {text!r}") from None


def model_overrides(text, cfg):
    """--model_args: 'field=value,...' -> {field: value} typed like cfg's own fields; a tuple field's values
    are joined by ':' ("mixer_depth=0,mlp_ratio=2.5:2.5")."""
    known, out = {f.name: getattr(cfg, f.name) for f in fields(cfg)}, {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if key not in known or not sep:
            raise ValueError(f"--model_args: {item!r} is not FIELD=VALUE with FIELD one of: "
                             f"{', '.join(known)}")
        old = known[key]
        if isinstance(old, tuple):
            out[key] = tuple(parse_value(f"model_args {key}", v, type(old[0])) for v in value.split(":"))
        else:
            out[key] = parse_value(f"model_args {key}", value, type(old))
    return out


def read_config_file(path, types):
    """{field: value} of a config file (plain Python assigning fields); its errors name it and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    scope = {}
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # the config file's own line, not this function's
        line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path][-1:] or ["?"]
        raise ValueError(f"{path}:{line[0]}: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in scope.items() if not k.startswith("_") and not inspect.ismodule(v)}
    for key, value in values.items():
        if key not in types:
            raise ValueError(f"{path}: unknown config key {key!r}")
        expected = typing.get_args(types[key]) or (types[key],)
        if not isinstance(value, expected) and not (float in expected and type(value) is int):
            raise ValueError(f"{path}: {key} must be {types[key]}, got {value!r}")
    if not values:
        raise ValueError(f"{path}: sets no config field (a config file assigns fields of TrainConfig)")
    return values


def load_config(argv):
    """TrainConfig from config files (plain Python assigning fields) and --key=value overrides, in order."""
    cfg = TrainConfig()
    types = {f.name: f.type for f in fields(TrainConfig)}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in types:
                raise ValueError(f"unknown config key --{key} (python train.py --help lists them)")
            if not sep and bool in (types[key], *typing.get_args(types[key])):  # a bare switch: --overwrite
                sep, text = "=", "true"
            if not sep:
                raise ValueError(f"--{key}: give a value as --{key}=VALUE")
            setattr(cfg, key, parse_value(key, text, types[key]))
        else:
            for key, value in read_config_file(arg, types).items():
                setattr(cfg, key, value)
    return cfg


def field_help():
    """{field: its comment} from TrainConfig's source, so that --help cannot drift from the code."""
    docs, field = {}, None
    for line in inspect.getsource(TrainConfig).splitlines():
        if m := re.match(r" {4}(\w+): [^#]*?(?:#\s*(.*))?$", line):
            field, docs[m[1]] = m[1], m[2] or ""
        elif (m := re.match(r" {5,}#\s*(.*)$", line)) and field:  # a comment continued on the next line
            docs[field] += " " + m[1]
    return docs


def print_help():
    print(__doc__.strip() + "\n\nusage: python train.py [CONFIG.py ...] [--key=value ...]   "
          "(config files and overrides apply in order)\n\nfields, their defaults and meaning:")
    for f, doc in zip(fields(TrainConfig), field_help().values()):
        flag = f"--{f.name}={getattr(TrainConfig, f.name)}"
        for i, text in enumerate(textwrap.wrap(doc, 110 - 33) or [""]):
            print(f"  {flag if i == 0 else '':<30} {text}")


def check_config(cfg, world=None):
    """Every value checked before any work, with a one-line error that names the flag and what it may be."""
    def need(ok, key, what):
        if not ok:
            raise ValueError(f"--{key}={getattr(cfg, key)!r}: must be {what}")
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    for key in ("dataset_size", "shuffle_buffer", "batch_size", "grad_accum", "log_every", "ckpt_every",
                "keep_ckpts", "max_bad_steps", "eval_steps"):
        need(getattr(cfg, key) >= 1, key, ">= 1")
    for key in ("num_workers", "data_lanes", "latent_size", "unmasked_steps", "micro_batch", "max_steps",
                "warmup_steps", "seed", "threads", "eval_every", "eval_n", "val_n", "dataset_scenes"):
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
    need(cfg.lr_schedule in ("cosine", "constant"), "lr_schedule", "'cosine' or 'constant'")
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
    need(cfg.dataset == "shapes" or cfg.data_dir.startswith("hf://") or os.path.isfile(
        os.path.join(cfg.data_dir, "index.json")), "data_dir", "a folder of latent shards (with index.json) "
         "or hf://datasets/USER/NAME for --dataset=shards")
    check_device(cfg.device)
    mcfg = model_config(cfg)
    need(model_type(mcfg) == "MicroDiT" or not cfg.mask_ratio, "mask_ratio", f"0 for {cfg.model}: no patches")
    need(mcfg.latent_size % getattr(mcfg, "patch_size", 1) == 0, "latent_size", "a multiple of the patch")
    try:  # the network is built and run once on the meta device: no memory, no time
        with torch.device("meta"):
            x = torch.zeros(1, mcfg.latent_channels, mcfg.latent_size, mcfg.latent_size)
            build_model(mcfg)(x, torch.zeros(1), torch.zeros(1, 1, mcfg.caption_dim), cfg.mask_ratio)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"--model={cfg.model} (with --model_args/--latent_size): {str(e).splitlines()[0]}") \
            from None
    split_batch(cfg, world or int(os.environ.get("WORLD_SIZE", 1)))


def model_config(cfg):
    """The network's config: the preset, its latent size and interp scale for this run, --model_args."""
    mcfg = get_config(cfg.model, **{k: v for k, v in (("latent_size", cfg.latent_size),
                                                       ("pos_interp_scale", cfg.pos_interp_scale)) if v})
    return replace(mcfg, **model_overrides(cfg.model_args, mcfg))


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to a floor of lr * min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def step_seed(seed, step, stream):
    """A 63-bit seed that is a pure function of (seed, step, stream): the randomness of a step never depends
    on the steps before it, so a resumed run needs no RNG state to replay it exactly."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))

# -----------------------------------------------------------------------------
# setup, step by step


def split_batch(cfg, world):
    """(grad_accum, micro_batch, lanes). The global batch is batch_size on any number of ranks: each rank
    computes a contiguous 1/world of it in grad_accum micro-batches; with micro_batch set (what fits in
    memory), the accumulation follows from the world size."""
    grad_accum = cfg.batch_size // (cfg.micro_batch * world) if cfg.micro_batch else cfg.grad_accum
    micro_batch = cfg.batch_size // (grad_accum * world) if grad_accum > 0 else 0  # per rank and forward pass
    if (not micro_batch or micro_batch * grad_accum * world != cfg.batch_size
            or cfg.micro_batch not in (0, micro_batch)):
        raise ValueError(f"--batch_size={cfg.batch_size} does not split into world size {world} x grad_accum "
                         f"x micro-batch (grad_accum={cfg.grad_accum}, micro_batch={cfg.micro_batch}; "
                         f"see TrainConfig)")
    lanes = cfg.data_lanes or world
    if lanes % world or cfg.batch_size % lanes:
        raise ValueError(f"--data_lanes={lanes} must be a multiple of the world size {world} and divide "
                         f"batch_size={cfg.batch_size}")
    return grad_accum, micro_batch, lanes


def prepare_data(cfg, mcfg, master, ddp):
    """The dataset's index.json, its shards checked against it; the built-in dataset is written on first use,
    sized for the model, in a folder named by everything that defines it."""
    if cfg.dataset == "shapes":  # the built-in images are the latents: their size follows the model's
        res, text_dim = mcfg.latent_size, mcfg.caption_dim
        cfg.data_dir = cfg.data_dir or (f"data_cache/shapes{res}_n{cfg.dataset_size}_seed{cfg.seed}"
                                        f"_d{text_dim}_ctx{cfg.text_context:g}"
                                        + (f"_scenes{cfg.dataset_scenes}" if cfg.dataset_scenes else "")
                                        + ("_partial" if cfg.dataset_captions == "partial" else ""))
        if master:  # a no-op when the same dataset is already there; an error if a different one is
            data.make_shapes_dataset(cfg.data_dir, cfg.dataset_size, res=res, seed=cfg.seed,
                                     text_dim=text_dim, context=cfg.text_context, scenes=cfg.dataset_scenes,
                                     captions=cfg.dataset_captions)
        if ddp:
            dist.barrier()
    index = data.read_index(cfg.data_dir)
    data.check_shards(cfg.data_dir, index)  # a missing or truncated shard now, not when training reaches it
    lanes = cfg.data_lanes or int(os.environ.get("WORLD_SIZE", 1))  # shard streams, each split over workers
    if len(index["shards"]) < lanes * max(1, cfg.num_workers):
        raise ValueError(f"--num_workers={cfg.num_workers}: {cfg.data_dir} has {len(index['shards'])} "
                         f"shards, too few for {lanes} data lanes x {max(1, cfg.num_workers)} workers: "
                         f"use fewer")
    C, H, W = index["latent_shape"]
    if (C, H) != (mcfg.latent_channels, mcfg.latent_size) or index["text_shape"][-1] != mcfg.caption_dim:
        raise ValueError(f"model {cfg.model} expects latents ({mcfg.latent_channels}, {mcfg.latent_size}, "
                         f"{mcfg.latent_size}) and captions of width {mcfg.caption_dim}; {cfg.data_dir} "
                         f"holds latents {tuple(index['latent_shape'])} and captions "
                         f"{tuple(index['text_shape'])}")
    return index


def claim_out_dir(cfg):
    """An out_dir holds one run. A fresh run where another run's checkpoints or log are is refused (or, with
    --overwrite, that run is deleted); leftovers of interrupted writes (*.tmp) are removed."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    names = os.listdir(cfg.out_dir)
    for name in names:
        if name.endswith(".tmp"):
            remove(os.path.join(cfg.out_dir, name))
    ours = [n for n in names if re.fullmatch(r"ckpt-\d+(\.bad)?|log\.jsonl|samples-\d+\.png|curve\.png", n)]
    if ours and cfg.overwrite:
        for name in ours:
            remove(os.path.join(cfg.out_dir, name))
        print(f"--overwrite: deleted the run in {cfg.out_dir} ({len(ours)} files and folders)")
    elif ours and not cfg.resume:
        ckpts = list_checkpoints(cfg.out_dir)
        held = f"checkpoints up to {os.path.basename(ckpts[0])}" if ckpts else "a log.jsonl"
        raise ValueError(f"{cfg.out_dir} holds another run ({held}): continue it with --resume=auto, or "
                         f"start this one in a new --out_dir, or pass --overwrite to delete that run")


def keep_log_until(cfg, step):
    """log.jsonl belongs to this run: records after the step it (re)starts from, of an interrupted part
    that is now being redone, are dropped."""
    path = os.path.join(cfg.out_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_write(path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)


def start(cfg, net, ema, master, ddp, device):
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
                if master:
                    print(f"warning: checkpoint {folder} does not load ({type(e).__name__}: {e}); "
                          f"moved aside as {folder}.bad, trying an older one")
                    os.replace(folder, folder + ".bad")  # so that pruning by step never prefers it
    elif cfg.resume:
        found = "resumed from", cfg.resume, read_checkpoint(cfg.resume)
    if found is None and cfg.init_from:
        folder = resolve_checkpoint(cfg.init_from)
        found = "started from", folder, read_checkpoint(folder, full=cfg.init_state)
    step, samples, skipped, opt_state = 0, 0, 0, None
    if found is None and cfg.resume == "auto" and master:
        print(f"no checkpoint in {cfg.out_dir} to resume: starting fresh")
    if found is not None:
        how, folder, ckpt = found
        state, opt_state = load_checkpoint(ckpt, folder, net, ema)
        if ckpt["opt"] is not None:
            step, samples, skipped = state["step"], state["samples"], state.get("skipped", 0)
        if master:
            print(f"{how} {folder} at step {step}" + ("" if ckpt["opt"] is not None else " (weights only)"))
    if ddp:  # every rank must start at the same step: with several nodes, out_dir must be on shared storage
        agreed = torch.tensor([step, -step], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        if agreed.sum() != 0:
            raise RunError(f"rank {dist.get_rank()} starts at step {step}, another rank does not: "
                           f"is {cfg.out_dir} shared?")
    if master:
        keep_log_until(cfg, step)
    return step, samples, skipped, opt_state


def make_loaders(cfg, rank, world, lanes, samples):
    """One endless batch iterator per data lane of this rank. Each global batch is `lanes` blocks of
    batch_size/lanes records, block l from shard stream l (its own shards): rank r reads lanes
    [r, r+1) * lanes/world, its contiguous 1/world of every global batch. A fixed data_lanes gives the same
    global batches on every world size that divides it."""
    per_lane = cfg.batch_size // lanes
    # the loaders get their own generator: drawing their seed from the global RNG would shift a resumed run's
    # noise
    loaders = [iter(torch.utils.data.DataLoader(
        data.ShardStream(cfg.data_dir, seed=cfg.seed, rank=lane, world_size=lanes,
                         shuffle_buffer=cfg.shuffle_buffer, start=samples // lanes, batch_size=per_lane),
        batch_size=per_lane, num_workers=cfg.num_workers, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(cfg.seed)))
        for lane in range(rank * lanes // world, (rank + 1) * lanes // world)]
    LOADERS.update(loaders)
    return loaders


LOADERS = weakref.WeakSet()  # this process's DataLoader iterators, stopped by main() when a run fails


def print_plan(cfg, net, flops_at, mask_at, step, device, bf16, peak, world, grad_accum, micro_batch, lanes):
    """What this run is: the model, its FLOPs and price, the device and the batch arithmetic."""
    total = sum(flops_at[mask_at(s)] for s in range(step, cfg.max_steps)) * cfg.batch_size
    unmasked = (f", the last {cfg.unmasked_steps} steps unmasked" if cfg.unmasked_steps and cfg.mask_ratio
                else "")
    print(f"model {cfg.model}: {num_params(net):,} parameters, {flops_at[cfg.mask_ratio] / 1e9:.2f} training "
          f"GFLOPs per image at mask ratio {cfg.mask_ratio}{unmasked}; device {device}"
          f"{' bf16' if bf16 else ''}, peak {peak / 1e12:.2f} TFLOP/s (measured matmul)")
    print(f"this run: {total:.2e} training FLOPs, {gpu_hours(total):.2g} H100-hours = "
          f"${dollars(gpu_hours(total)):.2g} at {DEFAULT_MFU:.0%} MFU and ${PRICE_PER_GPU_HOUR}/hour "
          f"(scaling.py)")
    print(f"batch {cfg.batch_size} = {world} ranks x {grad_accum} accumulation x {micro_batch} micro-batch; "
          f"{lanes} data lanes")


def build(cfg, mcfg, device, master):
    """(net, ema): the network and its EMA: on rank 0 only (the rank that evaluates and saves it), or under
    FSDP on every rank, to be sharded like the weights."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    net = build_model(mcfg).to(device)
    keep_ema = cfg.ema_decay > 0 and (master or cfg.fsdp)
    return net, copy.deepcopy(net).eval().requires_grad_(False) if keep_ema else None


def spread(cfg, net, ema, opt_state, device, bf16, ddp, master):
    """(model, opt, plain): the network as it runs (activation checkpointing, FSDP or DDP, compile), AdamW
    over its parameters (sharded under FSDP) with the state a checkpoint gave, and under FSDP rank 0's
    unsharded copies (net, ema) that evaluation and checkpoints gather the weights into."""
    plain = [copy.deepcopy(m).cpu() if cfg.fsdp and master and m is not None else None for m in (net, ema)]
    if cfg.act_ckpt:
        checkpoint_blocks(net)
    if cfg.fsdp:
        shard(net, device, bf16)
        if ema is not None:
            shard(ema, device, bf16)
    # fused: one kernel for all the parameters instead of several per tensor (on CPU too)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))
    if opt_state is not None:
        load_optimizer_state(net, opt, opt_state, cfg.fsdp)
    model = torch.compile(net) if cfg.compile else net  # compile after .to(device), before the DDP wrap
    if ddp and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    return model, opt, plain


def checkpoint_config(cfg, meta, prompts):
    """What every checkpoint's config.json records beside the model: the frozen encoders its data was made
    with (sample.py rebuilds them), sigma_data, the training config and the evaluation captions."""
    # (datasets written before encoder specs existed name only the built-in encoder's size)
    text_encoder = meta.get("text_encoder") or {"type": "builtin", "dim": meta["text_dim"],
                                                "max_len": meta["max_len"]}
    latents = meta.get("latents") or {"type": meta.get("latent", "pixels")}
    return {"text_encoder": text_encoder, "latents": latents, "sigma_data": cfg.sigma_data,
            "train": asdict(cfg), "eval_prompts": prompts}


@torch.no_grad()
def update_ema(ema, net, step, decay):
    """EMA of the weights, warmed up: early weights are forgotten quickly."""
    decay = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p.detach(), 1 - decay)


def update(cfg, opt, net, ema, step, bad, bad_in_row, master):
    """The optimizer step and the EMA's; a bad step (a non-finite loss or gradient) is skipped: no update of
    the weights, the EMA or the optimizer, and the batch is passed over. Returns the bad steps in a row."""
    if not bad:
        opt.step()
        if ema is not None:
            update_ema(ema, net, step, cfg.ema_decay)
    opt.zero_grad(set_to_none=True)
    if bad:
        report_bad_step(cfg, step, bad_in_row + 1, master)
    return bad_in_row + 1 if bad else 0


def report_bad_step(cfg, step, bad_in_row, master):
    """A skipped step is said; max_bad_steps of them in a row stop the run."""
    if master:
        print(f"step {step + 1:6d} | non-finite loss or gradient: skipped ({bad_in_row} in a row)",
              flush=True)
    if bad_in_row >= cfg.max_bad_steps:
        raise RunError(f"step {step + 1}: {bad_in_row} steps in a row with a non-finite loss or gradient "
                           f"(max_bad_steps={cfg.max_bad_steps}); stopping. The checkpoints in {cfg.out_dir} "
                           f"hold finite weights: lower lr or grad_clip, check the data, then resume")


def mixed(cfg, device):
    """FSDP on CUDA computes in bf16 through its mixed-precision policy, instead of autocast."""
    return cfg.fsdp and device.type == "cuda"


def forward_backward(cfg, D, x, y, sigma, noise, mask_ratio, micro_batch, grad_accum, ddp, bf16):
    """The loss of this rank's part of the batch, its gradients accumulated over micro-batches; DDP and FSDP
    reduce them over the ranks on the last micro-batch only."""
    loss = torch.zeros((), device=x.device)
    for i in range(0, len(x), micro_batch):
        mb = slice(i, i + micro_batch)
        sync = i + micro_batch == len(x) or not ddp
        autocast = bf16 and not mixed(cfg, x.device)
        with grad_sync(D.net, ddp, cfg.fsdp, sync), \
                torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            micro_loss = edm_loss(D, x[mb], y[mb], sigma[mb], noise[mb], mask_ratio)
            (micro_loss / grad_accum).backward()
        loss += micro_loss.detach() / grad_accum
    return loss


class Meter:
    """What happened since the last log line (mean loss of the good steps, time, FLOPs), then the line with
    the step, of how many, and the time left at the pace so far (evaluations and checkpoints left out)."""

    def __init__(self, cfg, peak, world, device):
        self.cfg, self.peak, self.world, self.device = cfg, peak, world, device
        self.train_s, self.steps = 0.0, 0  # the pace of this run so far
        self.reset()

    def reset(self):
        self.t0, self.loss_sum, self.n_ok, self.n, self.flops = time.perf_counter(), 0.0, 0, 0, 0.0

    def add(self, loss, ok, flops):
        self.loss_sum, self.n_ok = (self.loss_sum + loss, self.n_ok + 1) if ok else (self.loss_sum, self.n_ok)
        self.n, self.flops = self.n + 1, self.flops + flops

    def log(self, step, skipped, ddp, master):
        cfg = self.cfg
        loss = torch.as_tensor(self.loss_sum / self.n_ok if self.n_ok else float("nan"), device=self.device)
        if ddp:  # gloo has no ReduceOp.AVG
            dist.all_reduce(loss)
            loss /= self.world
        dt = (time.perf_counter() - self.t0) / self.n
        self.train_s, self.steps = self.train_s + dt * self.n, self.steps + self.n
        if master:
            ips, mfu = cfg.batch_size / dt, self.flops / (dt * self.n) / self.world / self.peak
            eta = round((cfg.max_steps - step) * self.train_s / self.steps)
            print(f"step {step:6d}/{cfg.max_steps} | loss {loss.item():.4f} | lr {lr_at(step - 1, cfg):.2e}"
                  f" | {dt * 1000:.0f} ms/step | {ips:.0f} img/s | MFU {mfu:.1%} | "
                  f"ETA {eta // 60}m{eta % 60:02d}s" + (f" | skipped {skipped}" if skipped else ""),
                  flush=True)
            log(cfg, {"step": step, "loss": loss.item(), "ms_per_step": dt * 1000, "img_per_s": ips,
                      "skipped": skipped})
        self.reset()


@torch.no_grad()
def evaluate(cfg, net, val, prompts, extra, step, device):
    """Validation loss at mask ratio 0, and held-out captions sampled and scored (with a sample grid)."""
    n_val = 0 if val is None else min(cfg.val_n, len(val["latent"]))
    sampled = f", {len(prompts)} captions sampled ({cfg.eval_steps} Heun steps) and scored" if prompts else ""
    print(f"step {step:6d} | evaluating: validation loss on {n_val} images{sampled}", flush=True)
    home = next(net.parameters()).device  # under FSDP rank 0's full copy waits on the CPU between uses
    with torch.random.fork_rng():  # evaluation must not shift the training RNG stream
        torch.manual_seed(1234)
        D, results = Denoiser(net.to(device), cfg.sigma_data), {}
        if val is not None and cfg.val_n > 0:
            x, y = val["latent"][:cfg.val_n].to(device), val["text"][:cfg.val_n].to(device)
            losses = []
            for i in range(0, len(x), 64):
                sigma = sample_sigma(len(x[i:i + 64]), cfg.P_mean, cfg.P_std, device)
                losses.append(edm_loss(D, x[i:i + 64], y[i:i + 64], sigma, torch.randn_like(x[i:i + 64])))
            results["val_loss"] = float(torch.stack(losses).mean())
        if prompts:
            images = generate(D, extra, prompts, seed=0, steps=cfg.eval_steps, guidance=cfg.eval_guidance)
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


def log(cfg, record):
    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")

# -----------------------------------------------------------------------------
# the loop


def train(cfg):
    t_begin = time.perf_counter()  # the wall clock split in the final record: data, training, evaluation
    check_config(cfg)
    ddp, rank, world, device = setup_distributed(cfg.device)
    master, bf16 = rank == 0, device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    torch.set_num_threads(cfg.threads or default_threads())
    grad_accum, micro_batch, lanes = split_batch(cfg, world)
    mcfg = model_config(cfg)
    if master:
        claim_out_dir(cfg)
    index = prepare_data(cfg, mcfg, master, ddp)
    data_s = time.perf_counter() - t_begin  # (mostly the built-in dataset's generation, on the first run)
    if master:
        print("config:", json.dumps(asdict(cfg)))

    net, ema = build(cfg, mcfg, device, master)
    step, samples, skipped, opt_state = start(cfg, net, ema, master, ddp, device)
    mask_at = lambda step: 0.0 if step >= cfg.max_steps - cfg.unmasked_steps else cfg.mask_ratio
    flops_at = {m: flops_per_image(mcfg, m, caption_len=index["text_shape"][0])  # per image, train step
                for m in (cfg.mask_ratio, 0.0)}
    dtype = torch.bfloat16 if bf16 else torch.float32
    measured = None if cfg.peak_flops else measure_peak_flops(device, dtype)
    peak = cfg.peak_flops or measured
    if master and (warning := busy_warning(device, dtype, measured, torch.get_num_threads())):
        print(warning, flush=True)
    if master:
        print_plan(cfg, net, flops_at, mask_at, step, device, bf16, peak, world, grad_accum, micro_batch,
                   lanes)
    loaders = make_loaders(cfg, rank, world, lanes, samples)
    model, opt, plain = spread(cfg, net, ema, opt_state, device, bf16, ddp, master)
    D = Denoiser(model, cfg.sigma_data)
    full = lambda: [full_weights(m, p, cfg.fsdp, device) for m, p in ((net, plain[0]), (ema, plain[1]))]
    val = data.load_all(os.path.join(cfg.data_dir, "val")) if data.has_split(cfg.data_dir, "val") else None
    prompts = shapes.heldout_captions(cfg.eval_n) if index["meta"].get("dataset") == "shapes" else []
    extra = checkpoint_config(cfg, index["meta"], prompts)
    state = lambda: {"step": step, "samples": samples, "skipped": skipped, "config": asdict(cfg)}

    stop = StopSignals(master, lambda: step + 1)
    gen = torch.Generator(device=device)  # seeded alike on every rank: the noise of the global batch
    meter, bad_in_row, stopping = Meter(cfg, peak, world, device), 0, False
    t_start, step_start = time.perf_counter(), step
    while step < cfg.max_steps and not stopping:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        # A step's randomness is a function of (seed, step), so a resume replays it without RNG state. sigma,
        # noise and caption dropout are drawn for the whole global batch on every rank, each rank keeping its
        # slice: any world size trains on the same noise. The token masks (drawn inside the model) use the
        # per-rank global RNG.
        gen.manual_seed(step_seed(cfg.seed, step, 0))
        torch.manual_seed(step_seed(cfg.seed, step, 1 + rank))
        batches = [next(it) for it in loaders]
        x = torch.cat([b["latent"] for b in batches]).to(device)  # (batch_size / world, C, H, W)
        y = torch.cat([b["text"] for b in batches]).to(device)  # (batch_size / world, L, Dy)
        sigma, noise, keep = training_noise(cfg.batch_size, x.shape[1:], cfg.P_mean, cfg.P_std,
                                            cfg.caption_dropout, device, gen)  # for the whole global batch
        part = slice(rank * len(x), (rank + 1) * len(x))
        loss = forward_backward(cfg, D, x, drop_captions(y, keep[part]), sigma[part], noise[part],
                                mask_at(step), micro_batch, grad_accum, ddp, bf16)
        bad = ~loss.isfinite()
        if cfg.grad_clip > 0:  # the norm of the all-reduced gradient: the same on every rank
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            bad |= ~(norm.full_tensor() if cfg.fsdp else norm).isfinite()  # FSDP: a replicated DTensor
        flags = torch.stack([torch.tensor(float(stop.requested), device=device), bad.float()])
        if ddp:  # a signal may reach the ranks at different steps: they all stop (or skip) at the same one
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stopping, bad = (bool(f) for f in flags.tolist())
        bad_in_row = update(cfg, opt, net, ema, step, bad, bad_in_row, master)
        skipped += bad
        meter.add(loss, not bad, flops_at[mask_at(step)] * cfg.batch_size)
        step, samples = step + 1, samples + cfg.batch_size

        if step % cfg.log_every == 0 or step == cfg.max_steps or step == step_start + 1:  # a first line now
            meter.log(step, skipped, ddp, master)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            weights = full()  # (under FSDP every rank takes part in gathering them)
            if master:
                results = evaluate(cfg, weights[1] or weights[0], val, prompts, extra, step, device)
                print(f"step {step:6d} | eval " + " ".join(f"{k} {v:.3f}" for k, v in results.items()),
                      flush=True)
                log(cfg, {"step": step, **results})
            meter.t0 = time.perf_counter()
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stopping:
            weights, opt_state = full(), full_optimizer_state(net, opt, cfg.fsdp, device)
            if master:
                save_checkpoint(cfg, *weights, opt_state, extra, state())
            meter.t0 = time.perf_counter()

    stop.restore()
    weights = full() if step == step_start else weights  # no step here: the weights it started with
    if master:  # ({}: AdamW's state before any step)
        times = dict(begin=t_begin, data_s=data_s, train_s=time.perf_counter() - t_start)
        finish(cfg, *weights, {}, val, prompts, extra, state(), stopping, times, step - step_start, device)
    if ddp:  # the ranks tear down together, the models before the process group they use (gloo can hang)
        dist.barrier()
        del D, model, net, ema, opt
        dist.destroy_process_group()


def finish(cfg, net, ema, opt_state, val, prompts, extra, state, stopped, times, steps_here, device):
    """The end of a run on rank 0: the final evaluation, in the log and the model card; the loss curve; the
    upload. times: begin (train()'s start, perf_counter), data_s and train_s (the loop's seconds)."""
    step = state["step"]
    if stopped:
        print(f"stopped by signal at step {step}; checkpoint written, the same command with --resume=auto "
              f"continues it", flush=True)
        return
    final = os.path.join(cfg.out_dir, f"ckpt-{step:07d}")
    if not os.path.isdir(final):  # --max_steps=0: the initial weights are the result
        save_checkpoint(cfg, net, ema, opt_state, extra, state)
    t_eval = time.perf_counter()
    results = evaluate(cfg, ema or net, val, prompts, extra, step, device)
    now = time.perf_counter()
    split = dict(data_s=times["data_s"], train_s=times["train_s"], eval_s=now - t_eval,
                 wall_s=now - times["begin"])
    print(f"done: {step} steps ({steps_here} here) in {split['train_s']:.0f}s | final "
          + " ".join(f"{k} {v:.3f}" for k, v in results.items()))
    print("wall clock: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in split.items()), flush=True)
    log(cfg, {"step": step, "final": True, **{k: round(v, 2) for k, v in split.items()}, **results})
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
        return print_help()
    try:
        return train(load_config(argv))
    except KeyboardInterrupt:  # the second Ctrl-C
        message = "stopped without a checkpoint; the newest one in out_dir is kept"
    except (ValueError, OSError, RunError) as e:  # bad input, a damaged file, a full disk: one line
        # (a DataLoader worker's error arrives as "Caught ValueError in DataLoader worker..." + its traceback)
        message = "error: " + str(e).strip().splitlines()[-1 if str(e).startswith("Caught ") else 0]
    for it in list(LOADERS):  # a failed run's DataLoader workers ignore SIGTERM: stop them, or the exit waits
        getattr(it, "_shutdown_workers", lambda: None)()  # for them forever (torch has no public close)
    sys.exit(f"train.py: {message}")


if __name__ == "__main__":
    main(sys.argv[1:])
