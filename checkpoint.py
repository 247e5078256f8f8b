"""
Everything that reads or writes weights: the one atomic write, the one weights reader and the one strict
loader, checkpoint folders (config.json + safetensors, a Hugging Face Hub repo as they stand) with their
model card, the training state that resumes a run, a run's folder (out_dir), the released MicroDiT .pt files,
and files of Hub repos.

A checkpoint folder:
    config.json        model type and config, the frozen encoders (specs), sigma_data, train config, results
    model.safetensors  the network's state dict;  ema.safetensors  its EMA (preferred for sampling)
    README.md          the model card
    state.json, state.safetensors   (training checkpoints only) step, data position, AdamW moments
"""
import json
import math
import os
import re
import shutil
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, fields

import torch
from huggingface_hub import ModelCard, ModelCardData, hf_hub_download, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (EntryNotFoundError, HFValidationError, LocalEntryNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from config import UsageError
from diffusion import SIGMA_DATA, Denoiser
from model import MODELS, PRESETS, build_model, get_config, model_type

# -----------------------------------------------------------------------------
# Writing and reading files safely


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path` to write a file or a folder to; it takes the name `path` only when
    the block completes. A crash, Ctrl-C or a full disk leaves the old `path` (if any) as it was, and an
    error names the path; a kill -9 can leave `path.tmp`, which the next write to `path` replaces."""
    tmp = f"{path}.tmp"
    remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):  # a folder is replaced whole
            shutil.rmtree(path)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # a full disk: OSError from open/write, or safetensors' own error
        remove(tmp)
        raise OSError(f"{path}: could not be written ({type(e).__name__}: {e}); "
                      f"nothing was left half-written") from e
    except BaseException:
        remove(tmp)
        raise


def remove(path):
    """Delete a file or a folder, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def write_json(path, obj, indent=2):
    """Write a JSON file atomically."""
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)


def read_json(path):
    """A JSON file as Python data, with a one-line error naming the file if it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_weights(path, skip=()):
    """{name: tensor} from a .safetensors file, or a torch file of plain tensors read with
    torch.load(weights_only=True), which refuses pickled objects. Keys starting with `skip` are left out."""
    try:
        if str(path).endswith(".safetensors"):
            with safe_open(path, "pt") as f:  # reads only the tensors kept
                return {k: f.get_tensor(k) for k in f.keys() if not k.startswith(skip)}
        # mmap reads a 4.7 GB release lazily; it needs the zip format of torch >= 1.6, older files load whole
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # a truncated file, a refused pickle, a corrupt header: all name the file
        raise ValueError(f"{path}: not a plain tensor state dict that loads safely "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})") from None
    if isinstance(sd, dict) and "state_dict" in sd:  # a state dict saved inside a training checkpoint
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a plain tensor state dict but a {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a plain tensor state dict; non-tensor entries: {bad[:5]}")
    return {k: v for k, v in sd.items() if not k.startswith(skip)}


def load_state_dict(module, sd, where, assign=False):
    """module.load_state_dict(sd, strict=True), after naming every missing, unexpected or mis-shaped key.
    assign=True puts the tensors in place of the module's own (a module built on the meta device)."""
    want = module.state_dict()
    missing = sorted(want.keys() - sd.keys())
    unexpected = sorted(sd.keys() - want.keys())
    shapes = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in want.items() if k in sd and sd[k].shape != v.shape]

    def few(names):  # the first 8 names, and how many more
        if len(names) > 8:
            return f"{names[:8]} (+{len(names) - 8} more)"
        return f"{names[:8]}"

    if missing or unexpected or shapes:
        raise ValueError(f"{where}: weights do not fit the model: {len(missing)} missing {few(missing)}, "
                         f"{len(unexpected)} unexpected {few(unexpected)}, {len(shapes)} of wrong shape "
                         f"{few(shapes)}")
    module.load_state_dict(sd, strict=True, assign=assign)
    return module

# -----------------------------------------------------------------------------
# Files of a local folder or a Hugging Face Hub repo. hf_hub_download fetches a file once into the HF cache
# (HF_HUB_CACHE) and returns its local path; with HF_HUB_OFFLINE=1 it reads the cache only. Model repos are
# named "USER/NAME" (or a local folder); dataset repos "hf://datasets/USER/NAME[@REVISION][/SUBDIR]".

HUB_DATASETS = "hf://datasets/"


def offline_hint():
    if hf_constants.HF_HUB_OFFLINE:
        return (f" [HF_HUB_OFFLINE is set: only files already in the HF cache ({hf_constants.HF_HUB_CACHE}) "
                f"are used]")
    return " [or the Hub could not be reached]"


def hub_file(repo, filename, subfolder=None, repo_type="model", revision=None):
    """Local path of `filename` in a local folder or a Hub repo, or None if the repo has no such file."""
    if repo_type == "model" and os.path.isdir(repo):
        path = os.path.join(repo, subfolder or "", filename)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(repo, filename, subfolder=subfolder or None, repo_type=repo_type,
                               revision=revision)
    except EntryNotFoundError:  # also what an offline cache miss raises (LocalEntryNotFoundError)
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        what = "local folder or Hub repo" if repo_type == "model" else "Hub dataset repo or revision"
        raise FileNotFoundError(f"{repo}: no such {what} ({type(e).__name__}){offline_hint()}") from None


def find_file(repo, names, folders):
    """(path, name, folder) of the first of `names` present in the first of `folders` that has one."""
    for folder in folders:
        for name in names:
            path = hub_file(repo, name, folder)
            if path:
                return path, name, folder
    where = ", ".join(repr(f or "<root>") for f in folders)
    hint = "" if os.path.isdir(repo) else offline_hint()
    raise FileNotFoundError(f"{repo}: none of {names} found in {where}{hint}")


def parse_hub_root(root):
    """'hf://datasets/USER/NAME[@REVISION][/SUBDIR]' -> (repo_id, revision or None, subdir or None)."""
    parts = []  # USER, NAME[@REVISION], SUBDIR...
    if root.startswith(HUB_DATASETS):
        parts = root[len(HUB_DATASETS):].strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1].partition("@")[0]:
        raise ValueError(f"{root!r}: expected a local folder or hf://datasets/USER/NAME[@REVISION][/SUBDIR]")
    name, _, revision = parts[1].partition("@")
    subdir = "/".join(parts[2:])
    return f"{parts[0]}/{name}", revision or None, subdir or None

# -----------------------------------------------------------------------------
# Checkpoint folders

CHECKPOINT_FILES = ["config.json", "model.safetensors", "ema.safetensors", "README.md"]  # a Hub repo's files
# The frozen encoders of the released MicroDiT (its configs/*.yaml and README): DFN5B CLIP text tower;
# SDXL VAE or 16-channel VAE
RELEASED_TEXT_ENCODER = {"type": "clip", "repo": "apple/DFN5B-CLIP-ViT-H-14-378", "subfolder": None}
RELEASED_VAES = {4: {"type": "vae", "repo": "stabilityai/stable-diffusion-xl-base-1.0", "subfolder": "vae"},
                 16: {"type": "vae", "repo": "ostris/vae-kl-f8-d16", "subfolder": None}}


def config_from_dict(kind, d, where="config"):
    """A model config from plain data (config.json), with a clear error for unknown fields."""
    if kind not in MODELS:
        raise ValueError(f"{where}: unknown model type {kind!r}; expected one of {sorted(MODELS)}")
    cls = MODELS[kind][0]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown {kind} config field(s) {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def list_checkpoints(out_dir):
    """The complete ckpt-<step> folders of a run, newest first. Each is written as ckpt-<step>.tmp and renamed
    when complete (atomic_write), so a folder with the plain name is a whole checkpoint."""
    if not os.path.isdir(out_dir):
        return []
    names = sorted((d for d in os.listdir(out_dir) if re.fullmatch(r"ckpt-\d+", d)), key=lambda d: int(d[5:]))
    return [os.path.join(out_dir, d) for d in reversed(names)]


def save_pretrained(folder, net, ema=None, extra=None):
    """Write config.json, the model card, model.safetensors (and ema.safetensors) into an existing folder."""
    config = {"model_type": model_type(net.cfg), "model": asdict(net.cfg), **(extra or {})}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    model_card(config).save(os.path.join(folder, "README.md"))
    for name, module in (("model", net), ("ema", ema)):
        if module is not None:
            sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(sd, os.path.join(folder, f"{name}.safetensors"))


def load_pretrained(ref, ema=True, device="cpu", official_preset="MicroDiT_XL_2"):
    """(Denoiser, config) from a checkpoint folder, its EMA weights when present and asked for; a released
    MicroDiT .pt file goes through load_official, built as official_preset."""
    if os.path.isfile(ref) and ref.endswith((".pt", ".pth", ".bin")):
        return load_official(ref, official_preset, device)
    path = os.path.join(ref, "config.json")
    if os.path.isfile(ref) or not os.path.isfile(path):
        raise FileNotFoundError(f"{ref}: not a checkpoint folder (no config.json) nor a released .pt file")
    config = read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{path}: not a checkpoint config (expected an object with 'model_type', 'model')")
    net = build_model(config_from_dict(config.get("model_type"), config["model"], where=path))
    use_ema = ema and os.path.isfile(os.path.join(ref, "ema.safetensors"))
    weights = os.path.join(ref, "ema.safetensors" if use_ema else "model.safetensors")
    load_state_dict(net, read_weights(weights), weights)
    # sigma_data: recorded since the Denoiser owns it; older checkpoints have it in their train config
    sigma_data = config.get("sigma_data", config.get("train", {}).get("sigma_data", SIGMA_DATA))
    return Denoiser(net.to(device).eval(), sigma_data), config


def load_official(path, preset="MicroDiT_XL_2", device="cpu"):
    """(Denoiser, config) from a released MicroDiT .pt: a plain state dict of tensors. The latent channels and
    size come from the tensors' shapes; the frozen encoders are those of the release."""
    sd = read_weights(path)
    if "x_embedder.proj.weight" not in sd or "pos_embed" not in sd:
        raise ValueError(f"{path}: not a MicroDiT state dict (no x_embedder.proj.weight / pos_embed)")
    C, p = sd["x_embedder.proj.weight"].shape[1], sd["x_embedder.proj.weight"].shape[2]
    size = math.isqrt(sd["pos_embed"].shape[1]) * p
    # the 512px release keeps the 256px position range (pos_interp_scale 2.0 in the official
    # configs/res_512_pretrain.yaml): interp scale = latent size / the preset's
    cfg = get_config(preset, latent_channels=C, latent_size=size,
                     pos_interp_scale=size / PRESETS[preset].latent_size)
    net = load_state_dict(build_model(cfg), sd, path)
    config = {"model_type": "MicroDiT", "model": asdict(cfg), "text_encoder": RELEASED_TEXT_ENCODER,
              "latents": RELEASED_VAES.get(C, {"type": "vae", "repo": None}), "sigma_data": SIGMA_DATA}
    return Denoiser(net.to(device).eval(), SIGMA_DATA), config


def resolve_checkpoint(ref):
    """A local path for a checkpoint reference: a checkpoint folder or file; a training output folder (its
    newest ckpt-*); a Hub repo id 'user/name' (snapshot, cached); or a file of one: 'user/name/path/x.pt'."""
    if os.path.isfile(ref) or os.path.isfile(os.path.join(ref, "config.json")):
        return ref
    if os.path.isdir(ref):
        done = list_checkpoints(ref)
        if done:
            return done[0]  # the newest
        raise FileNotFoundError(f"{ref}: no checkpoint in this folder (no config.json, no ckpt-* folder)")
    parts = ref.strip("/").split("/")
    if len(parts) < 2 or ref.startswith((".", "/")) or os.path.isdir(parts[0]):  # a local path, not there
        raise FileNotFoundError(f"no checkpoint at {ref!r}: not a local path, nor a Hub repo id 'user/name'")
    repo = "/".join(parts[:2])
    try:
        if len(parts) > 2:
            return hf_hub_download(repo, "/".join(parts[2:]))
        path = snapshot_download(repo, allow_patterns=CHECKPOINT_FILES)
    except (RepositoryNotFoundError, EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled,
            HFValidationError, OSError) as e:
        raise FileNotFoundError(f"no checkpoint at {ref!r}: no such local folder, and not on the Hub as a "
                                f"repo id ({type(e).__name__}){offline_hint()}") from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"Hub repo {repo} has no config.json: not a checkpoint of this project")
    return path


def model_card(config):
    """The model card (README.md) of a checkpoint: what it is, how to sample from it, its config, results."""
    data = ModelCardData(tags=["text-to-image", "diffusion", "microdit"], pipeline_tag="text-to-image")
    lines = [f"# {config['model_type']} ({config.get('train', {}).get('model', 'custom config')})", "",
             "A text-to-image diffusion model trained with the minimal MicroDiT codebase (EDM objective).",
             "", "```bash", "python sample.py --ckpt <this repo id> --prompt \"a red circle on the left\"",
             "```", "",
             f"Text encoder: `{json.dumps(config.get('text_encoder'))}`; "
             f"latents: `{json.dumps(config.get('latents'))}`", ""]
    lines += ["| config | value |", "|---|---|"]
    for k, v in config["model"].items():
        lines.append(f"| {k} | {v} |")
    results = config.get("results", {})
    if results:
        lines += ["", "| measured | value |", "|---|---|"]
        for k, v in results.items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")


def add_results(folder, results):
    """Record measured results in a checkpoint's config.json and model card (each replaced atomically)."""
    config = {**read_json(os.path.join(folder, "config.json")), "results": results}
    write_json(os.path.join(folder, "config.json"), config)
    with atomic_write(os.path.join(folder, "README.md")) as tmp:
        model_card(config).save(tmp)


def push_to_hub(folder, repo_id, private=False):
    """Upload a checkpoint folder's weights, config and model card (not the optimizer state) to a Hub repo."""
    from huggingface_hub import HfApi  # looked up when called, so a test can stand in for the upload
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=private)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=CHECKPOINT_FILES,
                             commit_message=f"upload {os.path.basename(folder.rstrip('/'))}")

# -----------------------------------------------------------------------------
# The training state: AdamW's moments in safetensors, step and data position in JSON


def save_train_state(folder, opt_state, state):
    """AdamW's per-parameter state {param index: {"exp_avg", "exp_avg_sq", "step"}} and the run's state."""
    tensors = {}
    for i, per_param in opt_state.items():
        for k, v in per_param.items():
            tensors[f"opt.{i}.{k}"] = v.contiguous()
    save_file(tensors, os.path.join(folder, "state.safetensors"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f, indent=2)


def read_checkpoint(folder, full=True):
    """The files of a checkpoint as {'model', 'ema', 'opt': tensors, 'state': state.json}, or only the
    weights (not full: a Hub checkpoint has no training state); raises on a missing or corrupt file before
    any is loaded."""
    ckpt = {"model": read_weights(os.path.join(folder, "model.safetensors")), "ema": None, "opt": None,
            "state": {}}
    if full:
        ema = os.path.join(folder, "ema.safetensors")
        if os.path.isfile(ema):
            ckpt["ema"] = read_weights(ema)
        ckpt["opt"] = read_weights(os.path.join(folder, "state.safetensors"))
        ckpt["state"] = read_json(os.path.join(folder, "state.json"))
    return ckpt


def load_checkpoint(ckpt, folder, net, ema):
    """Load the weights of what read_checkpoint returned; returns (state, AdamW's per-parameter state or None)
    for the optimizer, made later. pos_embed is a buffer computed from the model's latent size and
    pos_interp_scale: this model's own is kept, so 256px weights can start a 512px model."""
    for sd, module in ((ckpt["model"], net), (ckpt["ema"] or ckpt["model"], ema)):
        if module is not None:
            if "pos_embed" in module.state_dict():
                sd = {**sd, "pos_embed": module.pos_embed}
            load_state_dict(module, sd, folder)
    if ckpt["opt"] is None:
        return ckpt["state"], None
    per_param = {}
    for key, v in ckpt["opt"].items():  # "opt.<param index>.<exp_avg|exp_avg_sq|step>"
        _, i, name = key.split(".", 2)
        per_param.setdefault(int(i), {})[name] = v
    return ckpt["state"], per_param

# -----------------------------------------------------------------------------
# A run's folder (train.py's out_dir): its checkpoints, those that did not load (set aside), its log


def claim_out_dir(out_dir, overwrite, resume):
    """An out_dir holds one run. A fresh run where another run's checkpoints or log are is refused (or, with
    overwrite, that run is deleted); leftovers of interrupted writes (*.tmp) are removed. The caller holds the
    folder's lock (lock.py): no live job writes here meanwhile."""
    names = os.listdir(out_dir)
    for name in names:
        if name.endswith(".tmp"):
            remove(os.path.join(out_dir, name))
    ours = [n for n in names
            if re.fullmatch(r"ckpt-\d+(\.bad(-\d+)?)?|log\.jsonl|samples-\d+\.png|curve\.png", n)]
    if ours and overwrite:
        for name in ours:
            remove(os.path.join(out_dir, name))
        print(f"--overwrite: deleted the run in {out_dir} ({len(ours)} files and folders)")
    elif ours and not resume:
        ckpts = list_checkpoints(out_dir)
        what = f"checkpoints up to {os.path.basename(ckpts[0])}" if ckpts else "a log.jsonl"
        raise UsageError(f"{out_dir} holds another run ({what}): continue it with --resume=auto, or start "
                         f"this one in a new --out_dir, or pass --overwrite to delete that run")


def set_aside(folder):
    """Rename a checkpoint that does not load to <folder>.bad (.bad-2, .bad-3, ... when taken), where it is
    kept for a look, never resumed nor pruned; returns the new name."""
    aside, n = f"{folder}.bad", 1
    while os.path.lexists(aside):
        n += 1
        aside = f"{folder}.bad-{n}"
    os.replace(folder, aside)
    return aside


def keep_log_until(out_dir, step):
    """log.jsonl belongs to this run: records after the step it (re)starts from, of an interrupted part
    that is now being redone, are dropped."""
    path = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_write(path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)
