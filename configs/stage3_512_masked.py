# MicroDiT_XL_2, stage 3 of 4 of the MicroDiT paper's training recipe (micro_diffusion/configs/res_512_pretrain.yaml):
# 512px, 75% masked, 50K steps from stage 2's weights only.
#   torchrun --standalone --nproc_per_node=8 train.py configs/stage3_512_masked.py
# At 512px the latent is 64x64: 1024 patches, 256 kept. pos_interp_scale 2 puts the patch coordinates at
# 0, 0.5, ..., 31.5, the range the model saw at 256px. pos_embed is a buffer computed from these two numbers, so it
# is recomputed rather than loaded (the released config ignores the checkpoint's dit.pos_embed). A fresh AdamW and a
# 500-step warm-up absorb the change of resolution.
model = "MicroDiT_XL_2"
latent_size = 64
pos_interp_scale = 2.0
dataset = "shards"
data_dir = "data_cache/latents/512"
out_dir = "out/stage3_512_masked"
resume = "auto"
init_from = "out/stage2_256_unmasked"     # weights only (init_state False): step 0, fresh optimizer
num_workers = 2
data_lanes = 8

P_mean, P_std, sigma_data = 0.0, 0.6, 0.9  # more noise at 512px: a given sigma hides less of a larger image
mask_ratio = 0.75
unmasked_steps = 0                        # the recipe trains unmasked in a stage of its own
caption_dropout = 0.1

# The released micro-batch at 512px is 32, so 2048 = 8 GPUs x 32 x 8 accumulation.
batch_size = 2048
micro_batch = 32
max_steps = 50_000
lr = 8e-5
lr_schedule = "constant"
warmup_steps = 500
beta1, beta2, eps, weight_decay = 0.9, 0.999, 1e-8, 0.1
grad_clip = 0.5
# The paper averages the weights at 512px, 0.99975 here (a ~4K-step horizon); the released config lists that EMA, but
# micro_diffusion's train.py never applies it ("Algorithm ema not supported"). Every checkpoint holds both
# model.safetensors (raw) and ema.safetensors, so both can be evaluated.
ema_decay = 0.99975

bf16 = True
compile = True
log_every = 100
ckpt_every = 1000                         # 1069 GFLOPs per image: ~0.7 s a step at 40% MFU, ~12 minutes
keep_ckpts = 2
eval_n = 0
val_n = 1024
