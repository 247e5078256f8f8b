"""bench.py default: the side-by-side of two default runs, on a stand-in repository whose train.py is instant."""
import re
import subprocess
import textwrap

import pytest

import bench

pytestmark = pytest.mark.slow  # the full tier: bench.py's commands, in subprocesses

FAKE_TRAIN = """
import json, os, time
time.sleep({sleep})
os.makedirs("out/default", exist_ok=True)
with open("out/default/log.jsonl", "w") as f:
    f.write(json.dumps({{"final": True, "val_loss": 0.01, "acc_shape": {shape}, "acc_colour": 1.0,
                        "acc_position": 1.0, "acc_mean": {mean}, "data_s": 0.1, "train_s": 0.2}}) + "\\n")
"""


def test_bench_default_compares_this_checkout_with_a_commit(tmp_path, monkeypatch, capsys):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "train.py").write_text(textwrap.dedent(FAKE_TRAIN.format(sleep=1.5, shape=1.0, mean=0.98)))
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "old default")
    monkeypatch.chdir(tmp_path)
    # this checkout: uncommitted changes count (the working tree's tracked files are what runs)
    (tmp_path / "train.py").write_text(textwrap.dedent(FAKE_TRAIN.format(sleep=0, shape=0.95, mean=0.97)))
    verdict = bench.bench_default("HEAD")
    out = capsys.readouterr().out
    assert re.search(r"default at HEAD: real 0m[12]\.\d{3}s", out) and "; wall 2s" in out and "mean 0.980" in out
    assert "mean 0.970" in out and re.search(r"default here: real 0m0\.\d{3}s user 0m\d\.\d{3}s sys 0m", out)
    assert verdict.endswith(": met") and "the wall clock of HEAD" in verdict
    assert not (tmp_path / "out").exists()  # both runs happened in temporary copies
    (tmp_path / "train.py").write_text(textwrap.dedent(FAKE_TRAIN.format(sleep=0, shape=0.85, mean=0.95)))
    assert bench.bench_default("HEAD").endswith("MISSED")  # shape under 0.9
    (tmp_path / "train.py").write_text(textwrap.dedent(FAKE_TRAIN.format(sleep=1.5, shape=1.0, mean=0.99)))
    assert bench.bench_default("HEAD").endswith("MISSED")  # not faster


def test_bench_default_failure_is_one_line_with_what_train_py_said(tmp_path, monkeypatch):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "train.py").write_text("import sys\nsys.exit('train.py: error: --lr must be > 0')\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "broken")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        bench.main(["default", "--against=HEAD"])
    assert str(e.value) == ("bench.py default: python train.py failed in a copy of the code (exit 1): "
                            "train.py: error: --lr must be > 0")
