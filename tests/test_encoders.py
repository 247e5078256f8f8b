"""Parity of the frozen encoders in encoders.py with diffusers, transformers and open_clip (random weights, CPU)."""
import gzip
import importlib.util
import json
import os
import random
import subprocess
import sys
import unicodedata

import pytest
import torch
from safetensors.torch import load_file, save_file

import encoders
from checkpoint import load_state_dict, read_weights
from conftest import ROOT, hub_cache

torch.set_num_threads(1)
TOL = 1e-4  # max abs difference allowed against the reference libraries (issue acceptance 1)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def perturb_(model, seed):
    """Add noise to every parameter so that norm weights (initialised 1/0) are not trivially equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()

# -----------------------------------------------------------------------------
# VAE vs diffusers.AutoencoderKL

VAE_CONFIGS = {
    # 2 levels (f=2), 4 channels, defaults otherwise
    "sdxl_like": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                      scaling_factor=0.13025, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2),
    # 3 levels (f=4), 16 channels, 2 resnets per level, shift_factor, no quant convs, no mid attention
    "d16_shift": dict(block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=16, norm_num_groups=16,
                      scaling_factor=0.5, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                      mid_block_add_attention=False, down_block_types=("DownEncoderBlock2D",) * 3,
                      up_block_types=("UpDecoderBlock2D",) * 3),
}


def tiny_diffusers_vae(name, seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return perturb_(diffusers.AutoencoderKL(**VAE_CONFIGS[name]), seed)


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_matches_diffusers(name, tmp_path):
    ref = tiny_diffusers_vae(name)
    ref.save_pretrained(tmp_path / "vae")  # as on the Hub: <repo>/vae/config.json, diffusion_pytorch_model.safetensors
    vae = encoders.load_vae(str(tmp_path))  # default subfolder "vae"
    cfg = VAE_CONFIGS[name]
    sf, shift = cfg["scaling_factor"], cfg.get("shift_factor") or 0.0
    assert vae.latent_channels == cfg["latent_channels"] and vae.scaling_factor == sf
    assert vae.shift_factor == cfg.get("shift_factor")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        ref_mean = (post.mean - shift) * sf
        ref_sample = (post.sample(generator=torch.Generator().manual_seed(7)) - shift) * sf
        mean = vae.encode(x, sample=False)
        sample = vae.encode(x, generator=torch.Generator().manual_seed(7))
        noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
        sample_noise = vae.encode(x, noise=noise)
        z = torch.randn_like(ref_mean)
        ref_img = ref.decode(z / sf + shift).sample
        img = vae.decode(z)
    assert max_diff(mean, ref_mean) < TOL
    assert max_diff(sample, ref_sample) < TOL and max_diff(sample_noise, ref_sample) < TOL
    assert max_diff(sample, mean) > 1e-2  # the sample really is noisy
    assert max_diff(img, ref_img) < TOL and img.shape == x.shape


@pytest.mark.parametrize("cfg", [
    # stabilityai/stable-diffusion-xl-base-1.0/vae/config.json (MicroDiT's VAE)
    dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, scaling_factor=0.13025),
    # ostris/vae-kl-f8-d16/config.json (as published, including the null shift_factor)
    dict(block_out_channels=[128, 128, 256, 512], layers_per_block=2, latent_channels=16, scaling_factor=0.2614,
         shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=True,
         use_post_quant_conv=True, mid_block_add_attention=True),
])
def test_vae_full_size_key_layout(cfg):
    diffusers = pytest.importorskip("diffusers")
    full = dict(cfg, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                in_channels=3, out_channels=3, act_fn="silu", norm_num_groups=32, sample_size=512)
    with torch.device("meta"):
        ref, ours = diffusers.AutoencoderKL(**full), encoders.AutoencoderKL(full)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_vae_loader_checks_keys_and_reads_legacy_attention_names(tmp_path):
    ref = tiny_diffusers_vae("sdxl_like")
    ref.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    # pre-0.14 diffusers names (still on the Hub, e.g. the SD 2.1 VAE) load to the same model
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for k, v in sd.items():
        for a, b in old.items():
            k = k.replace(a, b)
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, path)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert max_diff(encoders.load_vae(str(tmp_path), subfolder=None).encode(x, sample=False),
                        ref.encode(x).latent_dist.mean * 0.13025) < TOL
    # a missing key, an unexpected key and a wrong shape are all named
    bad = dict(sd)
    del bad["decoder.conv_out.bias"]
    bad["encoder.extra.weight"] = torch.zeros(1)
    bad["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"decoder\.conv_out\.bias.*encoder\.extra\.weight.*quant_conv\.weight"):
        encoders.load_vae(str(tmp_path), subfolder=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        encoders.load_vae(str(tmp_path / "empty"))

# -----------------------------------------------------------------------------
# CLIP text transformer vs transformers.CLIPTextModel, and the open_clip layout


def write_tiny_vocab(folder, pad_token=None):
    """A 516-token byte-level vocabulary in HF format (bytes, bytes+</w>, 2 merges, start/end) plus its merges."""
    units = list(encoders._byte_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>")]
    tokens = units + [u + "</w>" for u in units] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    if pad_token:
        (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token}))
    return len(tokens)


TINY_CAPTIONS = ["the cat", "", "a photo of THE dog, 2 cats & 1 bird!", "日本語 emoji 😀 " * 3, "word " * 90]


def tiny_clip(act, vocab_size, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                                      bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                                      pad_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    return perturb_(transformers.CLIPTextModel(cfg), seed)


def hf_ids(folder, captions):
    transformers = pytest.importorskip("transformers")
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))  # default pad: <|endoftext|>
    return tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("layout", ["transformers5", "text_model_prefix"])
def test_clip_text_matches_transformers(act, layout, tmp_path):
    V = write_tiny_vocab(tmp_path, pad_token="<|endoftext|>")
    ref = tiny_clip(act, V)
    ref.save_pretrained(tmp_path)
    if layout == "text_model_prefix":  # checkpoints saved before transformers 5 (SDXL, OpenAI) + extra tensors
        sd = {"text_model." + k: v for k, v in load_file(tmp_path / "model.safetensors").items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["text_projection.weight"] = torch.randn(32, 64)  # CLIPTextModelWithProjection: unused by the features
        save_file(sd, tmp_path / "model.safetensors")
    enc = encoders.load_text_encoder(str(tmp_path))
    ids = hf_ids(tmp_path, TINY_CAPTIONS)
    assert torch.equal(enc.tokenizer(TINY_CAPTIONS), ids)
    assert ids[0, -1] == V - 1  # HF family: padded with its pad_token, here <|endoftext|>
    with torch.no_grad():
        out, ref_out = enc(TINY_CAPTIONS), ref(input_ids=ids).last_hidden_state
    assert out.shape == (len(TINY_CAPTIONS), 77, 64) and (enc.dim, enc.max_len, enc.name) == (64, 77, str(tmp_path))
    assert max_diff(out, ref_out) < TOL


def open_clip_state_dict(hf_sd, embed_dim=32):
    """HF CLIPTextModel weights renamed the way open_clip saves a CLIP model (plus image tower and projections)."""
    sd = {"token_embedding.weight": hf_sd["embeddings.token_embedding.weight"],
          "positional_embedding": hf_sd["embeddings.position_embedding.weight"],
          "ln_final.weight": hf_sd["final_layer_norm.weight"], "ln_final.bias": hf_sd["final_layer_norm.bias"],
          "text_projection": torch.randn(64, embed_dim), "logit_scale": torch.tensor(4.6),
          "visual.conv1.weight": torch.randn(8, 3, 4, 4), "visual.proj": torch.randn(8, embed_dim)}
    i = 0
    while f"encoder.layers.{i}.layer_norm1.weight" in hf_sd:
        h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            sd[o + "attn.in_proj_" + w] = torch.cat([hf_sd[h + f"self_attn.{p}_proj.{w}"] for p in "qkv"])  # fused
            sd[o + "attn.out_proj." + w] = hf_sd[h + "self_attn.out_proj." + w]
            sd[o + "ln_1." + w], sd[o + "ln_2." + w] = hf_sd[h + "layer_norm1." + w], hf_sd[h + "layer_norm2." + w]
            sd[o + "mlp.c_fc." + w], sd[o + "mlp.c_proj." + w] = hf_sd[h + "mlp.fc1." + w], hf_sd[h + "mlp.fc2." + w]
        i += 1
    return sd


def write_open_clip_repo(folder, ref, act, fmt):
    V = write_tiny_vocab(folder)
    cfg = {"model_cfg": {"embed_dim": 32, "quick_gelu": act == "quick_gelu",
                         "vision_cfg": {"image_size": 32, "layers": 1, "width": 8, "patch_size": 4},
                         "text_cfg": {"context_length": 77, "vocab_size": V, "width": 64, "heads": 4, "layers": 2}},
           "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    sd = open_clip_state_dict({k: v.contiguous() for k, v in ref.state_dict().items()})
    if fmt == "bin":
        torch.save(sd, folder / "open_clip_pytorch_model.bin")
    else:
        save_file(sd, folder / "open_clip_model.safetensors")
    return V


def open_clip_padded(ids, eot):
    """HF ids (padded with <|endoftext|>) re-padded with 0 after the first end token, as open_clip pads."""
    after_eot = torch.cumsum(ids == eot, dim=1) > 0
    pad = torch.cat([torch.zeros_like(after_eot[:, :1]), after_eot[:, :-1]], dim=1)
    return ids.masked_fill(pad, 0)


@pytest.mark.parametrize("act,fmt", [("quick_gelu", "bin"), ("gelu", "safetensors")])
def test_open_clip_layout(act, fmt, tmp_path):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    V = write_tiny_vocab(tmp_path / "hf")
    ref = tiny_clip(act, V)
    write_open_clip_repo(tmp_path / "oc", ref, act, fmt)
    enc = encoders.load_text_encoder(str(tmp_path / "oc"))
    ids = open_clip_padded(hf_ids(tmp_path / "hf", TINY_CAPTIONS), eot=V - 1)
    assert torch.equal(enc.tokenizer(TINY_CAPTIONS), ids) and ids[0, -1] == 0  # open_clip family pads with 0
    with torch.no_grad():
        assert max_diff(enc(TINY_CAPTIONS), ref(input_ids=ids).last_hidden_state) < TOL
    # the activation comes from the config: the other one gives different features
    cfg_path = tmp_path / "oc" / "open_clip_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_cfg"]["quick_gelu"] = act != "quick_gelu"
    cfg_path.write_text(json.dumps(cfg))
    with torch.no_grad():
        assert max_diff(encoders.load_text_encoder(str(tmp_path / "oc"))(TINY_CAPTIONS), enc(TINY_CAPTIONS)) > 1e-3


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_full_size_text_layouts(act):
    """DFN5B ViT-H-14-378 text tower (MicroDiT's text encoder) in both layouts, on the meta device: every name
    and shape fits."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                      num_attention_heads=16, hidden_act=act)
    with torch.device("meta"):
        hf_sd = transformers.CLIPTextModel(cfg).state_dict()
        ours = encoders.CLIPTextTransformer(width=1024, heads=16, layers=24, mlp_width=4096, act=act)
    for sd in (encoders.hf_to_open_clip(hf_sd), open_clip_state_dict(hf_sd, embed_dim=1024)):
        sd = {k: v for k, v in sd.items() if not k.startswith(encoders._UNUSED)}
        load_state_dict(ours, sd, "meta", assign=True)
    D = 1024  # closed form: embeddings, 24 blocks of (12 D^2 + 13 D) (4x MLP, biases, two LayerNorms), ln_final
    assert sum(p.numel() for p in ours.parameters()) == 49408 * D + 77 * D + 24 * (12 * D * D + 13 * D) + 2 * D


def test_text_loader_errors(tmp_path):
    V = write_tiny_vocab(tmp_path)
    ref = tiny_clip("quick_gelu", V)
    ref.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["encoder.layers.1.self_attn.k_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing .*transformer\.resblocks\.1\.attn\.in_proj_weight.*"
                                         r"unexpected .*encoder\.layers\.1\.self_attn\.q_proj\.weight"):
        encoders.load_text_encoder(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_act="relu")))
    with pytest.raises(ValueError, match="relu"):
        encoders.load_text_encoder(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        encoders.load_text_encoder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such local folder or Hub repo"):
        encoders.load_text_encoder(str(tmp_path / "does" / "not" / "exist"))


class NotATensor:
    pass


def test_bin_files_load_tensors_only(tmp_path):
    torch.save({"w": torch.zeros(2), "obj": NotATensor()}, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="x.bin: not a plain tensor state dict.*[Ww]eights only load failed"):
        read_weights(str(tmp_path / "x.bin"))

# -----------------------------------------------------------------------------
# Tokenizer vs HF CLIPTokenizer and open_clip's SimpleTokenizer on the real CLIP vocabulary


@pytest.fixture(scope="module")
def bpe_path():
    """open_clip_torch ships the CLIP vocabulary (bpe_simple_vocab_16e6.txt.gz); find it without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    path = spec and os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    if not path or not os.path.exists(path):
        pytest.skip("open_clip_torch not installed (pip install --no-deps open_clip_torch) : no CLIP vocabulary")
    return path


@pytest.fixture(scope="module")
def vocab_dir(bpe_path, tmp_path_factory):
    """vocab.json + merges.txt in Hugging Face's layout, derived from the open_clip file."""
    folder = tmp_path_factory.mktemp("clip_vocab")
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:48895]  # line 0 is a header; CLIP uses 49152 - 256 - 2 merges
    units = list(encoders._byte_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(vocab_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(vocab_dir))  # pad <|endoftext|>: a pad "!" would make every
    # "!" in a caption a special token in HF's tokenizer, so HF is compared with end-token padding


@pytest.fixture(scope="module")
def open_clip_tokenizer(bpe_path):
    """open_clip's own SimpleTokenizer (with ftfy and regex), loaded from its file: the package needs torchvision."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    path = os.path.join(os.path.dirname(bpe_path), "tokenizer.py")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(bpe_path)


LONG = ("A highly detailed digital painting of a majestic snow-capped mountain range at sunrise, with a crystal clear "
        "lake in the foreground reflecting pink and orange clouds, pine trees along the shore, a small wooden cabin "
        "with smoke rising from its chimney, a red canoe tied to a dock, birds flying overhead, dramatic lighting, "
        "volumetric fog, 8k resolution, trending on artstation, by a famous landscape artist")
CAPTIONS = [  # 63 strings: punctuation, numbers, unicode, whitespace runs, over-long captions
    "a photo of a cat", "A Photo Of A CAT", "", "   ", "a", "hello, world!", "the the the the",
    "What's up? I'm fine; you're great, they've gone, we'll see, he'd go", "It'S JOHN'S car, DON'T", "rock'n'roll",
    "'s 't 're at the start", "quotes \"double\" and 'single'", "sentence one. sentence two! sentence three?",
    "punctuation!!! ??? ... --- ___ *** ((())) [[]] {{}} <<>> ~~~", "hyphen-ated words and under_scored_names",
    "backslash \\ pipe | caret ^ backtick ` tilde ~", "$100, 50% off, #1 best, @user, a+b=c, x*y/z",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 12345678901234567890", "3.14159 and -2.5e10 and 1,000,000",
    "2024-01-01 at 12:30pm, 4K 60fps, 1080p, 3D", "C++ and C# and F# programming",
    "file_name.tar.gz and path/to/file.txt",
    "email someone@example.com or https://example.com/path?q=1&r=2#frag",
    "tabs\tand\nnewlines\r\nand   multiple     spaces", "  leading and trailing spaces  ", "Tab\tseparated\tvalues",
    "non-breaking\u00a0space and\u2003em space\u2009thin", "zero\u200bwidth space and soft\u00adhyphen",
    "café naïve résumé façade jalapeño", "ÀÉÎÕÜ UPPERCASE ACCENTS", "decomposed e\u0301 versus \u00e9",
    "straße GROSSE Straße",
    "İstanbul and DİYARBAKIR", "Ελληνικά γράμματα", "Русский текст с заглавными БУКВАМИ", "日本語のテキスト、句読点。",
    "中文字符测试 标点符号", "한국어 텍스트", "العربية نص", "עברית טקסט", "हिन्दी पाठ", "ภาษาไทย", "ქართული ენა",
    "mixed 日本 and english words", "emoji 😀🎉👍🏽 and ❤️", "flag 🇺🇸 family 👨\u200d👩\u200d👧 keycap 1️⃣",
    "superscripts x² y³ and fractions ½ ¾ ⅞", "roman numerals Ⅻ ⅷ and circled ① ⑳",
    "arabic-indic digits ٣٤٥ and devanagari ४५",
    "math ∑ ∫ √ ∞ ≠ ≤ ≥ ± × ÷", "currency € £ ¥ ₹ ₩ ₿", "dashes – — ellipsis … bullet • section § pilcrow ¶",
    "supercalifragilisticexpialidocious antidisestablishmentarianism", "x" * 300, "MiXeD cAsE wOrDs",
    "a very long caption " * 30, "word " * 100, LONG, LONG.upper(), "0123456789" * 20, "!?" * 100, "😀" * 80,
    "ALL CAPS SENTENCE WITH NUMBERS 2024",
]
OPEN_CLIP_ONLY = [  # ftfy fixes that open_clip applies and HF does not; Python's final-sigma rule (HF lowers Σ to σ)
    "ΣΊΣΥΦΟΣ ΟΔΟΣ", "中文字符测试，标点符号！", "‘It’s’ a “quoted” word", "Tom &amp; Jerry &lt;3 &quot;hi&quot; &#39;x&#39;",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３！",
    "ﬁne ﬂower ﬀ ﬅ Ĳssel", "ideographic\u3000space and ｶﾀｶﾅ", "bell\x07 and bom\ufeff and \x93smart\x94",
]


def test_enough_caption_strings():
    assert len(CAPTIONS) >= 50 and any(len(c.split()) > 80 for c in CAPTIONS)


@pytest.mark.parametrize("source", ["hf_files", "bpe_file"])
def test_tokenizer_matches_references(source, bpe_path, vocab_dir, hf_tokenizer, open_clip_tokenizer):
    if source == "hf_files":  # the run-time path: a repo's vocab.json + merges.txt
        ours = encoders.load_tokenizer(str(vocab_dir), family="open_clip")
    else:
        ours = encoders.CLIPTokenizer.from_bpe_file(bpe_path)
    assert (ours.sot, ours.eot, ours.pad_id, len(ours.vocab)) == (49406, 49407, 0, 49408)
    ids = ours(CAPTIONS + OPEN_CLIP_ONLY)
    ref = open_clip_tokenizer(CAPTIONS + OPEN_CLIP_ONLY)  # pads with 0
    for i, text in enumerate(CAPTIONS + OPEN_CLIP_ONLY):
        assert torch.equal(ids[i], ref[i]), f"open_clip differs on {text!r}"
    ours.pad_id = ours.eot  # HF pads with its pad_token, <|endoftext|> here
    hf = hf_tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for i, (text, row) in enumerate(zip(CAPTIONS, ours(CAPTIONS))):
        assert torch.equal(row, hf[i]), f"HF differs on {text!r}"
    long = ids[CAPTIONS.index("word " * 100)]
    assert long[-1] == 49407 and (long != 0).all()  # truncated to 77 with the end token kept


def all_code_points(exclude=()):
    """Every assigned, non-surrogate, non-private code point (Python's tables), shuffled into 24-character strings."""
    cps = [cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) not in ("Cn", "Cs", "Co")
           and cp not in exclude]
    random.Random(0).shuffle(cps)
    return ["".join(map(chr, cps[i:i + 24])) for i in range(0, len(cps), 24)]


def test_split_regex_matches_regex_module_on_all_code_points():
    regex = pytest.importorskip("regex")
    clip = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")  # CLIP's, without specials
    # on text whose whitespace runs are single spaces, as in the tokenizer (`re` counts \x1c-\x1f as whitespace)
    text = " ".join(" ".join(all_code_points()).split())
    for s in (text, text.lower()):
        assert encoders._split_regex().findall(s) == clip.findall(s)


def test_tokenizer_on_all_code_points(vocab_dir, hf_tokenizer, open_clip_tokenizer):
    ours = encoders.load_tokenizer(str(vocab_dir))
    # U+0345 (combining iota subscript) is the one exception: open_clip compiles its pattern with IGNORECASE and the
    # regex module then drops this character (it case-folds to a letter); HF's tokenizer and ours keep it.
    for s in all_code_points(exclude={0x345}):
        assert ours.encode(s) == open_clip_tokenizer.encode(s), f"open_clip differs on {s!r}"
    # HF applies no ftfy fixes; on every character those fixes leave alone, HF agrees too
    for s in all_code_points(exclude=encoders._FTFY_LITE.keys()):
        assert ours.encode(s) == hf_tokenizer(s, add_special_tokens=False).input_ids, f"HF differs on {s!r}"

# -----------------------------------------------------------------------------
# Loading through huggingface_hub from a local cache laid out like the Hub, with HF_HUB_OFFLINE=1

HUB_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
sys.path.insert(0, sys.argv[1])
import encoders
x = load_file(sys.argv[2])["x"]
captions = ["the cat", "a photo of THE dog!", ""]
vae = encoders.load_vae("test/tiny-sdxl")  # <repo>/vae
hf = encoders.load_text_encoder("test/tiny-sdxl", subfolder="text_encoder")  # tokenizer from <repo>/tokenizer
oc = encoders.load_text_encoder("test/tiny-openclip")
with torch.no_grad():
    out = dict(latent=vae.encode(x, sample=False), hf=hf(captions), hf_ids=hf.tokenizer(captions),
               oc=oc(captions), oc_ids=oc.tokenizer(captions))
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
try:
    encoders.load_vae("test/not-in-cache")
except FileNotFoundError as e:
    print(e)
"""


def test_load_from_hub_cache_offline(tmp_path):
    V = write_tiny_vocab(tmp_path / "vocab")
    vae_ref, clip_ref = tiny_diffusers_vae("sdxl_like"), tiny_clip("quick_gelu", V)
    sdxl = tmp_path / "src_sdxl"  # a pipeline repo: vae/, text_encoder/, tokenizer/ (pad "!" like SDXL's tokenizer_2)
    vae_ref.save_pretrained(sdxl / "vae")
    clip_ref.save_pretrained(sdxl / "text_encoder")
    write_tiny_vocab(sdxl / "tokenizer", pad_token="!")
    write_open_clip_repo(tmp_path / "src_oc", clip_ref, "quick_gelu", "bin")
    cache = tmp_path / "hub"
    hub_cache(cache, "test/tiny-sdxl", sdxl)
    hub_cache(cache, "test/tiny-openclip", tmp_path / "src_oc")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    save_file({"x": x}, tmp_path / "x.safetensors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"))
    run = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(ROOT), str(tmp_path / "x.safetensors"),
                          str(tmp_path / "out.safetensors")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "test/not-in-cache" in run.stdout and "HF_HUB_OFFLINE" in run.stdout  # clear error, offline hint
    out = load_file(tmp_path / "out.safetensors")
    ids = hf_ids(tmp_path / "vocab", ["the cat", "a photo of THE dog!", ""])
    hf_pad0 = open_clip_padded(ids, eot=V - 1)  # the SDXL-style tokenizer_config pads with "!" = id 0
    assert torch.equal(out["hf_ids"], hf_pad0) and torch.equal(out["oc_ids"], hf_pad0)
    with torch.no_grad():
        assert max_diff(out["latent"], vae_ref.encode(x).latent_dist.mean * 0.13025) < TOL
        ref = clip_ref(input_ids=hf_pad0).last_hidden_state
    assert max_diff(out["hf"], ref) < TOL and max_diff(out["oc"], ref) < TOL
