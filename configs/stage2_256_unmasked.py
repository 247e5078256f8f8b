# MicroDiT_XL_2, stage 2 of 4 of the MicroDiT paper's training recipe (micro_diffusion/configs/res_256_finetune.yaml):
# 256px without masking, steps 250K -> 280K, continuing stage 1.
#   torchrun --standalone --nproc_per_node=8 train.py configs/stage2_256_unmasked.py
# The released recipe carries stage 1's full state over (weights, AdamW moments, step count) with a new lr:
# init_from + init_state. Once this stage has a checkpoint of its own, resume = "auto" takes over.
model = "MicroDiT_XL_2"
dataset = "shards"
data_dir = "data_cache/latents/256"
out_dir = "out/stage2_256_unmasked"
resume = "auto"
init_from = "out/stage1_256_masked"       # its newest checkpoint
init_state = True
num_workers = 2
data_lanes = 8

P_mean, P_std, sigma_data = -0.6, 1.2, 0.9
mask_ratio = 0.0                          # every patch again: sampling never masks, so the last steps do not either
caption_dropout = 0.1

# Four times the backbone tokens of stage 1: the released micro-batch drops to 64, so 2048 = 8 GPUs x 64 x 4.
batch_size = 2048
micro_batch = 64
max_steps = 280_000                       # the step count continues from 250K: 30K steps here
lr = 8e-5                                 # where stage 1's cosine ended
lr_schedule = "constant"
warmup_steps = 0
beta1, beta2, eps, weight_decay = 0.9, 0.999, 1e-8, 0.1
grad_clip = 0.25
ema_decay = 0.0

bf16 = True
compile = True
log_every = 100
ckpt_every = 1000                         # 714 GFLOPs per image: ~0.46 s a step at 40% MFU, ~8 minutes
keep_ckpts = 2
eval_n = 0
val_n = 1024
