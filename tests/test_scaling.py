"""Cost accounting and scaling fits, checked against closed forms, the papers' own numbers and brute force."""
import os

# Thousands of tiny L-BFGS-B problems: OpenBLAS threads slow them 5-15x on a busy 2-core machine. This only
# works if scipy has not loaded its BLAS yet (other test modules may have): the full-grid fit runs in a subprocess.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

import report
import scaling
from conftest import ROOT
from model import PRESETS, flops_per_image
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022's published fit


# -----------------------------------------------------------------------------
# cost


def test_gpu_hours_and_dollars_closed_form():
    # one hour of a 1 PFLOP/s GPU at 50% MFU is 1.8e18 FLOPs
    assert report.gpu_hours(1.8e18, gpu_peak=1e15, mfu=0.5) == pytest.approx(1.0)
    assert report.dollars(2.0, price=3.75) == pytest.approx(7.5)
    assert scaling.implied_mfu(0.3 * 2.6 * 86400 * 8 * 989.4e12) == pytest.approx(0.3)


def test_paper_price_days_and_gpus_agree():
    # at the implied MFU any FLOP count takes 2.6 days on 8 GPUs; at $3.75/hour that is the paper's $1,890
    flops = 3e20
    hours = report.gpu_hours(flops, mfu=scaling.implied_mfu(flops))
    assert hours == pytest.approx(2.6 * 24 * 8)
    assert report.dollars(hours) == pytest.approx(1890, rel=0.01)


@pytest.mark.slow
def test_recipe_stages_follow_the_papers_recipe():
    stages = scaling.recipe_stages("MicroDiT_test")
    assert [(s["res"], s["mask_ratio"], s["steps"]) for s in stages] == [
        (256, 0.75, 250_000), (256, 0.0, 30_000), (512, 0.75, 50_000), (512, 0.0, 5_000)]
    cfg = PRESETS["MicroDiT_test"]
    for s in stages:
        assert s["images"] == s["steps"] * 2048 and s["flops"] == s["flops_per_image"] * s["images"]
    for s, latent, interp in [(stages[0], 32, 1), (stages[3], 64, 2)]:  # 256px masked, 512px unmasked
        expect = flops_per_image(replace(cfg, latent_size=latent, pos_interp_scale=interp), s["mask_ratio"])
        assert s["flops_per_image"] == expect
    assert stages[0]["flops_per_image"] < stages[1]["flops_per_image"] < stages[2]["flops_per_image"] \
        < stages[3]["flops_per_image"]


@pytest.mark.slow
def test_paper_recipe_implies_a_plausible_mfu():
    # acceptance: outside 10%-70% the FLOPs are miscounted (or the paper's figures disagree with each other)
    total = sum(s["flops"] for s in scaling.recipe_stages("MicroDiT_XL_2"))
    assert 0.10 < scaling.implied_mfu(total) < 0.70


@pytest.mark.slow
def test_cost_cli(capsys):
    scaling.main(["cost", "--preset=MicroDiT_test", "--gpu-peak=100", "--mfu=0.5", "--price=2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"], ["3"], ["4"], ["total"])]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "total"]
    flops, hours, cost = (float(v.replace(",", "")) for v in rows[-1][-3:])
    assert hours == pytest.approx(flops / (100e12 * 0.5) / 3600, rel=5e-3) and cost == pytest.approx(2 * hours, abs=1)
    assert any("implied MFU" in line for line in lines)
    with pytest.raises(SystemExit):
        scaling.main(["cost", "--mfu=2"])
    assert "--mfu" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# power laws on the Pareto frontier


def test_pareto_frontier_hand_made():
    x = [1, 2, 2, 3, 4, 0.5]
    s = [0.5, 0.4, 0.6, 0.6, 0.9, 0.1]  # (2, 0.4) loses to (2, 0.6); (3, 0.6) only ties it at more cost
    assert scaling.pareto_frontier(x, s).tolist() == [5, 0, 2, 4]
    loss = [3.0, 2.5, 2.7, 2.0, 2.0]
    assert scaling.pareto_frontier([1, 2, 3, 3, 4], loss, maximize=False).tolist() == [0, 1, 3]


def test_power_law_recovers_known_parameters():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e3, 1e9, 40)
    y = 3.0 * x ** -0.25 * np.exp(rng.normal(0, 0.01, x.size))
    a, b = scaling.fit_power_law(x, y)
    assert a == pytest.approx(3.0, rel=0.05) and b == pytest.approx(-0.25, abs=0.005)


@pytest.mark.parametrize("a, b, lo, hi", [
    (0.47, 0.02, 1e9, 1e12),  # TIFA = 0.47 C^0.02, C = training GFLOPs (Li et al. 2024)
    (0.64, 0.03, 1.0, 1e3),   # TIFA = 0.64 D^0.03, D = millions of image-noun pairs
])
def test_frontier_fit_recovers_paper_b_scaling_functions(a, b, lo, hi):
    x = np.geomspace(lo, hi, 10)
    s = a * x ** b
    # runs off the frontier: each costs more than a frontier run and scores less than it
    rng = np.random.default_rng(0)
    x_off = np.concatenate([x * 1.5, x * 1.2])
    s_off = np.concatenate([s, s]) * rng.uniform(0.8, 0.999, 2 * x.size)
    x_all, s_all = np.concatenate([x_off, x]), np.concatenate([s_off, s])
    assert sorted(scaling.pareto_frontier(x_all, s_all).tolist()) == list(range(x_off.size, x_all.size))
    a_fit, b_fit = scaling.fit_frontier_power_law(x_all, s_all)
    assert a_fit == pytest.approx(a, rel=1e-6) and b_fit == pytest.approx(b, abs=1e-8)
    # fitting every run instead of the frontier gives a different law
    assert scaling.fit_power_law(x_all, s_all)[0] < 0.99 * a


def test_power_law_bootstrap_covers_truth():
    rng = np.random.default_rng(1)
    x = np.geomspace(1, 1e6, 30)
    y = 2.0 * x ** -0.1 * np.exp(rng.normal(0, 0.02, x.size))
    lo, hi, n = scaling.bootstrap(scaling.fit_power_law, [x, y], n_boot=100, seed=0)
    assert n == 100 and lo[0] < 2.0 < hi[0] and lo[1] < -0.1 < hi[1] and hi[1] - lo[1] < 0.02


# -----------------------------------------------------------------------------
# Chinchilla approach 3


def test_huber_closed_form():
    d = 1e-3
    r = np.array([0.5e-3, -3e-3, d, -d])
    assert scaling.huber(r, d) == pytest.approx([0.5 * 0.25e-6, d * (3e-3 - 0.5 * d), 0.5 * d * d, 0.5 * d * d])


def test_chinchilla_objective_gradient():
    rng = np.random.default_rng(0)
    log_N, log_D = np.log(np.geomspace(1e8, 1e10, 12)), np.log(np.geomspace(1e10, 1e12, 12))
    log_L = np.log(scaling.chinchilla_loss(CHINCHILLA, np.exp(log_N), np.exp(log_D))) + rng.normal(0, 2e-3, 12)
    theta = np.array([6.0, 6.1, 0.5, 0.35, 0.3])
    loss, grad = scaling.chinchilla_objective(theta, log_N, log_D, log_L)
    # the log-sum-exp form is log(E + A/N^alpha + B/D^beta) with A, B, E = exp(a, b, e); the loss is summed
    direct = dict(A=np.exp(6.0), B=np.exp(6.1), E=np.exp(0.5), alpha=0.35, beta=0.3)
    pred = np.log(scaling.chinchilla_loss(direct, np.exp(log_N), np.exp(log_D)))
    assert loss == pytest.approx(scaling.huber(pred - log_L).sum(), rel=1e-12)
    h = 1e-7
    numeric = [(scaling.chinchilla_objective(theta + h * e, log_N, log_D, log_L)[0]
                - scaling.chinchilla_objective(theta - h * e, log_N, log_D, log_L)[0]) / (2 * h) for e in np.eye(5)]
    assert grad == pytest.approx(numeric, rel=1e-4, abs=1e-9)


@pytest.fixture(scope="module")
def chinchilla_points():
    """64 points of the published law over Chinchilla's range of N and D, 0.1% noise, and their full-grid fit."""
    rng = np.random.default_rng(0)
    N, D = np.meshgrid(np.geomspace(7e7, 1.6e10, 8), np.geomspace(5e9, 5e11, 8))
    N, D = N.ravel(), D.ravel()
    L = scaling.chinchilla_loss(CHINCHILLA, N, D) * np.exp(rng.normal(0, 1e-3, N.size))
    code = ("import json, sys, scaling; N, D, L = json.load(sys.stdin); "
            "print(json.dumps(scaling.fit_chinchilla(N, D, L)))")
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps([N.tolist(), D.tolist(), L.tolist()]),
                       cwd=ROOT, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return N, D, L, json.loads(r.stdout)


@pytest.mark.slow
def test_chinchilla_fit_recovers_published_parameters(chinchilla_points):
    fit = chinchilla_points[3]
    assert fit["E"] == pytest.approx(1.69, rel=0.01)
    assert fit["alpha"] == pytest.approx(0.34, abs=0.004) and fit["beta"] == pytest.approx(0.28, abs=0.004)
    assert fit["A"] == pytest.approx(406.4, rel=0.08) and fit["B"] == pytest.approx(410.7, rel=0.08)


def test_chinchilla_bootstrap_intervals(chinchilla_points):
    N, D, L, fit = chinchilla_points
    lo, hi, n = scaling.bootstrap_chinchilla(N, D, L, fit, n_boot=40, seed=0)
    assert n == 40
    for i, k in enumerate(["E", "A", "B", "alpha", "beta"]):
        assert lo[i] <= fit[k] <= hi[i] and lo[i] < hi[i]
    assert lo[3] < 0.34 < hi[3] and lo[4] < 0.28 < hi[4]


def test_chinchilla_fit_recovers_other_parameters():
    # Besiroglu et al.'s replication values, noiseless, from a small grid: a second, different law
    true = dict(E=1.817, A=482.0, B=2085.4, alpha=0.348, beta=0.366)
    N, D = np.meshgrid(np.geomspace(7e7, 1.6e10, 6), np.geomspace(5e9, 5e11, 6))
    L = scaling.chinchilla_loss(true, N.ravel(), D.ravel())
    fit = scaling.fit_chinchilla(N.ravel(), D.ravel(), L, inits=scaling.CHINCHILLA_GRID[::37])
    for k in true:
        assert fit[k] == pytest.approx(true[k], rel=1e-3), k


def test_compute_optimal_matches_brute_force():
    k = 6.0  # FLOPs per parameter per token of a transformer, as Chinchilla counts
    budgets = np.array([1e18, 1e21, 5.76e23])
    N_opt, D_opt = scaling.compute_optimal(budgets, CHINCHILLA, k)
    for C, n, d in zip(budgets, N_opt, D_opt):
        assert k * n * d == pytest.approx(C)
        loss = lambda log_n: scaling.chinchilla_loss(CHINCHILLA, np.exp(log_n), C / (k * np.exp(log_n)))
        best = minimize_scalar(loss, bounds=(np.log(1e3), np.log(1e16)), method="bounded", options={"xatol": 1e-10})
        assert n == pytest.approx(np.exp(best.x), rel=1e-4)
    # Chinchilla's approach 3 (their Table 2): N_opt ~ C^0.46, D_opt ~ C^0.54
    slope = lambda v: np.polyfit(np.log(budgets), np.log(v), 1)[0]
    assert slope(N_opt) == pytest.approx(0.46, abs=0.01) and slope(D_opt) == pytest.approx(0.54, abs=0.01)


def test_fit_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_power_law([1, 2, 3], [1, 0, 2])
    with pytest.raises(ValueError, match="one length"):
        scaling.fit_chinchilla([1e8, 1e9], [1e10], [2.0, 2.1])
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({k: 1 for k in scaling.RESULT_KEYS}) + "\n" + json.dumps({"model": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"results.jsonl: row 2: missing keys"):
        scaling.load_rows(str(path), scaling.RESULT_KEYS)
    with pytest.raises(FileNotFoundError):
        scaling.load_rows(str(tmp_path / "nope.jsonl"), scaling.RESULT_KEYS)


# -----------------------------------------------------------------------------
# fitting a sweep's results


@pytest.mark.slow
def test_fit_cli_on_synthetic_sweep(tmp_path, monkeypatch, capsys):
    true = dict(E=0.3, A=40.0, B=25.0, alpha=0.3, beta=0.4)
    rows = []
    for model, params in [("xs", 1e5), ("s", 4e5), ("m", 1.6e6)]:
        for steps in [250, 500, 1000]:
            images = 32 * steps
            loss = float(scaling.chinchilla_loss(true, params, images))
            acc = min(0.95, 0.1 * (6 * params * images / 1e9) ** 0.1)
            rows.append(dict(model=model, params=params, steps=steps, images=images, flops=6 * params * images,
                             final_loss=loss, acc_shape=acc, acc_colour=acc, acc_position=acc, acc_mean=acc,
                             wall_s=1.0))
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(scaling, "CHINCHILLA_GRID", scaling.CHINCHILLA_GRID[::50])  # seconds, not a minute
    plot = tmp_path / "scaling.png"
    scaling.main(["fit", str(path), "--plot", str(plot), "--n-boot", "20"])
    out = capsys.readouterr().out
    assert "alpha" in out and "compute-optimal" in out and out.count("frontier points") == 6
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fits = scaling.fit_results(scaling.load_rows(str(path), scaling.RESULT_KEYS), n_boot=5)
    predicted = scaling.chinchilla_loss(fits["chinchilla"]["fit"], [r["params"] for r in rows],
                                        [r["images"] for r in rows])
    assert predicted == pytest.approx([r["final_loss"] for r in rows], rel=1e-3)
    assert fits["compute_optimal"]["k"] == pytest.approx(6.0)


# -----------------------------------------------------------------------------
# the COCO FID-30K protocol's cost


def vit_flops(tokens, width, layers, mlp_width):
    """Closed form of a pre-LN transformer's matmul FLOPs on `tokens` tokens: q, k, v, out projections,
    the two MLP matmuls, and attention's two (tokens x tokens x width) products; 2 FLOPs per multiply-add."""
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp_width) + 2 * 2 * tokens * tokens * width
    return layers * per_layer


@pytest.mark.slow
def test_protocol_cost_parts_match_closed_forms():
    parts = scaling.protocol_cost("MicroDiT_XL_2", res=512, n_images=10, steps=30)
    denoiser = [v for k, v in parts.items() if k.startswith("denoiser")]
    cfg = scaling.stage_config(PRESETS["MicroDiT_XL_2"], 512)
    assert denoiser == [10 * 59 * 2 * flops_per_image(cfg, 0.0, train=False)]  # Heun: 2 x 30 - 1 calls, x2 guidance
    assert 0.95e12 < denoiser[0] / 1180 < 1.1e12  # "about 1 TFLOP per forward" at 512px (the estimate)
    # CLIP ViT-L/14 at 224: 16 x 16 patches + class token; patch conv and the output projection
    image = vit_flops(257, 1024, 24, 4096) + 2 * 256 * 3 * 14 * 14 * 1024 + 2 * 1024 * 768
    text = vit_flops(77, 768, 12, 3072)  # the text tower without its projection (not used by forward)
    assert parts["CLIP ViT-L/14 score (image + caption)"] == 10 * (image + text)
    assert parts["text encoder (DFN5B CLIP-H, once per caption)"] == 10 * vit_flops(77, 1024, 24, 4096)
    # the FID InceptionV3 at 299 px: 5.7 GMACs (the figure torchvision publishes for its InceptionV3)
    assert 5.6e9 < parts["Inception, generated images"] / 10 / 2 < 5.8e9
    assert parts["Inception, COCO val2014 reference (once)"] == parts["Inception, generated images"] / 10 * 40_504
