"""
Train a text-to-image diffusion model on latent shards. With no arguments it trains a CPU-sized MicroDiT
on the built-in shapes dataset (generated on first use) in minutes:

    python train.py                                   # the built-in default
    python train.py configs/my_run.py --max_steps=500 # a config file, then --key=value overrides
    torchrun --standalone --nproc_per_node=8 train.py configs/stage1_256_masked.py   # DDP

Reads top to bottom: config -> DDP -> data -> model -> optimizer -> compile -> DDP wrap -> helpers -> loop.
"""
import contextlib
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
import typing
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist


@dataclass
class TrainConfig:
    # data
    dataset: str = "shapes"                # "shapes": the built-in dataset, written to data_dir if missing; "shards": existing
    data_dir: str = ""                     # latent shards (index.json + shard-*.safetensors); "" = data_cache/shapes<res>
    dataset_size: int = 40_000             # built-in dataset: training images to generate
    shuffle_buffer: int = 8192             # records shuffled together in memory
    num_workers: int = 0                   # DataLoader workers per rank
    # model
    model: str = "MicroDiT_S"              # a preset of model.py
    # diffusion (EDM, SPEC A3)
    P_mean: float = -0.6                   # ln(sigma) ~ N(P_mean, P_std^2) during training
    P_std: float = 1.2
    sigma_data: float = 0.9
    mask_ratio: float = 0.5                # fraction of patches dropped after the patch-mixer
    caption_dropout: float = 0.1           # captions replaced by zeros, for classifier-free guidance
    # optimisation (AdamW)
    batch_size: int = 64                   # global batch: per-rank micro-batch x grad_accum x world size
    grad_accum: int = 1                    # micro-batches per optimizer step
    max_steps: int = 4000
    lr: float = 1e-3
    lr_schedule: str = "cosine"            # "cosine" (warmup, cosine to lr * min_lr_ratio) or "constant" (warmup)
    warmup_steps: int = 200
    min_lr_ratio: float = 0.33             # the floor of the cosine, as a fraction of lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0                 # max gradient norm; 0 = off
    ema_decay: float = 0.999               # EMA of the weights (warmed up); 0 = no EMA
    # system
    device: str = "auto"                   # "auto" = cuda if available, else cpu
    bf16: typing.Optional[bool] = None     # bf16 autocast; None = on for CUDA, off for CPU
    compile: bool = False                  # torch.compile the model
    seed: int = 0
    threads: int = 0                       # CPU threads for torch; 0 = leave torch's default
    # logging, evaluation, checkpoints
    out_dir: str = "out/default"
    log_every: int = 100                   # steps between log lines
    eval_every: int = 0                    # steps between sample grids + scores; 0 = only at the end
    eval_n: int = 64                       # held-out captions sampled at each evaluation
    eval_steps: int = 18                   # Heun steps of the evaluation sampler
    eval_guidance: float = 3.0             # classifier-free guidance of the evaluation sampler
    val_n: int = 256                       # held-out images for the validation loss (mask ratio 0)
    ckpt_every: int = 1000                 # steps between checkpoints (and one at the end)
    keep_ckpts: int = 2                    # newest checkpoints kept in out_dir
    resume: str = ""                       # "" = start fresh, "auto" = newest checkpoint in out_dir, or a path
    peak_flops: float = 0.0                # device peak FLOP/s for MFU; 0 = measure a matmul once


def parse_value(key, text, typ):
    """'--key=value' text -> a value of the field's type, or a clear error naming the key."""
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


def load_config(argv):
    """TrainConfig from config files (plain Python assigning fields) and --key=value overrides, in order."""
    cfg = TrainConfig()
    types = {f.name: f.type for f in fields(TrainConfig)}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in types:
                raise ValueError(f"unknown config key --{key} (known: {', '.join(types)})")
            if not sep:
                raise ValueError(f"--{key}: give a value as --{key}=VALUE")
            setattr(cfg, key, parse_value(key, text, types[key]))
        else:  # a config file: plain Python whose top-level names are config fields
            if not os.path.isfile(arg):
                raise FileNotFoundError(f"config file not found: {arg}")
            scope = {}
            exec(open(arg).read(), scope)
            for key, value in scope.items():
                if key.startswith("_") or isinstance(value, type(os)):
                    continue
                if key not in types:
                    raise ValueError(f"{arg}: unknown config key {key!r}")
                expected = typing.get_args(types[key]) or (types[key],)
                if not isinstance(value, expected) and not (float in expected and isinstance(value, int)):
                    raise ValueError(f"{arg}: {key} must be {types[key]}, got {value!r}")
                setattr(cfg, key, value)
    return cfg


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to a floor of lr * min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


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


# --- optimizer and training state as plain data: tensors in safetensors, the rest in JSON ---------

def save_train_state(folder, step, samples, opt, extra):
    from safetensors.torch import save_file
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, os.path.join(folder, "state.safetensors"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"step": step, "samples": samples, "param_groups": sd["param_groups"], **extra}, f, indent=2)


def load_train_state(folder, opt):
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(folder, "state.safetensors"))
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    per_param = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            per_param.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def newest_checkpoint(out_dir):
    """The newest complete ckpt-* folder (an interrupted write leaves only a *.tmp folder)."""
    if not os.path.isdir(out_dir):
        return None
    done = sorted(d for d in os.listdir(out_dir) if d.startswith("ckpt-") and not d.endswith(".tmp")
                  and os.path.isfile(os.path.join(out_dir, d, "state.json")))
    return os.path.join(out_dir, done[-1]) if done else None


def train(cfg):
    import data
    from model import atomic_dir, build_model, edm_loss, drop_captions, flops_per_image, get_config, \
        load_weights, num_params, save_pretrained
    from sample import generate, image_grid

    # --- distributed: torchrun sets RANK/WORLD_SIZE; plain `python train.py` is one process -------
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    if cfg.device == "auto":
        cfg.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by grad_accum={cfg.grad_accum} x "
                         f"world size {world}")
    micro_batch = cfg.batch_size // (cfg.grad_accum * world)  # per rank, per forward pass
    torch.manual_seed(cfg.seed + rank)

    # --- data: the built-in dataset is written on first use -----------------------------------
    if cfg.dataset not in ("shapes", "shards"):
        raise ValueError(f"--dataset must be 'shapes' or 'shards', got {cfg.dataset!r}")
    mcfg = get_config(cfg.model)
    if cfg.dataset == "shapes":  # the built-in images are the latents: their size and caption width follow the model
        res, text_dim = mcfg.latent_size, mcfg.caption_dim
        cfg.data_dir = cfg.data_dir or f"data_cache/shapes{res}" + (f"_d{text_dim}" if text_dim != 64 else "")
        if master:  # a no-op when the same dataset is already there; an error if a different one is
            data.make_shapes_dataset(cfg.data_dir, cfg.dataset_size, res=res, seed=cfg.seed, text_dim=text_dim)
        if ddp:
            dist.barrier()
    index = data.read_index(cfg.data_dir)
    meta = index["meta"]
    if master:
        print("config:", json.dumps(asdict(cfg)))

    # --- model ---------------------------------------------------------------------------------
    C, H, W = index["latent_shape"]
    if (C, H) != (mcfg.latent_channels, mcfg.latent_size) or index["text_shape"][-1] != mcfg.caption_dim:
        raise ValueError(f"model {cfg.model} expects latents ({mcfg.latent_channels}, {mcfg.latent_size}, "
                         f"{mcfg.latent_size}) and captions of width {mcfg.caption_dim}; {cfg.data_dir} holds "
                         f"latents {tuple(index['latent_shape'])} and captions {tuple(index['text_shape'])}")
    net = build_model(mcfg).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    step, samples = 0, 0
    resume = newest_checkpoint(cfg.out_dir) if cfg.resume == "auto" else cfg.resume
    if resume:
        from safetensors.torch import load_file
        load_weights(net, load_file(os.path.join(resume, "model.safetensors")), resume)
        if ema is not None:
            load_weights(ema, load_file(os.path.join(resume, "ema.safetensors")), resume)
        state = load_train_state(resume, opt)
        step, samples = state["step"], state["samples"]
        if master:
            print(f"resumed from {resume} at step {step}")
    elif cfg.resume == "auto" and master:
        print(f"no checkpoint in {cfg.out_dir}: starting fresh")
    flops = flops_per_image(mcfg, cfg.mask_ratio, caption_len=index["text_shape"][0])
    peak = cfg.peak_flops or measure_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    if master:
        print(f"model {cfg.model}: {num_params(net):,} parameters, {flops / 1e9:.2f} training GFLOPs per image "
              f"at mask ratio {cfg.mask_ratio}; device {device}{' bf16' if bf16 else ''}, "
              f"peak {peak / 1e12:.2f} TFLOP/s (measured matmul)")

    stream = data.ShardStream(cfg.data_dir, seed=cfg.seed, rank=rank, world_size=world,
                              shuffle_buffer=cfg.shuffle_buffer, start=samples // world, batch_size=micro_batch)
    # the loader gets its own generator: drawing its seed from the global RNG would shift a resumed run's noise
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=micro_batch, num_workers=cfg.num_workers,
                                              generator=torch.Generator().manual_seed(cfg.seed)))
    model = torch.compile(net) if cfg.compile else net  # compile after .to(device), before the DDP wrap
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # --- helpers ---------------------------------------------------------------------------------
    val = data.load_all(os.path.join(cfg.data_dir, "val")) if os.path.exists(os.path.join(cfg.data_dir, "val")) else None
    eval_prompts = data.heldout_captions(cfg.eval_n) if meta.get("dataset") == "shapes" else []
    extra = {"text_encoder": {"type": "builtin", "dim": meta["text_dim"], "max_len": meta["max_len"]},
             "latents": {"type": meta.get("latent", "pixels")}, "train": asdict(cfg), "eval_prompts": eval_prompts}

    @torch.no_grad()
    def evaluate():
        """Validation loss at mask ratio 0, and held-out captions sampled and scored."""
        with torch.random.fork_rng():  # evaluation must not shift the training RNG stream
            torch.manual_seed(1234)
            net_eval = ema or net
            results = {}
            if val is not None:
                x, y = val["latent"][:cfg.val_n].to(device), val["text"][:cfg.val_n].to(device)
                losses = [edm_loss(net_eval, x[i:i + 64], y[i:i + 64], 0.0, cfg.P_mean, cfg.P_std, cfg.sigma_data)
                          for i in range(0, len(x), 64)]
                results["val_loss"] = float(torch.stack(losses).mean())
            if eval_prompts:
                images = generate(net_eval, extra, eval_prompts, seed=0, steps=cfg.eval_steps,
                                  guidance=cfg.eval_guidance, progress=False)
                image_grid(images[:64], cols=8).save(os.path.join(cfg.out_dir, f"samples-{step:07d}.png"))
                results.update({f"acc_{k}": v for k, v in data.score(images, eval_prompts).items()})
        return results

    def save_checkpoint():
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise RuntimeError(f"step {step}: non-finite weights; not writing a checkpoint")
        path = os.path.join(cfg.out_dir, f"ckpt-{step:07d}")
        with atomic_dir(path) as tmp:
            save_pretrained(tmp, net, ema, extra)
            save_train_state(tmp, step, samples, opt, {"config": asdict(cfg)})
        old = sorted(d for d in os.listdir(cfg.out_dir) if d.startswith("ckpt-") and not d.endswith(".tmp"))
        for d in old[:-cfg.keep_ckpts]:
            shutil.rmtree(os.path.join(cfg.out_dir, d))
        return path

    def log(record):
        with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- the loop --------------------------------------------------------------------------------
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    stop = []  # SIGTERM / SIGINT: finish this step, checkpoint, exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    t_log, loss_sum, n_log = time.perf_counter(), 0.0, 0
    t_start, step_start = t_log, step
    while step < cfg.max_steps and not stop:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        for micro in range(cfg.grad_accum):
            batch = next(loader)
            x, y = batch["latent"].to(device), batch["text"].to(device)
            y = drop_captions(y, cfg.caption_dropout)
            sync = micro == cfg.grad_accum - 1 or not ddp  # all-reduce gradients on the last micro-batch only
            with (contextlib.nullcontext() if sync else model.no_sync()), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = edm_loss(model, x, y, cfg.mask_ratio, cfg.P_mean, cfg.P_std, cfg.sigma_data)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:  # EMA warm-up: early weights are forgotten quickly
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p.detach(), 1 - decay)
        step += 1
        n_log += 1
        samples += cfg.batch_size

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            loss_avg = torch.tensor(loss_sum / n_log, device=device)
            if ddp:
                dist.all_reduce(loss_avg, op=dist.ReduceOp.AVG)
            dt = (time.perf_counter() - t_log) / n_log
            if master:
                ips = cfg.batch_size / dt
                print(f"step {step:6d} | loss {loss_avg.item():.4f} | lr {lr_at(step - 1, cfg):.2e} | {dt * 1000:.0f} ms/step "
                      f"| {ips:.0f} img/s | MFU {flops * ips / world / peak:.1%}")
                log({"step": step, "loss": loss_avg.item(), "ms_per_step": dt * 1000, "img_per_s": ips})
            t_log, loss_sum, n_log = time.perf_counter(), 0.0, 0
        if master and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            results = evaluate()
            print(f"step {step:6d} | eval " + " ".join(f"{k} {v:.3f}" for k, v in results.items()))
            log({"step": step, **results})
            t_log = time.perf_counter()
        if master and (step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop):
            save_checkpoint()
            t_log = time.perf_counter()

    if master:
        train_s = time.perf_counter() - t_start
        if stop:
            print(f"stopped by signal at step {step}; checkpoint written, resume with --resume=auto")
        else:
            results = evaluate()
            print(f"done: {step} steps ({step - step_start} here) in {train_s:.0f}s | final "
                  + " ".join(f"{k} {v:.3f}" for k, v in results.items()))
            log({"step": step, "final": True, "train_s": train_s, **results})
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    train(load_config(sys.argv[1:]))
