"""
Benchmarks, one function each, one printed line each (two with its profile when a target is missed):

    python bench.py                      # everything, on all cores
    python bench.py masking compile      # some of them
    python bench.py --threads=1 mfu      # on a shared machine one thread gives steadier numbers
    python bench.py gpu [--out=results/bench_gpu.json]   # one GPU: largest batch, images/s, MFU, memory
    python bench.py default [--against=REV]  # `python train.py` here vs at REV, back to back

"Everything" is the CPU-sized benchmarks; `default` and `gpu` run only when named (`gpu` on a machine without
CUDA runs tiny stand-ins, which keep its path working). Every ratio is measured side by side in one run: the
timed calls of the things compared are interleaved (A B A B ...) and the best of each is kept, so a load
change on a shared machine hits both alike; `default` runs its two trainings one after the other.
"""
import copy
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from types import SimpleNamespace

import torch
from tqdm import tqdm

import data
from checkpoint import atomic_write, save_pretrained
from diffusion import Denoiser, drop_captions, edm_loss, training_noise
from encoders import PIXELS, load_encoders
from fid import InceptionV3
from memory import config_at, measure
from model import MicroDiTConfig, build_model, flops_per_image, get_config, param_count
from parallel import checkpoint_blocks, measure_peak_flops
from sample import edm_sampler, sample_to_folder
from shapes import heldout_captions

# A CPU-sized MicroDiT whose backbone dominates, as MicroDiT_XL_2 does: patch 2 on 32x32 latents (256 tokens,
# as at 256px), a thin one-block mixer, 8 backbone blocks with the released layer-wise scaling and MoE.
BENCH = MicroDiTConfig(latent_size=32, latent_channels=4, patch_size=2, dim=256, depth=8, head_dim=64,
                       caption_dim=64, mixer_depth=1, mixer_dim=64, num_experts=4, multiple_of=64)
BATCH = 16  # images per step
CAPTION_LEN = 16  # caption tokens


def timed(fn, warmup=1, iters=3):
    """Best wall time of fn() over `iters` calls after `warmup` calls, in seconds
    (best: least disturbed run)."""
    return compare([fn], warmup, iters)[0]


def compare(fns, warmup=1, iters=3):
    """Best wall time of each fn, their calls interleaved."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [math.inf] * len(fns)
    for _ in range(iters):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def profile(fn, title, rows=12):
    """The ops that take fn's time, by self CPU time: printed under a missed target to explain it."""
    from torch.profiler import ProfilerActivity, profile as torch_profile  # loaded only for a missed target
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return (f"  profile of {title}:\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def verdict(value, target):
    return f"target >= {target:g}: {'met' if value >= target else 'MISSED'}"


def bench_model(seed=0):
    """The bench network, and a fixed random batch of latents (B, 4, 32, 32) and captions (B, L, 64)."""
    torch.manual_seed(seed)
    net = build_model(BENCH)
    x = torch.randn(BATCH, 4, 32, 32)
    y = torch.randn(BATCH, CAPTION_LEN, BENCH.caption_dim)
    return net, x, y


def train_step(net, x, y, mask_ratio, bf16=False, opt=None):
    """One training step as train.py takes it: sigma, noise and caption dropout drawn for the batch, EDM loss
    (bf16 autocast or not), backward, fused AdamW (`opt`, or a new one)."""
    opt = opt or torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
    D = Denoiser(net)

    def step():
        sigma, noise, keep = training_noise(len(x), x.shape[1:], -0.6, 1.2, 0.1, x.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = edm_loss(D, x, drop_captions(y, keep), sigma, noise, mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def gflops(mask_ratio):
    return flops_per_image(BENCH, mask_ratio, caption_len=CAPTION_LEN) / 1e9


# measured once, on first use, and shared by the benchmarks below
_steps = {}  # {name: (seconds, step fn)}, see steps()
_peaks = {}  # {dtype: matmul FLOP/s}, see peaks()
_compile_s = []  # [seconds the compiled step took to compile]


def steps():
    """Step times of every configuration compared below, measured once and side by side:
    {name: (seconds, step fn)}.
    Names: 'mask 0', 'mask 0.5', 'mask 0.75' (eager fp32), 'compiled' and 'bf16' (mask 0.75)."""
    if not _steps:
        net, x, y = bench_model()
        fns = {f"mask {m:g}": train_step(net, x, y, m) for m in (0.0, 0.5, 0.75)}
        fns["bf16"] = train_step(net, x, y, 0.75, bf16=True)
        fns["compiled"] = train_step(torch.compile(net), x, y, 0.75)
        t0 = time.perf_counter()
        for _ in range(2):  # the first calls compile the forward and the backward
            fns["compiled"]()
        _compile_s.append(time.perf_counter() - t0)
        times = compare(list(fns.values()), iters=5)
        for name, t in zip(fns, times):
            _steps[name] = (t, fns[name])
    return _steps


def peaks():
    """Measured matmul FLOP/s of this machine in fp32 and bf16
    (parallel.measure_peak_flops: MFU's denominator)."""
    if not _peaks:
        for dt in (torch.float32, torch.bfloat16):
            _peaks[dt] = measure_peak_flops(torch.device("cpu"), dt)
    return _peaks


# --- the benchmarks --------------------------------------------------------------------------------

def bench_masking():
    """Step time at mask ratio 0, 0.5, 0.75: deferred masking gives the backbone 4x fewer tokens
    at 0.75 (the MicroDiT paper's deferred masking)."""
    t = [steps()[f"mask {m:g}"][0] for m in (0.0, 0.5, 0.75)]
    speedup = t[0] / t[2]
    line = (f"masking: step {' / '.join(f'{1000 * s:.0f}' for s in t)} ms at mask ratio 0 / 0.5 / 0.75 "
            f"(batch {BATCH}, {param_count(BENCH) / 1e6:.1f}M params): 0.75 vs 0 {speedup:.2f}x "
            f"[{verdict(speedup, 2.5)}] (FLOPs ratio {gflops(0) / gflops(0.75):.2f}x), "
            f"0.5 vs 0 {t[0] / t[1]:.2f}x")
    if speedup < 2.5:
        line += "\n" + profile(steps()["mask 0.75"][1], "a step at mask ratio 0.75")
    return line


def bench_compile():
    """Eager vs torch.compile (inductor; forward and backward compiled, AdamW eager) at mask ratio 0.75."""
    eager, eager_fn = steps()["mask 0.75"]
    comp, comp_fn = steps()["compiled"]
    speedup = eager / comp
    line = (f"compile: step {1000 * eager:.0f} ms eager vs {1000 * comp:.0f} ms compiled at mask ratio 0.75: "
            f"{speedup:.2f}x [{verdict(speedup, 1.2)}] (compiling took {_compile_s[0]:.0f} s)")
    if speedup < 1.2:
        line += "\n" + profile(eager_fn, "an eager step") + "\n" + profile(comp_fn, "a compiled step")
    return line


def bench_bf16():
    """fp32 vs bf16 autocast at mask ratio 0.75, beside the matmul peak of each dtype on this machine."""
    fp32 = steps()["mask 0.75"][0]
    bf16 = steps()["bf16"][0]
    p32 = peaks()[torch.float32]
    p16 = peaks()[torch.bfloat16]
    return (f"bf16: step {1000 * fp32:.0f} ms fp32 vs {1000 * bf16:.0f} ms bf16 autocast at mask ratio 0.75: "
            f"{fp32 / bf16:.2f}x; matmul peak {p32 / 1e9:.0f} GFLOP/s fp32 vs {p16 / 1e9:.0f} bf16 "
            f"({p32 / p16:.1f}x; CPU has avx512_bf16 or amx_bf16: {cpu_has('avx512_bf16', 'amx_bf16')})")


def bench_mfu():
    """Achieved FLOP/s (model.flops_per_image x images/s) over the measured matmul peak of the same dtype."""
    p32 = peaks()[torch.float32]
    p16 = peaks()[torch.bfloat16]

    def mfu(name, mask_ratio, peak):  # percent of the peak that step `name` achieves
        return 100 * gflops(mask_ratio) * 1e9 * BATCH / steps()[name][0] / peak

    target = mfu("compiled", 0.75, p32)
    line = (f"mfu: compiled fp32 at mask 0.75 {target:.0f}% of the {p32 / 1e9:.0f} GFLOP/s fp32 matmul peak "
            f"[{verdict(target, 40)}]; eager fp32 at mask 0 / 0.5 / 0.75: {mfu('mask 0', 0.0, p32):.0f}% / "
            f"{mfu('mask 0.5', 0.5, p32):.0f}% / {mfu('mask 0.75', 0.75, p32):.0f}%; bf16 at 0.75: "
            f"{mfu('bf16', 0.75, p16):.0f}% of the {p16 / 1e9:.0f} GFLOP/s bf16 peak ({gflops(0):.2f} / "
            f"{gflops(0.75):.2f} training GFLOPs per image at mask 0 / 0.75)")
    if target < 40:
        line += "\n" + profile(steps()["compiled"][1], "a compiled step at mask 0.75")
    return line


def bench_data():
    """Data-loader throughput (ShardStream + DataLoader, records of the bench shape)
    vs a training step's need."""
    with tempfile.TemporaryDirectory() as root:
        with data.ShardWriter(root, shard_size=512, meta={"what": "bench"}) as writer:
            for i in range(4096):
                writer.add(torch.randn(4, 32, 32), torch.randn(CAPTION_LEN, BENCH.caption_dim),
                           f"caption {i}")
        loader = torch.utils.data.DataLoader(data.ShardStream(root, shuffle_buffer=1024), batch_size=BATCH)
        it = iter(loader)

        def read(n=2048):
            for _ in range(n // BATCH):
                next(it)
        dt = timed(read, warmup=1, iters=2) / 2048
    step = min(t for name, (t, _) in steps().items() if name != "bf16")  # the most demanding step
    need = BATCH / step
    return (f"data: loader {1 / dt:.0f} images/s (num_workers=0, 4x32x32 + "
            f"{CAPTION_LEN}x{BENCH.caption_dim} fp16 records) vs {need:.0f} images/s consumed by the "
            f"fastest measured step: {1 / dt / need:.0f}x headroom")


def bench_sampler():
    """Images/s of the EDM Heun sampler (30 steps, guidance 5: 59 network evaluations on 2x the batch)."""
    net, _, _ = bench_model()
    D = Denoiser(net.eval())
    n = 2
    y = torch.randn(n, CAPTION_LEN, BENCH.caption_dim)
    edm_sampler(D, y, range(n), steps=2)  # warm-up
    dt = timed(lambda: edm_sampler(D, y, range(n), steps=30, guidance=5.0), warmup=0, iters=1)
    return f"sampler: {n / dt:.3f} images/s ({dt / n:.1f} s/image), bench MicroDiT, 30 Heun steps, guidance 5"


def bench_fid():
    """Images/s of FID feature extraction: the InceptionV3 forward on 299x299 images, on CPU."""
    torch.manual_seed(0)
    # random weights: same speed as the released ones, which cannot be downloaded here
    net = InceptionV3().eval()
    batch = 8
    x = torch.rand(batch, 3, 299, 299)
    with torch.inference_mode():
        dt = timed(lambda: net(x))
    return (f"fid: {batch / dt:.2f} images/s ({1000 * dt / batch:.0f} ms/image), InceptionV3 pool3 features, "
            f"cpu, batch {batch}, 299x299 float32, {torch.get_num_threads()} threads")


# sample.py's streaming path on a CPU-sized preset: the built-in text encoder of the shapes data, pixels
SAMPLING = {"text_encoder": {"type": "builtin", "dim": 64, "max_len": 24, "context": 0.7}, "latents": PIXELS}


def peak_rss_mb(argv, threads):
    """Peak resident memory (MB) of a fresh `python argv...`, read from the kernel's rusage of that one child
    (ru_maxrss, KB on Linux): the process is measured whole, torch's own allocations included."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a full pipe would block the child
        p = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL, stderr=err,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage; Popen.wait would not give it
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            err.seek(0)
            raise RuntimeError(f"python {' '.join(argv)[:200]} failed: {err.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024


def bench_sampling(n_mem=32):
    """Images/s of sample.py's streaming path (each batch's PNGs written as soon as it is done) at batch 1, 8
    and 32: MicroDiT_S, random weights, 18 Heun steps, guidance 4; and the peak memory of a fresh sample.py
    (1 step, batch 32) for n_mem vs 10 n_mem prompts (target: < 1.2x, as the images are not kept). The
    prompts are the built-in dataset's held-out captions (its text encoder caches a vector per word)."""
    torch.manual_seed(0)
    D = Denoiser(build_model("MicroDiT_S").eval())
    encoders = load_encoders(SAMPLING)
    prompts = heldout_captions(10 * n_mem)
    with tempfile.TemporaryDirectory() as root:
        def writer(b, n, steps=18):  # a call that writes n images, each PNG atomically as in a real run
            out = f"{root}/b{b}"
            os.makedirs(out, exist_ok=True)
            args = SimpleNamespace(batch_size=b, seed=0, steps=steps, guidance=4.0, bf16=False, out=out)

            def write():
                sample_to_folder(D, SAMPLING, encoders, prompts, list(range(n)), args, (0, 1), {},
                                 tqdm(disable=True))
            return write

        writer(1, 1, steps=2)()  # warm-up
        sizes = {1: 2, 8: 8, 32: 32}  # batch size: images per timed call
        times = compare([writer(b, n) for b, n in sizes.items()], warmup=0, iters=2)
        speed = {b: n / t for (b, n), t in zip(sizes.items(), times)}
        os.makedirs(f"{root}/ckpt")
        save_pretrained(f"{root}/ckpt", D.net, extra=SAMPLING)
        rss = {}
        for n in (n_mem, 10 * n_mem):
            with open(f"{root}/p{n}.txt", "w") as f:
                f.write("".join(p + "\n" for p in prompts[:n]))
            argv = ["sample.py", "--ckpt", f"{root}/ckpt", "--prompts-file", f"{root}/p{n}.txt", "--out",
                    f"{root}/out{n}", "--steps", "1", "--batch-size", "32"]
            rss[n] = peak_rss_mb(argv, torch.get_num_threads())
    ratio = rss[10 * n_mem] / rss[n_mem]
    return (f"sampling: {' / '.join(f'{speed[b]:.2f}' for b in speed)} images/s at batch 1 / 8 / 32 "
            f"(MicroDiT_S, 18 Heun steps, guidance 4, PNGs written per batch, {torch.get_num_threads()} "
            f"threads); peak RSS of a fresh sample.py {rss[n_mem]:.0f} MB for {n_mem} prompts vs "
            f"{rss[10 * n_mem]:.0f} MB for {10 * n_mem}: {ratio:.3f}x [target < 1.2: "
            f"{'met' if ratio < 1.2 else 'MISSED'}]")


ACT_CKPT_STEP = """
import sys, torch, bench, parallel
net, x, y = bench.bench_model()
x, y = x.repeat(4, 1, 1, 1), y.repeat(4, 1, 1)  # batch 64: activations well above the weights
if sys.argv[1] == "ckpt":
    parallel.checkpoint_blocks(net)
bench.train_step(net, x, y, 0.75)()
"""


def bench_act_ckpt():
    """Activation checkpointing of each block (train.py --act_ckpt=true) against none, on the bench model at
    mask 0.75: the step time side by side, and the peak memory of a fresh process taking one step (batch
    64)."""
    net, x, y = bench_model()
    ckpt = copy.deepcopy(net)
    checkpoint_blocks(ckpt)
    plain_s, ckpt_s = compare([train_step(net, x, y, 0.75), train_step(ckpt, x, y, 0.75)], iters=3)
    rss = {}  # peak memory (MB) of a fresh process taking one step
    for mode in ("plain", "ckpt"):
        rss[mode] = peak_rss_mb(["-c", ACT_CKPT_STEP, mode], torch.get_num_threads())
    return (f"act_ckpt: step {1000 * plain_s:.0f} ms without vs {1000 * ckpt_s:.0f} ms with activation "
            f"checkpointing ({ckpt_s / plain_s:.2f}x the time; batch {BATCH}, mask 0.75); peak RSS of one "
            f"step at batch 64: {rss['plain']:.0f} MB vs {rss['ckpt']:.0f} MB "
            f"({1 - rss['ckpt'] / rss['plain']:.0%} less)")


# --- one GPU: python bench.py gpu ---------------------------------------------------------------------------

# bf16 dense tensor-core FLOP/s by a word of the device's name, the first match wins (NVIDIA's datasheets;
# their "with sparsity" figures are twice these). H100 PCIe and NVL parts peak lower: measured instead (None).
GPU_PEAKS = [("A100", "A100", 312e12), ("H100 PCIe", None, None), ("NVL", None, None),
             ("H100", "H100 SXM", 989.4e12), ("H200", "H200", 989.4e12)]
GPU_CASES = [  # (row, preset, resolution in pixels, mask ratio): the MicroDiT recipe's stages, Paper B's SDXL
    ("MicroDiT_XL_2 256px mask 0.75", "MicroDiT_XL_2", 256, 0.75),
    ("MicroDiT_XL_2 256px mask 0", "MicroDiT_XL_2", 256, 0.0),
    ("MicroDiT_XL_2 512px mask 0.75", "MicroDiT_XL_2", 512, 0.75),
    ("UNet_SDXL_C320 256px", "UNet_SDXL_C320", 256, 0.0),
]
CPU_STAND_INS = {"MicroDiT_XL_2": "MicroDiT_test", "UNet_SDXL_C320": "UNet_test"}  # tiny, fp32, on a CPU
# the batch search: (first batch tried, largest batch tried)
GPU_SEARCH = (8, 4096)
CPU_SEARCH = (2, 4)
GPU_CAPTION_LEN = 77  # OpenCLIP-H tokens


def gpu_peak(device):
    """(bf16 peak FLOP/s, where it comes from): the datasheet figure of a known GPU, else a measured matmul;
    on a CPU the measured fp32 matmul (the stand-ins run in fp32)."""
    if device.type != "cuda":
        peak = measure_peak_flops(device, torch.float32)
        return peak, f"measured fp32 matmul peak of this CPU, {peak / 1e9:.0f} GFLOP/s"
    name = torch.cuda.get_device_name(device)
    label, peak = None, None  # a GPU not in the table, or one whose peak is measured
    for key, key_label, key_peak in GPU_PEAKS:
        if key in name:  # the first match
            label, peak = key_label, key_peak
            break
    if peak:
        return peak, f"{label} bf16 dense datasheet peak, {peak / 1e12:.1f} TFLOP/s"
    peak = measure_peak_flops(device, torch.bfloat16, n=8192)  # a matmul large enough to fill the GPU
    return peak, f"measured bf16 matmul peak of this {name} (not in GPU_PEAKS), {peak / 1e12:.1f} TFLOP/s"


def case_config(preset, res, cuda):
    """The config of a case: on a GPU the preset at `res` (SDXL VAE latents res/8); on a CPU its tiny
    stand-in, its latents scaled alike (512px: twice the size, MicroDiT keeping 256px's position range)."""
    if cuda:
        return config_at(preset, res)
    cfg = get_config(CPU_STAND_INS[preset])
    scale = res // 256
    if isinstance(cfg, MicroDiTConfig):
        return replace(cfg, latent_size=cfg.latent_size * scale, pos_interp_scale=float(scale))
    return replace(cfg, latent_size=cfg.latent_size * scale)


def step_at(net, opt, cfg, mask_ratio, device, bf16):
    """step(batch): one training step (bench's train_step) on a fresh random batch of `batch` images."""
    def step(batch):
        opt.zero_grad(set_to_none=True)  # a step that ran out of memory in backward may have left gradients
        x = torch.randn(batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size, device=device)
        y = torch.randn(batch, GPU_CAPTION_LEN, cfg.caption_dim, device=device)
        train_step(net, x, y, mask_ratio, bf16, opt)()
    return step


def runs(step, batch):
    """True if a step at `batch` images runs, False if the GPU runs out of memory (its cache then emptied)."""
    try:
        step(batch)
        return True
    except torch.cuda.OutOfMemoryError:
        pass  # out of the except block first: its traceback holds the failed step's tensors
    gc.collect()
    torch.cuda.empty_cache()
    return False


def largest_batch(step, start, limit):
    """The largest batch that runs: double from `start` until out of memory (or `limit`), then bisect down to
    1/16 of the batch (each probe is a training step); 0 if even `start` does not run."""
    lo = 0  # the largest batch known to run
    hi = None  # the smallest batch known not to run
    b = start
    while hi is None and lo < limit:
        if runs(step, b):
            lo = b
            b = min(2 * b, limit)
        else:
            hi = b
    while hi is not None and hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if runs(step, mid):
            lo = mid
        else:
            hi = mid
    return lo


def measure_case(step, batch, device, iters):
    """(seconds per step, peak bytes allocated or None on a CPU) at `batch` images, best of `iters` steps."""
    cuda = device.type == "cuda"

    def synced_step():  # CUDA runs the step asynchronously: wait for it, so the clock times it
        step(batch)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dt = timed(synced_step, warmup=1, iters=iters)
    if not cuda:
        return dt, None
    return dt, torch.cuda.max_memory_allocated(device)


def planned_bytes(cfg, batch, mask_ratio, bf16):
    """memory.py's bytes for this step: fp32 weights, gradients and AdamW moments (no EMA here), autocast's
    bf16 weight copies and the activations saved for backward (measured on the meta device, eager)."""
    m = measure(cfg, batch, mask_ratio, bf16)
    return 16 * m["params"] + m["weight_copies"] + m["activations"]


def gpu_row(case, cfg, compiled, batch, dt, peak_bytes, peak, planned, compile_s):
    """One row of bench_gpu.json."""
    name, preset, res, mask_ratio = case
    flops = flops_per_image(cfg, mask_ratio, caption_len=GPU_CAPTION_LEN)
    return {"case": name, "model": preset if cfg.latent_channels == 4 else CPU_STAND_INS[preset],
            "res": res, "latent_size": cfg.latent_size, "mask_ratio": mask_ratio, "compiled": compiled,
            "batch": batch, "step_s": dt, "images_per_s": batch / dt, "train_flops_per_image": flops,
            "mfu": flops * batch / dt / peak, "planned_gb": planned / 1e9, "compile_s": compile_s,
            "peak_memory_gb": None if peak_bytes is None else peak_bytes / 1e9}


def bench_case(case, device, peak):
    """Eager and compiled rows of a case: the largest batch found by search, its images/s, MFU and memory."""
    _, preset, res, mask_ratio = case
    cuda = device.type == "cuda"
    torch._dynamo.reset()  # each case compiles from scratch (its compile time is its own) and the previous
    gc.collect()           # case's network, optimizer and compiled graphs leave the GPU
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    cfg = case_config(preset, res, cuda)
    net = build_model(cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
    step = step_at(net, opt, cfg, mask_ratio, device, bf16=cuda)
    search = GPU_SEARCH if cuda else CPU_SEARCH
    batch = largest_batch(step, *search)
    if batch == 0:
        raise RuntimeError(f"bench.py gpu: {case[0]}: not even {search[0]} images fit on this device")
    planned = planned_bytes(cfg, batch, mask_ratio, cuda)
    iters = 3 if cuda else 1
    dt, peak_bytes = measure_case(step, batch, device, iters)
    rows = [gpu_row(case, cfg, False, batch, dt, peak_bytes, peak, planned, None)]
    # Compiled: inductor on a GPU; aot_eager on a CPU, where building inductor's C++ kernels would make the
    # stand-ins' test take minutes. Each new batch size recompiles, so the compiled step runs at the eager
    # search's batch (inductor's graphs usually save less for backward than eager), searching down from
    # there only if that runs out of memory.
    compiled = torch.compile(net, backend="inductor" if cuda else "aot_eager")
    step_c = step_at(compiled, opt, cfg, mask_ratio, device, bf16=cuda)
    t0 = time.perf_counter()
    batch_c = batch
    if not runs(step_c, batch):
        batch_c = largest_batch(step_c, search[0], batch)
    compile_s = time.perf_counter() - t0  # the first step (or the search): dominated by compiling
    if batch_c != batch:
        planned = planned_bytes(cfg, batch_c, mask_ratio, cuda)
    dt, peak_bytes = measure_case(step_c, batch_c, device, iters)
    rows.append(gpu_row(case, cfg, True, batch_c, dt, peak_bytes, peak, planned, compile_s))
    return rows


def bench_gpu(out="results/bench_gpu.json"):
    """python bench.py gpu: a training step of MicroDiT_XL_2 (256px at mask 0.75 and 0, 512px) and of
    UNet_SDXL_C320 on one GPU in bf16 autocast, eager and compiled, at the largest batch that fits; on a
    CPU the same path with tiny fp32 stand-ins. Prints a row per run and writes them to `out` (JSON)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    peak, source = gpu_peak(device)
    if cuda:
        what = torch.cuda.get_device_name(device)
    else:
        stand_ins = ", ".join(sorted(set(CPU_STAND_INS.values())))
        what = (f"CPU STAND-INS ({stand_ins} in fp32, batch search up to {CPU_SEARCH[1]}): no CUDA device "
                f"here, so these rows only keep the path working")
    print(f"gpu: {what}; MFU against the {source}", flush=True)
    print(f"  {'case':31s} {'compiled':>8s} {'batch':>6s} {'images/s':>9s} {'MFU':>6s} {'peak GB':>8s} "
          f"{'planned GB':>10s} {'compile s':>9s}", flush=True)
    def fmt(v, spec):  # a number, or n/a where there is none (no peak memory on a CPU, no compile time)
        return "n/a" if v is None else format(v, spec)

    rows = []
    t0 = time.perf_counter()
    for case in GPU_CASES:
        for r in bench_case(case, device, peak):
            rows.append(r)
            print(f"  {r['case']:31s} {'yes' if r['compiled'] else 'no':>8s} {r['batch']:6d} "
                  f"{r['images_per_s']:9.1f} {r['mfu']:6.1%} {fmt(r['peak_memory_gb'], '8.3g'):>8s} "
                  f"{r['planned_gb']:10.3g} {fmt(r['compile_s'], '9.0f'):>9s}", flush=True)
    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "cpu_stand_in": not cuda,
              "dtype": "bf16 autocast" if cuda else "fp32", "peak_flops": peak, "peak_source": source,
              "torch": torch.__version__, "seconds": time.perf_counter() - t0, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_write(out) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    return f"gpu: {len(rows)} rows in {result['seconds']:.0f} s written to {out}"


# What `bench.py default` compares against: the commit before the tuning (results/tuning.jsonl) changed the
# default (MicroDiT_S with its patch-mixer, 2,000 steps of 64 images).
PREVIOUS_DEFAULT = "b536c3652bc1433169476df85db374e9015be517"


def timed_default_run(folder):
    """`python train.py` in a fresh copy of the code (no data_cache: the built-in dataset is generated, as on
    a user's first run); returns its wall clock (s), what `time` would print for it, and its final record from
    out/default/log.jsonl."""
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(folder, "stdout.txt"), "w") as out:
        code = subprocess.run([sys.executable, "train.py"], cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}).returncode
    wall = time.perf_counter() - t0
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)

    def clock(s):  # as bash's `time` prints it
        return f"{int(s // 60)}m{s % 60:.3f}s"

    timing = (f"real {clock(wall)} user {clock(cpu.ru_utime - cpu0.ru_utime)} "
              f"sys {clock(cpu.ru_stime - cpu0.ru_stime)}")
    if code:  # the folder is temporary: say here what it printed last
        with open(os.path.join(folder, "stdout.txt")) as f:
            printed = f.read().strip().splitlines()
        last = printed[-1] if printed else "(nothing)"
        raise RuntimeError(f"python train.py failed in a copy of the code (exit {code}): {last}")
    with open(os.path.join(folder, "out/default/log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    final = [r for r in records if r.get("final")][-1]
    return wall, timing, final


def default_line(name, wall, timing, r):
    """The printed line of one default run: its times, validation loss and accuracies."""
    split = f"data {r['data_s']:.0f}s, " if "data_s" in r else ""  # (older logs: no split)
    return (f"{name}: {timing}; wall {wall:.0f}s ({split}train {r['train_s']:.0f}s), val loss "
            f"{r['val_loss']:.4f}, shape {r['acc_shape']:.3f}, colour {r['acc_colour']:.3f}, position "
            f"{r['acc_position']:.3f}, mean {r['acc_mean']:.3f}")


def bench_default(against=PREVIOUS_DEFAULT):
    """The default run of this checkout's files against that of commit `against`, one after the other on
    this machine (keep it otherwise idle); the target: at most half the wall clock, mean accuracy >= 0.95."""
    with tempfile.TemporaryDirectory(prefix="bench_default_") as root:
        old = os.path.join(root, "old")
        new = os.path.join(root, "new")
        for folder in (old, new):
            os.makedirs(folder)
        archive = subprocess.run(["git", "archive", against], capture_output=True)  # the commit's files
        if archive.returncode:
            raise RuntimeError(f"git archive {against}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        files = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout  # this one
        tar = subprocess.run(["tar", "-c", "--null", "-T", "-"], input=files, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", new], input=tar.stdout, check=True)
        results = {}
        for name, folder in ((f"default at {against}", old), ("default here", new)):
            results[name] = timed_default_run(folder)
            print(default_line(name, *results[name]), flush=True)
    w_old = results[f"default at {against}"][0]
    w_new, _, r = results["default here"]
    each_ok = min(r[f"acc_{k}"] for k in ("shape", "colour", "position")) >= 0.9
    ok = w_new <= 0.5 * w_old and r["acc_mean"] >= 0.95 and each_ok
    return (f"default: {w_new / w_old:.3f}x the wall clock of {against} (target <= 0.5), mean accuracy "
            f"{r['acc_mean']:.3f} (target >= 0.95, each of shape, colour, position >= 0.9): "
            f"{'met' if ok else 'MISSED'}")


def cpu_has(*flags):
    try:
        words = open("/proc/cpuinfo").read().split()
    except OSError:
        return "unknown"
    return "yes" if any(f in words for f in flags) else "no"


BENCHMARKS = {"masking": bench_masking, "compile": bench_compile, "bf16": bench_bf16, "mfu": bench_mfu,
              "data": bench_data, "sampler": bench_sampler, "fid": bench_fid, "sampling": bench_sampling,
              "act_ckpt": bench_act_ckpt, "gpu": bench_gpu, "default": bench_default}
CPU_BENCHMARKS = [name for name in BENCHMARKS if name not in ("gpu", "default")]  # a bare `python bench.py`


def usage_error(message):
    """Exit 2, the code of a command that must change, with one line (a benchmark that fails exits 1)."""
    print(f"bench.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv):
    if "--out" in argv[:-1]:  # `--out PATH` as well as `--out=PATH`
        i = argv.index("--out")
        argv = argv[:i] + [f"--out={argv[i + 1]}"] + argv[i + 2:]
    threads = [a for a in argv if a.startswith("--threads=")]
    outs = [a.split("=", 1)[1] for a in argv if a.startswith("--out=")]
    against = [a.split("=", 1)[1] for a in argv if a.startswith("--against=")]
    names = [a for a in argv if a not in threads and not a.startswith(("--out=", "--against="))]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        usage_error(f"unknown benchmark(s) or flag(s) {unknown}; known: {list(BENCHMARKS)}, "
                    "--threads=N, --out=PATH (gpu's JSON)")
    if outs and names != ["gpu"]:
        usage_error("--out names the gpu benchmark's JSON: `python bench.py gpu --out=PATH`")
    if against and names != ["default"]:
        usage_error("--against names the commit `python bench.py default` compares with")
    args = (against or outs)[-1:]  # the one argument a benchmark takes: gpu's --out, default's --against
    if threads:
        torch.set_num_threads(int(threads[-1].split("=")[1]))
    print(f"bench.py: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores",
          flush=True)
    for name in names or CPU_BENCHMARKS:
        try:
            print(BENCHMARKS[name](*args), flush=True)
        except RuntimeError as e:  # a failed subprocess (bench.py default, sampling): one line
            sys.exit(f"bench.py {name}: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
