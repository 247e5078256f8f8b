"""Tests of the CLIP score: the hand-written CLIP of encoders.py against transformers' CLIPModel and
CLIPImageProcessor at random weights (HF and open_clip layouts), the score against its closed form, and the
clip-score and protocol commands of fid.py end to end."""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import encoders
import fid
from checkpoint import load_state_dict
from conftest import run

TOL = 1e-4  # max abs difference of the embeddings allowed against transformers
# copied from CLIPImageProcessor: the normalisation of OpenAI's CLIP (Radford et al. 2021)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTIONS = ["the cat", "", "a photo of THE dog, 2 cats & 1 bird!", "word " * 90]  # the last one is cut to 77


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def pooled(out):
    """get_*_features returns the tensor in transformers 4, an output with it as pooler_output in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_processor(size=224, folder=None):
    """CLIPImageProcessor on its PIL backend: the one of transformers 4, which torchmetrics' CLIPScore ran on,
    and OpenAI CLIP's own preprocessing (Radford et al. 2021). (transformers 5's CLIPImageProcessor resizes
    with torchvision when it is installed: torch's antialiased bicubic on tensors, a slightly different
    filter from PIL's.)"""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    if folder is not None:
        return cls.from_pretrained(str(folder))
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def write_vocab(folder, end_last=True):
    """A 516-token byte-level vocabulary in HF files (bytes, bytes + </w>, 2 merges, start/end) that pads with
    <|endoftext|>, as openai/clip-vit-large-patch14's tokenizer does. end_last=False: the end token is not the
    largest id (the start token is), which tells the two ways of finding it apart."""
    units = list(encoders._byte_to_unicode().values())
    specials = ["<|startoftext|>", "<|endoftext|>"] if end_last else ["<|endoftext|>", "<|startoftext|>"]
    tokens = units + [u + "</w>" for u in units] + ["th", "the</w>"] + specials
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    return len(tokens)


def tiny_hf_clip(folder, vision_act="quick_gelu", text_act="gelu", eos="largest", seed=0):
    """A transformers CLIPModel at random weights (vision width 48 on 32px images, patch 8; text width 32;
    projection 16), saved as an HF repo: config.json, model.safetensors, tokenizer, preprocessor_config.json.
    eos: the end token the largest id ("largest") or not ("not_largest"), or the legacy eos_token_id 2."""
    transformers = pytest.importorskip("transformers")
    V = write_vocab(folder, end_last=eos != "not_largest")
    end = json.loads((folder / "vocab.json").read_text())["<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, hidden_act=text_act, bos_token_id=V - 2, pad_token_id=end,
                         eos_token_id=2 if eos == "legacy2" else end),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act=vision_act), projection_dim=16)
    torch.manual_seed(seed)
    ref = transformers.CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # noise on every weight: norms and biases not at their 1 / 0 initial values
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(folder)
    hf_processor(32).save_pretrained(folder)  # preprocessing at the config's image size
    return ref


def hf_ids(folder, captions):
    transformers = pytest.importorskip("transformers")
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_images(seed=0):
    """PIL images of several sizes, aspect ratios and modes (noise, so that every pixel matters)."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h, mode in [(640, 480, "RGB"), (480, 640, "RGB"), (224, 224, "RGB"), (301, 299, "RGB"),
                       (454, 448, "RGB"), (500, 123, "RGB"), (100, 80, "RGB"), (33, 250, "RGB"),
                       (257, 400, "RGBA"), (300, 200, "L")]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if mode == "RGBA":  # partly transparent: HF composites onto white
            img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        out.append(img.convert(mode))
    return out


test_images.__test__ = False  # a helper, not a test

# -----------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("size", [224, 32])
def test_preprocess_matches_clip_image_processor(size):
    proc = hf_processor(size)
    assert tuple(proc.image_mean) == OPENAI_MEAN == encoders.CLIP_MEAN
    assert tuple(proc.image_std) == OPENAI_STD == encoders.CLIP_STD
    for img in test_images():
        ref = proc(images=img, return_tensors="pt").pixel_values[0]
        ours = encoders.clip_preprocess(img, size=size, crop=size)
        assert ours.shape == ref.shape == (3, size, size)
        assert max_diff(ours, ref) < 1e-5, (img.size, img.mode)


@pytest.mark.parametrize("vision_act,text_act,eos,fmt", [
    ("quick_gelu", "gelu", "largest", "safetensors"), ("gelu", "quick_gelu", "legacy2", "bin"),
    ("quick_gelu", "quick_gelu", "not_largest", "safetensors")])
def test_clip_matches_transformers(tmp_path, vision_act, text_act, eos, fmt):
    ref = tiny_hf_clip(tmp_path, vision_act, text_act, eos)
    end = json.loads((tmp_path / "vocab.json").read_text())["<|endoftext|>"]
    if fmt == "bin":  # as openai/clip-vit-large-patch14's pytorch_model.bin: with the position_ids buffers
        sd = load_file(tmp_path / "model.safetensors")
        sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        torch.save(sd, tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    clip = encoders.load_clip(str(tmp_path))  # strict: any missing or unexpected key raises
    # eos_token_id 2 is the legacy value for which HF pools at the largest id; else at the first eos_token_id
    assert clip.eos_id == (None if eos == "legacy2" else end)
    assert clip.image_cfg["size"] == clip.image_cfg["crop"] == 32
    ids = hf_ids(tmp_path, CAPTIONS)
    assert torch.equal(clip.tokenizer(CAPTIONS), ids)
    px = torch.stack([encoders.clip_preprocess(img, **clip.image_cfg) for img in test_images()])
    with torch.no_grad():
        image, text = clip.encode_image(px), clip.encode_text(CAPTIONS)
        d_image = max_diff(image, pooled(ref.get_image_features(pixel_values=px)))
        d_text = max_diff(text, pooled(ref.get_text_features(input_ids=ids)))
    print(f"CLIP vs transformers ({eos}, {fmt}): image {d_image:.2e}, text {d_text:.2e}")
    assert image.shape == (len(px), 16) and text.shape == (len(CAPTIONS), 16)
    assert image.std() > 0.1 and text.std() > 0.1  # not trivially small
    assert d_image < TOL and d_text < TOL


def to_open_clip(hf):
    """HF CLIPModel weights under open_clip's names, as open_clip saves a CLIP (fused q/k/v, x @ W)."""
    sd = {"logit_scale": hf["logit_scale"], "text_projection": hf["text_projection.weight"].T,
          "visual.proj": hf["visual_projection.weight"].T,
          "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
          "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
          "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
          "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
          "attn_mask": torch.full((77, 77), float("-inf")).triu(1)}  # a buffer older open_clip files hold
    for w in ("weight", "bias"):
        sd["ln_final." + w] = hf["text_model.final_layer_norm." + w]
        sd["visual.ln_pre." + w] = hf["vision_model.pre_layrnorm." + w]
        sd["visual.ln_post." + w] = hf["vision_model.post_layernorm." + w]
    for h_tower, o_tower in (("text_model.", ""), ("vision_model.", "visual.")):
        for i in range(2):
            h, o = f"{h_tower}encoder.layers.{i}.", f"{o_tower}transformer.resblocks.{i}."
            for w in ("weight", "bias"):
                sd[o + "attn.in_proj_" + w] = torch.cat([hf[h + f"self_attn.{p}_proj.{w}"] for p in "qkv"])
                sd[o + "attn.out_proj." + w] = hf[h + "self_attn.out_proj." + w]
                for a, b in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2")]:
                    sd[f"{o}{a}.{w}"] = hf[f"{h}{b}.{w}"]
    return {k: v.contiguous() for k, v in sd.items()}


def test_open_clip_layout_gives_the_same_embeddings(tmp_path):
    ref = tiny_hf_clip(tmp_path / "hf", "quick_gelu", "quick_gelu")  # open_clip has one activation for both
    V = write_vocab(tmp_path / "oc")
    cfg = {"model_cfg": {"embed_dim": 16, "quick_gelu": True,
                         "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 12,
                                        "patch_size": 8, "mlp_ratio": 2.0},
                         "text_cfg": {"context_length": 77, "vocab_size": V, "width": 32, "heads": 4,
                                      "layers": 2, "mlp_ratio": 2.0}},
           "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic"}}
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file(to_open_clip(ref.state_dict()), tmp_path / "oc" / "open_clip_model.safetensors")
    clip = encoders.load_clip(str(tmp_path / "oc"))
    assert clip.image_cfg["size"] == 32 and clip.eos_id is None  # open_clip pools at the largest id
    ids = hf_ids(tmp_path / "hf", CAPTIONS)
    assert clip.tokenizer(CAPTIONS)[0, -1] == 0  # open_clip pads with 0: the end token stays the largest id
    px = torch.stack([encoders.clip_preprocess(img, **clip.image_cfg) for img in test_images(1)])
    with torch.no_grad():
        d_image = max_diff(clip.encode_image(px), pooled(ref.get_image_features(pixel_values=px)))
        d_text = max_diff(clip.encode_text(CAPTIONS), pooled(ref.get_text_features(input_ids=ids)))
    print(f"open_clip layout vs transformers: image {d_image:.2e}, text {d_text:.2e}")
    assert d_image < TOL and d_text < TOL


def test_vit_l14_layout_and_size():
    """openai/clip-vit-large-patch14 (torchmetrics' CLIPScore model) on the meta device: every HF name and
    shape fits, and the parameters add up to the closed form."""
    transformers = pytest.importorskip("transformers")
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)
    with torch.device("meta"):
        hf_sd = transformers.CLIPModel(cfg).state_dict()
        ours = encoders.CLIP(dict(image_size=224, patch_size=14, width=1024, heads=16, layers=24,
                                  mlp_width=4096), dict(width=768, heads=12, layers=12, mlp_width=3072), 768)
    load_state_dict(ours, encoders.hf_clip_to_clip(hf_sd), "meta", assign=True)
    assert ours.visual.positional_embedding.shape == (257, 1024)  # 16 x 16 patches + the class token
    Dv, Dt, E = 1024, 768, 768  # per block: 4 D^2 attention + 8 D^2 MLP weights, 13 D biases and norms
    vision = 3 * 14 * 14 * Dv + Dv + 257 * Dv + 2 * Dv + 24 * (12 * Dv * Dv + 13 * Dv) + 2 * Dv + Dv * E
    text = 49408 * Dt + 77 * Dt + 12 * (12 * Dt * Dt + 13 * Dt) + 2 * Dt + Dt * E
    assert sum(p.numel() for p in ours.parameters()) == vision + text + 1 == 427_616_513  # + logit_scale


def test_clip_loader_errors(tmp_path):
    tiny_hf_clip(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["vision_model.post_layernorm.bias"]
    sd["vision_model.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not fit the model: 1 missing "
                                         r"\['visual.ln_post.bias'\], 1 unexpected "
                                         r"\['visual.extra.weight'\]"):
        encoders.load_clip(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg["text_config"], "model_type": "clip_text_model"}))
    with pytest.raises(ValueError, match="config.json: no vision_config"):
        encoders.load_clip(str(tmp_path))
    odd = {"model_cfg": {"vision_cfg": {"ls_init_value": 0.1}}}  # layer scale: not OpenAI's ViT
    (tmp_path / "open_clip_config.json").write_text(json.dumps(odd))
    with pytest.raises(ValueError, match=r"open_clip_config.json: options \['ls_init_value'\] are not"):
        encoders.load_clip(str(tmp_path))

# -----------------------------------------------------------------------------
# The score


class StubCLIP:
    """Stands in for encoders.CLIP: image i embeds as vectors[i], whatever its pixels; "x y" as (x, y)."""
    image_cfg = dict(size=8, crop=8)

    def __init__(self, vectors):
        self.vectors, self.seen = vectors, 0

    def encode_image(self, x):
        self.seen += len(x)
        return self.vectors[self.seen - len(x):self.seen]

    def encode_text(self, captions):
        return torch.tensor([[float(v) for v in c.split()] for c in captions], dtype=torch.float64)


def test_score_against_closed_form(tmp_path):
    vec = lambda x, y: torch.tensor([x, y], dtype=torch.float64)
    e0, e1 = vec(1, 0), vec(0, 1)
    # orthogonal: 0; parallel, whatever the lengths: 100; opposite: clipped to 0, not -100; 45 and 60 degrees
    image = torch.stack([e0, 3 * e0, e0, e0, 2 * e0, e1])
    text = torch.stack([e1, 0.5 * e0, -e0, e0 + e1, vec(1, math.sqrt(3)), vec(1, -1)])
    expected = [0.0, 100.0, 0.0, 100 / math.sqrt(2), 50.0, 0.0]
    np.testing.assert_allclose(fid.pair_scores(image, text).numpy(), expected, rtol=0, atol=1e-9)
    # the mean over pairs, through the files of a sample folder, in batches of 2, 2, 2
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (10, 12), (40 * i, 0, 0)).save(folder / f"{i:06d}.png")
    (folder / "prompts.txt").write_text("".join(f"{x:.17g} {y:.17g}\n" for x, y in text.tolist()))
    files, captions = fid.images_and_captions(folder)
    score = fid.clip_score(files, captions, StubCLIP(image), batch_size=2, progress=False)
    assert score == pytest.approx(sum(expected) / 6, abs=1e-9)


def test_clip_score_needs_captions_for_each_image(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    with pytest.raises(FileNotFoundError, match=r"imgs: no prompts.txt; give --captions FILE"):
        fid.main(["clip-score", folder, "--weights", tmp_path / "nothing"])
    (tmp_path / "caps.txt").write_text("one caption\n")
    with pytest.raises(ValueError, match=r"caps.txt: 1 captions for the 2 images of \S*imgs"):
        fid.main(["clip-score", folder, "--captions", tmp_path / "caps.txt", "--weights", tmp_path / "none"])

# -----------------------------------------------------------------------------
# The commands, end to end


def sample_folder(folder, n, seed=0, sample_json=None):
    """What sample.py writes: 000000.png ... (here of several sizes), prompts.txt, grid.png (and sample.json);
    plus a stray image no line describes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((40 + 8 * i, 32 + 4 * i), Image.Resampling.BILINEAR)
        img.save(folder / f"{i:06d}.png")
    captions = ["the cat", "a photo of THE dog", "", "the the the", "word " * 90][:n]
    (folder / "prompts.txt").write_text("\n".join(captions) + "\n")
    Image.new("RGB", (90, 90), (255, 255, 255)).save(folder / "grid.png")
    Image.new("RGB", (32, 32), (0, 0, 0)).save(folder / f"{n:06d}.png")
    if sample_json:
        (folder / "sample.json").write_text(json.dumps(sample_json))
    return [folder / f"{i:06d}.png" for i in range(n)], captions


def reference_score(ref, folder, files, captions):
    """torchmetrics' definition computed with transformers: its processor, tokenizer and CLIPModel, then
    100 max(cos, 0) per pair, averaged. Also returns the cosines."""
    px = hf_processor(folder=folder)(images=[Image.open(f) for f in files], return_tensors="pt").pixel_values
    with torch.no_grad():
        image = pooled(ref.get_image_features(pixel_values=px))
        text = pooled(ref.get_text_features(input_ids=hf_ids(folder, captions)))
    cos = torch.nn.functional.cosine_similarity(image.double(), text.double())
    return (100 * cos.clamp(min=0)).mean().item(), cos


@pytest.mark.slow
def test_clip_score_command_matches_transformers(tmp_path):
    ref = tiny_hf_clip(tmp_path / "clip")
    files, captions = sample_folder(tmp_path / "samples", 5)
    expected, cos = reference_score(ref, tmp_path / "clip", files, captions)
    assert (cos < 0).any() and (cos > 0).any()  # the clip at 0 matters here
    r = run("fid.py", "clip-score", tmp_path / "samples", "--weights", tmp_path / "clip", "--workers", 2,
            "--batch-size", 2, "--device", "cpu", "--out", tmp_path / "score.json")
    assert float(re.search(r"CLIP score: (\S+)", r.stdout).group(1)) == pytest.approx(expected, abs=1e-4)
    result = json.loads((tmp_path / "score.json").read_text())
    assert result["clip_score"] == pytest.approx(expected, abs=1e-4) and result["num_images"] == 5
    assert result["command"].startswith("python fid.py clip-score ")


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """The FID InceptionV3 at random weights, and the weights file the command line loads."""
    torch.manual_seed(0)
    net = fid.InceptionV3().eval()
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return net, path


def low_rank_fid(fa, fb):
    """FID of two small feature sets (n, D), n << D, in closed form: with S = A A^T / (n - 1) for centred
    features A (D, n), the non-zero eigenvalues of S1 S2 are those of the small A^T B B^T A / (n1-1)(n2-1)."""
    a, b = (fa - fa.mean(0)).T, (fb - fb.mean(0)).T  # (D, n1), (D, n2)
    k1, k2 = len(fa) - 1, len(fb) - 1
    small = a.T @ b @ (b.T @ a) / (k1 * k2)  # (n1, n1), symmetric PSD
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(small).clip(0)).sum()
    return ((fa.mean(0) - fb.mean(0)) ** 2).sum() + (a ** 2).sum() / k1 + (b ** 2).sum() / k2 - 2 * tr_sqrt


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*2048")
def test_protocol_writes_one_json(tmp_path, inception):
    net, weights = inception
    ref = tiny_hf_clip(tmp_path / "clip")
    meta = {"ckpt": "out/default/ckpt-2000", "seed": 0, "steps": 30, "guidance": 5.0, "n": 1, "ema": True,
            "count": 3, "command": "python sample.py --ckpt out/default --prompts-file c.txt --out samples"}
    files, captions = sample_folder(tmp_path / "samples", 3, seed=1, sample_json=meta)
    ref_files, _ = sample_folder(tmp_path / "val", 2, seed=2)
    with torch.inference_mode():  # the features, straight from the network, in one batch
        features = net(torch.stack([fid.load_image(f) for f in files + ref_files])).double().numpy()
    f_samples, f_ref = features[:3], features[3:]
    fid.save_stats(tmp_path / "ref.npz", f_ref.mean(0), np.cov(f_ref, rowvar=False))
    run("fid.py", "protocol", tmp_path / "samples", tmp_path / "ref.npz", "--clip-weights", tmp_path / "clip",
        "--weights", weights, "--workers", 0, "--batch-size", 2, "--device", "cpu")
    result = json.loads((tmp_path / "samples_protocol.json").read_text())  # beside the folder, by default
    scale = np.trace(np.cov(f_samples, rowvar=False)) + np.trace(np.cov(f_ref, rowvar=False))
    assert result["fid"] == pytest.approx(low_rank_fid(f_samples, f_ref), abs=1e-4 * scale)
    assert result["fid"] > 1e-2 * scale  # far from 0 on that scale: the tolerance tells
    assert result["clip_score"] == pytest.approx(reference_score(ref, tmp_path / "clip", files, captions)[0],
                                                 abs=1e-4)
    assert (result["num_images"], result["fid_mode"], result["center_crop"]) == (3, "bilinear", None)
    assert (result["checkpoint"], result["sampling_command"], result["sample"]) == (meta["ckpt"],
                                                                                   meta["command"], meta)
    assert result["command"].startswith("python fid.py protocol ")
    assert result["clip_weights"] == str(tmp_path / "clip")
    # reference statistics of the other mode: refused before any network is loaded
    fid.save_stats(tmp_path / "ref_clean.npz", f_ref.mean(0), np.eye(2048), mode="clean")
    with pytest.raises(ValueError, match=r"samples is in FID mode 'bilinear' and \S*ref_clean.npz in mode "
                                         r"'clean'"):
        fid.main(["protocol", tmp_path / "samples", tmp_path / "ref_clean.npz", "--weights", tmp_path / "no"])
