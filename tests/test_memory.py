"""The memory planner against a real forward's memory and against closed forms; `python bench.py gpu` end to
end on its CPU stand-ins."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bench
import memory
import parallel
import scaling
from conftest import ENV, ROOT, run
from model import build_model, num_params, param_count

# A real training forward in a fresh process, its graph kept, measured by the kernel's count of the process's
# resident pages (/proc/self/statm) before and after: the bytes the forward left held, which are the tensors
# saved for backward. glibc is told (MALLOC_MMAP_THRESHOLD_) to mmap every allocation of 64 KiB or more, so a
# freed temporary goes back to the kernel at once instead of lingering in the count. The peak is the kernel's
# high-water mark (VmHWM), reset just before the forward.
MEASURE = r"""
import contextlib, json, os, sys
import torch
from diffusion import Denoiser, drop_captions, edm_loss, training_noise
from memory import BF16Autocast, checkpointed, config_at
from parallel import blocks
from model import build_model

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def high_water_mark():  # the peak resident bytes since the last reset of it
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

def forward(net, cfg, batch, mask_ratio, ckpt, bf16):
    x = torch.randn(batch, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    y = torch.randn(batch, 77, cfg.caption_dim)
    sigma, noise, keep = training_noise(batch, x.shape[1:], -0.6, 1.2, 0.1)
    y = drop_captions(y, keep)
    with checkpointed(blocks(net)) if ckpt else contextlib.nullcontext(), \
            BF16Autocast() if bf16 else contextlib.nullcontext():
        if batch == 4:  # the warm-up, with its backward: every kernel and thread buffer is made once
            edm_loss(Denoiser(net), x, y, sigma, noise, mask_ratio).backward()
            return None
        with open("/proc/self/clear_refs", "w") as f:  # the peak restarts here: not the imports' or
            f.write("5")                                 # a peak from before library pages were evicted
        before = rss()
        loss = edm_loss(Denoiser(net), x, y, sigma, noise, mask_ratio)
        held = rss() - before
        peak = high_water_mark() - before
    del loss
    return held, peak

out = []
for name, batch, mask_ratio, ckpt, bf16 in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    cfg = config_at(name, 256)
    net = build_model(cfg)
    forward(net, cfg, 4, mask_ratio, ckpt, bf16)
    out.append(forward(net, cfg, batch, mask_ratio, ckpt, bf16))
print(json.dumps(out))
"""
# (preset, batch, mask ratio, activation checkpointing, bf16 rules); the peak is checked for the first
CASES = [("MicroDiT_S", 64, 0.5, False, False), ("MicroDiT_S", 64, 0.5, True, False),
         ("UNet_S", 32, 0.0, False, False), ("MicroDiT_S", 64, 0.5, False, True)]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm and tunes glibc's malloc")
def test_planned_activations_match_a_measured_forward_within_15_percent():
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
    p = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(CASES)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    measured = json.loads(p.stdout)
    for i, ((name, batch, mask_ratio, ckpt, bf16), (held, peak)) in enumerate(zip(CASES, measured)):
        m = memory.measure(memory.config_at(name, 256), batch, mask_ratio, bf16=bf16)
        planned = (m["ckpt_activations"] if ckpt else m["activations"]) + m["weight_copies"]
        what = f"{name} batch {batch} ckpt {ckpt} bf16 {bf16}: planned {planned / 1e6:.1f} MB"
        assert planned > 20e6, what  # activations dominate what is measured
        assert held == pytest.approx(planned, rel=0.15), f"{what}, held {held / 1e6:.1f} MB"
        if i == 0:
            assert peak == pytest.approx(planned, rel=0.15), f"{what}, peak {peak / 1e6:.1f} MB"


def test_states_are_20_bytes_per_parameter_under_ddp_and_sharded_under_fsdp():
    cfg = memory.config_at("MicroDiT_test", 256)
    P, G = param_count(cfg), 4
    rows, m = memory.plan(cfg, batch=2, gpus=G, mask_ratio=0.5)
    assert m["params"] == P
    ddp, fsdp, ckpt = rows["DDP"], rows["FSDP"], rows["FSDP + ckpt"]
    assert (ddp["weights"], ddp["grads"], ddp["moments"], ddp["ema"]) == (4 * P, 4 * P, 8 * P, 4 * P)
    for k in ("weights", "grads", "moments", "ema"):
        assert fsdp[k] == ckpt[k] == pytest.approx(ddp[k] / G)
    # FSDP gathers the root's own parameters and the two largest blocks, in bf16
    with torch.device("meta"):
        net = build_model(cfg)
    sizes = sorted(num_params(b) for _, b in parallel.blocks(net))
    assert fsdp["compute_params"] == 2 * (P - sum(sizes) + sizes[-1] + sizes[-2])
    assert ddp["compute_params"] == m["weight_copies"] > 0  # autocast's bf16 copies, measured
    assert ckpt["activations"] == m["ckpt_activations"] + m["recompute"] < fsdp["activations"]
    for r in rows.values():
        assert r["total"] == pytest.approx(sum(v for k, v in r.items() if k not in ("total", "fits")))
    # 20 bytes per parameter: the scaling paper's 4.07B UNet (Table 1) needs ~81 GB per GPU before activations
    assert 80e9 < sum(memory.state_bytes(param_count("UNet_C384_TD4_12")).values()) < 83e9


def test_blocks_are_what_fsdp_shards_and_checkpointing_wraps():
    with torch.device("meta"):
        dit, unet = build_model("MicroDiT_test"), build_model("UNet_test")
    assert [b for _, b in parallel.blocks(dit)] == [*dit.patch_mixer, *dit.blocks]
    kinds = {type(b).__name__ for _, b in parallel.blocks(unet)}
    assert kinds == {"ResBlock", "Resample", "TransformerBlock"}
    blocks = parallel.blocks(unet)
    with memory.checkpointed(blocks):
        assert all("forward" in vars(b) for _, b in blocks)
    assert not any("forward" in vars(b) for _, b in blocks)  # the class's forward again
    assert memory.paper_presets() == ["MicroDiT_XL_2", *scaling.PAPER_B_TABLE1]


def test_bf16_rules_are_cudas_and_torch_autocast_skips_meta_tensors():
    x, lin, bf16, fp32 = torch.randn(2, 8), torch.nn.Linear(8, 8), torch.bfloat16, torch.float32
    with memory.BF16Autocast() as autocast:
        h = lin(x)
        assert h.dtype == bf16 and F.gelu(h).dtype == bf16  # matmuls in bf16, gelu in its input's dtype
        assert F.layer_norm(h, (8,)).dtype == fp32  # norms and softmax in fp32, as CUDA's autocast runs them
        assert F.group_norm(h.reshape(2, 8, 1, 1), 2).dtype == fp32 and h.softmax(-1).dtype == fp32
        assert lin(x).dtype == bf16 and len(autocast.copies) == 2  # the weight and the bias, each cast once
    # why the planner applies the rules itself: torch.autocast leaves meta tensors alone
    with torch.autocast("cpu", dtype=bf16):
        assert F.linear(torch.randn(2, 8, device="meta"), torch.randn(8, 8, device="meta")).dtype == fp32


def test_scaling_memory_prints_the_three_strategies_and_names_bad_flags(capsys):
    scaling.main(["memory", "--model", "MicroDiT_test", "--batch", "4", "--gpus", "2"])
    out = capsys.readouterr().out
    for s in ("DDP", "FSDP", "FSDP + ckpt", "fits 80 GB", "bf16 autocast", "meta device", "at its own size"):
        assert s in out, out
    memory.print_table(["MicroDiT_test", "UNet_test"], batch=2, gpus=2)
    table = capsys.readouterr().out
    assert "MicroDiT_test" in table and "UNet_test" in table and "*" in table
    for argv, flag in [(["--batch", "0"], "--batch"), (["--gpus", "0"], "--gpus"),
                       (["--model", "UNet_test", "--mask_ratio", "0.5"], "--mask_ratio"),
                       (["--mask_ratio", "1"], "--mask_ratio"), (["--res", "100"], "--res"),
                       (["--model", "nope"], "--model")]:
        with pytest.raises(SystemExit) as e:
            scaling.main(["memory", *argv])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and flag in err, err


@pytest.mark.slow
def test_bench_gpu_runs_its_cpu_stand_ins_and_writes_the_json(tmp_path):
    out = tmp_path / "bench_gpu.json"
    p = run("bench.py", "gpu", "--out", out, timeout=300)
    assert "CPU STAND-INS" in p.stdout and str(out) in p.stdout
    result = json.loads(out.read_text())
    assert result["cpu_stand_in"] is True and result["dtype"] == "fp32" and result["peak_flops"] > 0
    rows = result["rows"]
    cases = [c[0] for c in bench.GPU_CASES]
    assert [(r["case"], r["compiled"]) for r in rows] == [(c, k) for c in cases for k in (False, True)]
    for r in rows:
        assert r["model"] in ("MicroDiT_test", "UNet_test") and 1 <= r["batch"] <= 4
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["planned_gb"] > 0
        assert r["peak_memory_gb"] is None and (r["compile_s"] is None) != r["compiled"]
        assert {"res", "latent_size", "mask_ratio", "step_s", "train_flops_per_image"} <= set(r)
    assert [r["latent_size"] for r in rows[::2]] == [8, 8, 16, 8]  # 512px: twice the stand-in's latents

