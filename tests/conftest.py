"""What the test files share: the repository root, running a script as a user does, a local Hugging Face Hub
cache laid out as huggingface_hub writes it, and tiny networks that carry signal on every path."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from diffusion import Denoiser
from model import build_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "reference"  # facts about released files, copied from their sources
# pytest-xdist runs the tests in several worker processes (pytest.ini): they share the cores between them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
# One thread per subprocess: two or three of them often run at once on a 2-core machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BUILTIN16 = {"type": "builtin", "dim": 16, "max_len": 24}  # the built-in text encoder of MicroDiT_test's data
PIXELS = {"type": "pixels"}


def run(script, *args, env=None, check=True, timeout=600, **kw):
    """`python script args...` from the repository root, as a user runs it; returns the CompletedProcess."""
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=kw.pop("cwd", ROOT),
                       env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def hub_cache(cache, repo_id, src, repo_type="model", subdir=""):
    """Put folder `src` into the Hub cache `cache` as snapshot COMMIT of `repo_id` (refs/main -> COMMIT)."""
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(src, repo / "snapshots" / COMMIT / subdir)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def randomize(net, std=0.05, seed=0):
    """Add small random values to every weight (the zero-initialised ones included), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def tiny_denoiser(seed=0, name="MicroDiT_test", sigma_data=0.9):
    """A randomized MicroDiT_test (or another preset) in its EDM preconditioning, in eval mode."""
    torch.manual_seed(seed)
    return Denoiser(randomize(build_model(name), seed=seed).eval(), sigma_data)
