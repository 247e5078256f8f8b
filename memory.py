"""
Per-GPU memory of a training step, planned before it runs: the model's states (fp32 weights, gradients,
AdamW's two moments, the fp32 EMA) and its activations, under three strategies. The model states are counted
as ZeRO counts them (Rajbhandari et al. 2020), with fp32 weights and gradients and an EMA copy; FSDP is
PyTorch's FSDP2 (fully_shard, parallel.py), ZeRO's stage 3:

    DDP          every state whole on every GPU: 4 + 4 + 8 + 4 = 20 bytes per parameter
    FSDP         full sharding over G GPUs: the states divided by G, plus the parameters being computed
                 gathered whole in the compute dtype (the root's own ones and the two largest blocks: the one
                 running and the one prefetched)
    FSDP + ckpt  the same, with every block under activation checkpointing: a block keeps only its inputs,
                 and backward recomputes one block at a time

(DDP's gradient buckets add 4 bytes per parameter more unless gradient_as_bucket_view=True; they are not
counted.)

Activations are measured, not modelled: one training forward (the EDM loss through diffusion.Denoiser) runs
on the meta device under torch.autograd.graph.saved_tensors_hooks, and the bytes of every tensor autograd
saves for backward are added up, each storage once. Nothing is allocated: MicroDiT_XL_2 at 256 images takes
seconds.

    python scaling.py memory --model MicroDiT_XL_2 --batch 256 --gpus 8 [--res 256] [--mask_ratio 0.75]
    python scaling.py memory --table    # MicroDiT_XL_2 and the 16 UNets of Paper B: 256 images/GPU, 8 GPUs

Two choices make the meta-device numbers those of a GPU:

- Fake tensors. Plain meta tensors run F.scaled_dot_product_attention as its math fallback, which saves the
  (B, heads, N, N) attention matrix that no GPU kernel keeps. FakeTensorMode's tensors are meta tensors that
  carry a device (here the CPU): SDPA picks the flash kernel, which saves q, k, v, the output and the
  log-sum-exp, as the GPU's flash attention does.
- bf16 autocast, applied here. torch.autocast does not act on meta tensors (they have no CPU or CUDA autocast
  dispatch key); on fake CPU tensors it follows the CPU's op lists (LayerNorm and GroupNorm in bf16, unlike
  CUDA); and CUDA autocast on fake CUDA tensors aborts a CPU-only build (casting a weight needs a CUDA device
  guard). So BF16Autocast below applies CUDA autocast's rules itself to the ops these networks call: matmul,
  conv and attention inputs cast to bf16 (and saved in bf16), norms, softmax and reductions in fp32,
  everything else in the dtype of its inputs. `--fp32` measures without autocast.
"""
import argparse
import contextlib
import functools
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

from diffusion import Denoiser, drop_captions, edm_loss, training_noise
from model import PRESETS, UNET_PRESETS, MicroDiTConfig, build_model, num_params, param_count
import parallel

GB = 1e9                # bytes; every figure printed is in GB of 10^9 bytes
GPU_BYTES = 80e9        # an 80 GB GPU (an H100 80GB holds 85.9e9 bytes: the rest is left to the CUDA
                        # context, the allocator's fragmentation and each op's transient buffers)
CAPTION_LEN = 77        # caption tokens (OpenCLIP-H's context)
P_MEAN = -0.6           # train.py's defaults for the noise levels and caption dropout;
P_STD = 1.2             # only the shapes they give matter here
CAPTION_DROPOUT = 0.1
STATE_BYTES = {"weights": 4, "grads": 4, "moments": 8, "ema": 4}  # per parameter, all fp32


def paper_presets():
    """MicroDiT_XL_2 and the 16 UNets of Paper B's Table 1 (the UNet presets on SDXL VAE latents)."""
    return ["MicroDiT_XL_2"] + [name for name, cfg in UNET_PRESETS.items() if cfg.latent_channels == 4]


def config_at(name, res):
    """A preset at a resolution: SDXL VAE latents are res/8 (512px MicroDiT keeps 256px's position range);
    presets on raw pixels (3 latent channels) keep their own size."""
    cfg = PRESETS[name]
    if cfg.latent_channels == 3:
        return cfg
    if isinstance(cfg, MicroDiTConfig):
        return replace(cfg, latent_size=res // 8, pos_interp_scale=res / 256)
    return replace(cfg, latent_size=res // 8)


# -----------------------------------------------------------------------------
# bf16 autocast with CUDA's op lists (aten/src/ATen/autocast_mode.cpp), on any tensor

TO_BF16 = {F.linear, F.conv2d, F.scaled_dot_product_attention, torch.matmul, torch.Tensor.matmul,
           torch.Tensor.__matmul__, torch.bmm, torch.baddbmm, torch.addmm, torch.einsum}
TO_FP32 = {F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
           torch.sum, torch.Tensor.sum, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow,
           torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt}


class BF16Autocast(TorchFunctionMode):
    """torch.autocast(dtype=bfloat16) as CUDA runs it, for the ops of TO_BF16 and TO_FP32. A parameter is cast
    once per forward and the copy kept, as autocast's weight cache does: `copies` holds them."""

    def __init__(self):
        super().__init__()
        self.copies = {}  # id(parameter) -> its bf16 copy
        self.keys = set()  # the copies' storages

    def cast(self, t, dtype):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        if isinstance(t, nn.Parameter) and dtype == torch.bfloat16:
            if id(t) not in self.copies:
                self.copies[id(t)] = t.to(dtype)
                self.keys.add(storage_key(self.copies[id(t)]))
            return self.copies[id(t)]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        dtype = None  # an op of neither list runs in the dtype of its inputs
        if func in TO_BF16:
            dtype = torch.bfloat16
        elif func in TO_FP32:
            dtype = torch.float32
        if dtype is not None:  # (inside this method the mode is off: the casts themselves are not re-cast)
            args, kwargs = tree_map(lambda t: self.cast(t, dtype), (args, kwargs or {}))
        return func(*args, **(kwargs or {}))


# -----------------------------------------------------------------------------
# what autograd saves for backward


def storage_key(t):
    """A storage's identity. On the meta device every data_ptr() is 0, but each storage still has its own
    c10::StorageImpl; UntypedStorage._cdata is its address (views share it). Unique while the storage lives,
    so every counted tensor is kept alive until the count is done."""
    return t.untyped_storage()._cdata


class SavedTensors:
    """A pack hook that adds up the bytes of the storages autograd saves, each once, skipping the given ones
    (parameters, buffers, the batch, autocast's weight copies); and per block, the bytes a block created and
    saved (what backward recomputes when that block is checkpointed), its inputs not included."""

    def __init__(self, skip, copies=frozenset()):
        self.seen = set(skip)  # the storages counted, or not to count
        self.copies = copies  # autocast's weight copies: a set that grows as they are made
        self.kept = []  # every counted tensor, kept alive so that no storage key is reused
        self.total = 0  # bytes saved
        self.per_block = {}  # {block name: bytes it created and saved}
        self.block = None  # the block running
        self.inputs = set()  # the storages of its inputs

    def pack(self, t):
        key = storage_key(t)
        if key in self.seen or key in self.copies:
            return t
        self.seen.add(key)
        self.kept.append(t)
        n = t.untyped_storage().nbytes()
        self.total += n
        if self.block is not None and key not in self.inputs:
            self.per_block[self.block] += n
        return t

    def enter(self, name, args):
        """Forward pre-hook: saves from here on are this block's, except those of its input tensors."""
        self.block = name
        self.inputs = {storage_key(a) for a in args if isinstance(a, torch.Tensor)}
        self.per_block.setdefault(name, 0)

    def leave(self):
        self.block = None
        self.inputs = set()


@contextlib.contextmanager
def block_hooks(blocks, saved):
    """Tell `saved` which block is running."""
    handles = []
    for name, m in blocks:
        handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: saved.enter(name, args)))
        handles.append(m.register_forward_hook(lambda *_: saved.leave()))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def checkpointed(blocks):
    """Each block's forward through torch.utils.checkpoint (non-reentrant): only the block's inputs are saved,
    and backward reruns the block. (An instance attribute `forward` shadows the class's method.)"""
    for _, m in blocks:
        m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    try:
        yield
    finally:
        for _, m in blocks:
            del m.forward


def training_forward(net, cfg, batch, mask_ratio, caption_len):
    """(the batch's tensors, which exist before the step: latents (B, C, H, W), captions (B, L, Dy), sigma and
    noise drawn as train.py draws them; a function that computes the step's EDM loss on them)."""
    x = torch.randn(batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    y = torch.randn(batch, caption_len, cfg.caption_dim)
    sigma, noise, keep = training_noise(batch, x.shape[1:], P_MEAN, P_STD, CAPTION_DROPOUT)
    y = drop_captions(y, keep)

    def loss():
        return edm_loss(Denoiser(net), x, y, sigma, noise, mask_ratio)

    return [x, y, sigma, noise], loss


def saved_bytes(net, cfg, batch, mask_ratio, bf16, ckpt, caption_len=CAPTION_LEN):
    """(activation bytes, bytes of each block, bytes of autocast's weight copies) of one training forward."""
    blocks = parallel.blocks(net)
    batch_tensors, loss_fn = training_forward(net, cfg, batch, mask_ratio, caption_len)
    skip = {storage_key(t) for t in [*net.parameters(), *net.buffers(), *batch_tensors]}
    autocast = contextlib.nullcontext()
    copies = frozenset()
    if bf16:
        autocast = BF16Autocast()
        copies = autocast.keys
    saved = SavedTensors(skip, copies)
    ckpt_blocks = checkpointed(blocks) if ckpt else contextlib.nullcontext()
    pack_hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t)  # unpack: as it was
    with autocast, block_hooks(blocks, saved), ckpt_blocks, pack_hooks:
        loss_fn()  # (no backward: what it would need is what was packed)
    weight_bytes = 0
    if bf16:
        weight_bytes = sum(c.untyped_storage().nbytes() for c in autocast.copies.values())
    return saved.total, saved.per_block, weight_bytes


def measure(cfg, batch, mask_ratio=0.0, bf16=True, caption_len=CAPTION_LEN):
    """Everything the plan needs from one network, measured on fake (meta) tensors: activation bytes without
    and with checkpointing, the largest block's own saved bytes, autocast's weight copies, parameters."""
    with torch.device("meta"):
        net = build_model(cfg)
    with FakeTensorMode(allow_non_fake_inputs=True):  # (the meta tensors are the inputs of to_empty only)
        net = net.to_empty(device="cpu")  # fake CPU tensors: meta storage, the CPU kernels' choices
        full, per_block, copies = saved_bytes(net, cfg, batch, mask_ratio, bf16, False, caption_len)
        ckpt, _, _ = saved_bytes(net, cfg, batch, mask_ratio, bf16, True, caption_len)
    sizes = sorted(num_params(m) for _, m in parallel.blocks(net))
    largest = max(per_block, key=per_block.get)
    return {"activations": full, "ckpt_activations": ckpt, "recompute": per_block[largest],
            "recompute_block": largest, "weight_copies": copies, "params": num_params(net),
            "gathered_params": num_params(net) - sum(sizes) + sum(sizes[-2:]), "blocks": len(sizes)}


# -----------------------------------------------------------------------------
# the plan


def state_bytes(params, gpus=1):
    """Per-GPU bytes of each fp32 state, the model's `params` sharded over `gpus` (1: DDP, whole)."""
    return {k: b * params / gpus for k, b in STATE_BYTES.items()}


def plan(cfg, batch, gpus, mask_ratio=0.0, bf16=True):
    """Per-GPU bytes of every strategy: {strategy: {weights, grads, moments, ema, compute_params, activations,
    total, fits}}, and the measurement it came from. compute_params: DDP keeps autocast's bf16 copy of every
    weight it used (measured); FSDP gathers the root's parameters and the two largest blocks whole."""
    m = measure(cfg, batch, mask_ratio, bf16)
    P = param_count(cfg)
    bytes_per_param = 2 if bf16 else 4  # of a gathered parameter, in the compute dtype
    gathered = bytes_per_param * m["gathered_params"]
    rows = {"DDP": {**state_bytes(P), "compute_params": m["weight_copies"], "activations": m["activations"]},
            "FSDP": {**state_bytes(P, gpus), "compute_params": gathered, "activations": m["activations"]},
            "FSDP + ckpt": {**state_bytes(P, gpus), "compute_params": gathered,
                            "activations": m["ckpt_activations"] + m["recompute"]}}
    for row in rows.values():
        row["total"] = sum(row.values())
        row["fits"] = row["total"] <= GPU_BYTES
    return rows, m


def resolution_error(name, res):
    """The --res message for a resolution the preset cannot take, or None."""
    cfg = PRESETS[name]
    if cfg.latent_channels == 3:
        return None
    if isinstance(cfg, MicroDiTConfig):
        step = 8 * cfg.patch_size  # whole patches of the res/8 latents
    else:
        step = 8 * 2 ** (len(cfg.channel_mult) - 1)  # latents that every downsampling halves exactly
    if res <= 0 or res % step:
        return f"--res {res}: {name} needs a positive multiple of {step} pixels"
    return None


def default_mask_ratio(cfg):
    """0.75 for a MicroDiT (the recipe's main stages), 0 for a UNet (no patches to mask)."""
    return 0.75 if isinstance(cfg, MicroDiTConfig) else 0.0


def dtype_line(bf16):
    """Which dtype the activation figures are for."""
    if not bf16:
        return "activations in fp32 (no autocast)"
    return ("activations in bf16 autocast by CUDA's rules (memory.BF16Autocast: matmul, conv and attention "
            "inputs saved in bf16, norms and softmax in fp32)")


def print_plan(name, batch, gpus, res=256, mask_ratio=None, bf16=True):
    """The three strategies of one preset, one row each."""
    cfg = config_at(name, res)
    if mask_ratio is None:
        mask_ratio = default_mask_ratio(cfg)
    rows, m = plan(cfg, batch, gpus, mask_ratio, bf16)
    size = "its own size" if cfg.latent_channels == 3 else f"{res}px"
    latents = f"{cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size}"
    print(f"{name}: {m['params'] / 1e6:,.1f}M parameters in {m['blocks']} blocks and the root; {batch} "
          f"images per GPU at {size} (latents {latents}), mask ratio {mask_ratio:g}, {gpus} GPUs")
    print(f"Per GPU, GB = 1e9 bytes; {dtype_line(bf16)}, measured on the meta device.")
    print(f"{'strategy':12s} {'weights':>8s} {'grads':>8s} {'AdamW m,v':>10s} {'EMA':>8s} "
          f"{'bf16 params' if bf16 else 'fp32 params':>11s} {'activations':>12s} {'total':>8s}  fits 80 GB")
    for s, r in rows.items():
        print(f"{s:12s} {r['weights'] / GB:8.2f} {r['grads'] / GB:8.2f} {r['moments'] / GB:10.2f} "
              f"{r['ema'] / GB:8.2f} {r['compute_params'] / GB:11.2f} {r['activations'] / GB:12.2f} "
              f"{r['total'] / GB:8.2f}  {'yes' if r['fits'] else 'no'}")
    print(f"{'bf16' if bf16 else 'fp32'} params: under DDP, autocast's bf16 copy of every weight a matmul or "
          "conv used (kept for the step);\nunder FSDP, the root's own parameters and the two largest "
          "blocks', gathered whole.")
    print(f"FSDP + ckpt activations: {m['ckpt_activations'] / GB:.2f} GB of block inputs and of what runs "
          f"outside the blocks,\nplus {m['recompute'] / GB:.2f} GB saved by the largest block "
          f"({m['recompute_block']}) when backward recomputes it.")


def print_table(names=None, batch=256, gpus=8, res=256, bf16=True):
    """Total per-GPU GB of each strategy for many presets, one row each (default: paper_presets, MicroDiT_XL_2
    at mask ratio 0.75 and 0)."""
    if names:
        rows = [(n, None) for n in names]  # (preset, mask ratio; None: its default)
    else:
        rows = [("MicroDiT_XL_2", 0.75), ("MicroDiT_XL_2", 0.0)] + [(n, 0.0) for n in paper_presets()[1:]]
    print(f"Per-GPU memory, GB = 1e9 bytes: {batch} images per GPU at {res}px, {gpus} GPUs; states 20 bytes "
          f"per parameter (DDP) or 20/{gpus} (FSDP);\n{dtype_line(bf16)}, measured on the meta device; "
          "* = fits 80 GB")
    print("states: DDP's 20 bytes per parameter; acts: activations; ckpt acts: those of FSDP + ckpt (the "
          "block inputs and what runs\noutside the blocks, plus what the largest block saves when backward "
          "recomputes it); DDP, FSDP, FSDP+ckpt: per-GPU totals")
    print(f"{'model':17s} {'params':>7s} {'mask':>4s} | {'states':>6s} {'acts':>6s} {'ckpt acts':>9s} | "
          f"{'DDP':>7s} {'FSDP':>7s} {'FSDP+ckpt':>9s} | largest block (its recomputed GB)")
    def total(row):  # GB, starred where it fits 80 GB
        return f"{row['total'] / GB:.1f}{'*' if row['fits'] else ' '}"

    for name, mask_ratio in rows:
        cfg = config_at(name, res)
        if mask_ratio is None:
            mask_ratio = default_mask_ratio(cfg)
        r, m = plan(cfg, batch, gpus, mask_ratio, bf16)
        ckpt = r["FSDP + ckpt"]["activations"]
        print(f"{name:17s} {m['params'] / 1e9:6.2f}B {mask_ratio:4.2f} | {20 * m['params'] / GB:6.1f} "
              f"{m['activations'] / GB:6.1f} {ckpt / GB:9.1f} | {total(r['DDP']):>7s} {total(r['FSDP']):>7s} "
              f"{total(r['FSDP + ckpt']):>9s} | {m['recompute_block']} ({m['recompute'] / GB:.2f})",
              flush=True)


def add_arguments(p):
    """The flags of `python scaling.py memory` (and of `python memory.py`)."""
    p.add_argument("--model", default="MicroDiT_XL_2", choices=list(PRESETS), help="model preset")
    p.add_argument("--batch", type=int, default=256, help="images per GPU")
    p.add_argument("--gpus", type=int, default=8, help="GPUs the states are sharded over (FSDP)")
    p.add_argument("--res", type=int, default=256, help="image resolution in pixels (SDXL VAE latents res/8)")
    p.add_argument("--mask_ratio", type=float, default=None,
                   help="MicroDiT's mask ratio (None: 0.75 for a MicroDiT, 0 for a UNet)")
    p.add_argument("--fp32", action="store_true", help="activations without bf16 autocast")
    p.add_argument("--table", action="store_true", help="instead of --model: MicroDiT_XL_2 (mask ratio 0.75 "
                   "and 0) and the 16 UNets of Paper B's Table 1, at --batch, --gpus, --res")


def run(args, p):
    """Check the flags (one-line errors through p.error) and print the plan or the table."""
    if args.batch < 1 or args.gpus < 1:
        p.error(f"--batch and --gpus must be >= 1, got --batch {args.batch}, --gpus {args.gpus}")
    if args.mask_ratio is not None and not 0 <= args.mask_ratio < 1:
        p.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    if args.mask_ratio and not isinstance(PRESETS[args.model], MicroDiTConfig):
        p.error(f"--mask_ratio {args.mask_ratio}: {args.model} is a UNet, which has no patches to mask")
    names = paper_presets() if args.table else [args.model]
    for name in names:
        err = resolution_error(name, args.res)
        if err:
            p.error(err)
    if args.table:
        print_table(batch=args.batch, gpus=args.gpus, res=args.res, bf16=not args.fp32)
    else:
        print_plan(args.model, args.batch, args.gpus, args.res, args.mask_ratio, bf16=not args.fp32)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(), parser)
