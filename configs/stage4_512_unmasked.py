# MicroDiT_XL_2, stage 4 of 4 of the MicroDiT paper's training recipe (micro_diffusion/configs/res_512_finetune.yaml):
# 512px without masking, steps 50K -> 55K, continuing stage 3.
#   torchrun --standalone --nproc_per_node=8 train.py configs/stage4_512_unmasked.py
# Like stage 2, the released recipe carries the full state over (weights, EMA, AdamW moments, step count).
model = "MicroDiT_XL_2"
latent_size = 64
pos_interp_scale = 2.0
dataset = "shards"
data_dir = "data_cache/latents/512"
out_dir = "out/stage4_512_unmasked"
resume = "auto"
init_from = "out/stage3_512_masked"
init_state = True
num_workers = 2
data_lanes = 8

P_mean, P_std, sigma_data = 0.0, 0.6, 0.9
mask_ratio = 0.0
caption_dropout = 0.1

# All 1024 tokens: the released micro-batch is 16, so 2048 = 8 GPUs x 16 x 16 accumulation.
batch_size = 2048
micro_batch = 16
max_steps = 55_000                        # the step count continues from 50K: 5K steps here
lr = 8e-5
lr_schedule = "constant"
warmup_steps = 0
beta1, beta2, eps, weight_decay = 0.9, 0.999, 1e-8, 0.1
grad_clip = 0.5
ema_decay = 0.9975                        # a ~400-step horizon for a 5K-step stage (paper; see stage 3)

bf16 = True
compile = True
log_every = 100
ckpt_every = 500                          # 3003 GFLOPs per image: ~1.9 s a step at 40% MFU, ~16 minutes
keep_ckpts = 2
eval_n = 0
val_n = 1024
