"""Checkpoints on the Hugging Face Hub: load ours by repo id (offline, from a local Hub cache), push them
(against a stand-in for the upload call), and load the released MicroDiT .pt layout safely."""
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
from checkpoint import load_official, load_pretrained, save_pretrained
from conftest import BUILTIN16, PIXELS, hub_cache, run, tiny_denoiser
from model import build_model, get_config
from sample import generate


def tiny_net(seed=0):
    return tiny_denoiser(seed).net


def write_checkpoint(folder):
    net = tiny_net()
    os.makedirs(folder)
    save_pretrained(folder, net, ema=tiny_net(1), extra={"text_encoder": BUILTIN16, "latents": PIXELS,
                                                         "results": {"acc_mean": 0.5}})
    return net


def test_checkpoint_folder_round_trip(tmp_path):
    net = write_checkpoint(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["README.md", "config.json", "ema.safetensors", "model.safetensors"]
    loaded, config = load_pretrained(str(tmp_path / "ckpt"), ema=False)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.net.state_dict().values()))
    ema, _ = load_pretrained(str(tmp_path / "ckpt"))  # EMA weights preferred when present
    assert torch.equal(ema.net.final_layer.linear.weight, tiny_net(1).final_layer.linear.weight)
    assert ema.sigma_data == 0.9  # no train config recorded: EDM's sigma_data of MicroDiT
    card = open(tmp_path / "ckpt" / "README.md").read()
    assert "python sample.py --ckpt" in card and "| acc_mean | 0.5 |" in card and "| dim | 32 |" in card
    assert card.startswith("---\n") and "pipeline_tag: text-to-image" in card  # the Hub reads this metadata block


@pytest.mark.slow
def test_load_by_repo_id_offline_through_sample_py(tmp_path):
    write_checkpoint(tmp_path / "ckpt")
    hub_cache(tmp_path / "hub", "someone/microdit-tiny", tmp_path / "ckpt")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    args = ["--prompt", "a red circle on the left", "--steps", "2"]
    run("sample.py", *args, "--out", tmp_path / "out", "--ckpt", "someone/microdit-tiny", env=env)
    assert os.path.exists(tmp_path / "out" / "000000.png")
    # the same images as from the local folder: the repo id really resolved to this checkpoint
    run("sample.py", *args, "--out", tmp_path / "out2", "--ckpt", tmp_path / "ckpt", env=env)
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "000000.png")),
                          np.asarray(Image.open(tmp_path / "out2" / "000000.png")))
    # a repo that is not in the cache: a clear error that says the search was offline
    p = run("sample.py", *args, "--out", tmp_path / "out3", "--ckpt", "someone/missing", env=env, check=False)
    assert p.returncode != 0 and "someone/missing" in p.stderr and "HF_HUB_OFFLINE is set" in p.stderr


def test_push_uploads_weights_config_and_card_only(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "ckpt")
    for name in ("state.json", "state.safetensors"):  # a training checkpoint also holds the optimizer state
        (tmp_path / "ckpt" / name).write_text("{}")
    calls = {}

    class StandIn:  # records what would be sent; no network
        def create_repo(self, repo_id, exist_ok, private):
            calls["repo"] = (repo_id, exist_ok, private)

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            import fnmatch
            calls["files"] = sorted(f for f in os.listdir(folder_path)
                                    if any(fnmatch.fnmatch(f, pat) for pat in allow_patterns))
            return "commit"

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", StandIn)
    assert checkpoint.push_to_hub(str(tmp_path / "ckpt"), "me/run") == "commit"
    assert calls["repo"] == ("me/run", True, False)
    assert calls["files"] == ["README.md", "config.json", "ema.safetensors", "model.safetensors"]


@pytest.mark.slow
def test_train_pushes_its_final_checkpoint_with_results(tmp_path, monkeypatch):
    import huggingface_hub
    import train
    sent = {}

    class StandIn:
        def create_repo(self, repo_id, exist_ok, private):
            pass

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            sent.update(repo=repo_id, folder=folder_path, card=open(os.path.join(folder_path, "README.md")).read())
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", StandIn)
    train.train(train.TrainConfig(model="MicroDiT_test", data_dir=str(tmp_path / "data"), dataset_size=100,
                                  batch_size=4, max_steps=2, log_every=1, eval_n=0, val_n=8, peak_flops=1e12,
                                  out_dir=str(tmp_path / "run"), push_to_hub="me/tiny"))
    assert sent["repo"] == "me/tiny" and sent["folder"].endswith("ckpt-0000002")
    assert "| val_loss |" in sent["card"]  # the measured results are in the card that was uploaded
    assert "val_loss" in json.load(open(os.path.join(sent["folder"], "config.json")))["results"]


def test_official_layout_loads_with_weights_only_and_samples(tmp_path):
    net = tiny_net()
    path = tmp_path / "dit_3_channel_tiny.pt"
    torch.save(net.state_dict(), path)  # the release is a plain DiT state dict, no prefix
    loaded, config = load_official(str(path), preset="MicroDiT_test")
    cfg = loaded.net.cfg
    assert cfg.latent_channels == 3 and cfg.latent_size == 8 and cfg.pos_interp_scale == 1.0
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.net.state_dict().values()))
    assert loaded.sigma_data == config["sigma_data"] == 0.9  # micro_diffusion/models/model.py's sigma_data
    assert config["text_encoder"]["repo"] == "apple/DFN5B-CLIP-ViT-H-14-378"
    # sample with a stand-in text encoder (the real DFN5B tower cannot be downloaded here)
    images = generate(loaded, {**config, "text_encoder": BUILTIN16, "latents": PIXELS},
                      ["a red circle"], steps=3, progress=False)
    assert images[0].shape == (8, 8, 3) and images[0].dtype == np.uint8


def test_official_512_layout_infers_latent_size_and_interp_scale(tmp_path):
    # like the 512px release: twice the preset's latent size, position range kept (pos_interp_scale 2)
    net = build_model(get_config("MicroDiT_test", latent_size=16, pos_interp_scale=2.0))
    torch.save(net.state_dict(), tmp_path / "dit_512.pt")
    loaded, _ = load_official(str(tmp_path / "dit_512.pt"), preset="MicroDiT_test")
    assert (loaded.net.cfg.latent_size, loaded.net.cfg.pos_interp_scale) == (16, 2.0)
    assert torch.equal(loaded.net.pos_embed, net.pos_embed)


class Payload:
    """Any object other than tensors: a pickle that would run code on load."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_official_path_refuses_non_tensor_pickles(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(ValueError, match="evil.pt: not a plain tensor state dict"):
        load_official(str(evil), preset="MicroDiT_test")
    mixed = tmp_path / "mixed.pt"
    torch.save({"pos_embed": torch.zeros(1), "step": 3}, mixed)  # allowed by weights_only, still not weights
    with pytest.raises(ValueError, match=r"non-tensor entries: \['step'\]"):
        load_official(str(mixed), preset="MicroDiT_test")


def test_wrong_keys_are_named(tmp_path):
    sd = tiny_net().state_dict()
    sd["blocks.0.extra.weight"] = sd.pop("blocks.0.attn.qkv.weight")
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"1 missing \['blocks.0.attn.qkv.weight'\], 1 unexpected \['blocks.0.extra.weight'\]"):
        load_official(str(tmp_path / "bad.pt"), preset="MicroDiT_test")
