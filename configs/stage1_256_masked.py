# MicroDiT_XL_2, stage 1 of 4 of the MicroDiT paper's training recipe (arXiv 2407.15811; the released
# micro_diffusion/configs/res_256_pretrain.yaml): 256px, 75% of the patches masked after the patch-mixer, 250K steps.
#   python data.py prepare --input <image-caption pairs> --out data_cache/latents   # -> latents/256 and /512
#   torchrun --standalone --nproc_per_node=8 train.py configs/stage1_256_masked.py
# After a preemption, the same command resumes the newest complete checkpoint (resume = "auto").
model = "MicroDiT_XL_2"                   # 1.16B parameters; latent 32x32 -> 256 patches, 64 kept at mask 0.75
dataset = "shards"
data_dir = "data_cache/latents/256"
out_dir = "out/stage1_256_masked"
resume = "auto"
num_workers = 2                           # per rank (and lane), as in the released configs
data_lanes = 8                            # 8 shard streams fill each global batch: the data order is the same on
                                          # 1, 2, 4 or 8 GPUs, so a run can resume on a smaller machine (16 for 2 nodes)

# EDM at 256px (Karras et al. 2022, Table 1; the values are res_256_pretrain.yaml's): ln(sigma) ~ N(-0.6, 1.2^2),
# sigma_data 0.9; 10% of captions dropped for guidance
P_mean, P_std, sigma_data = -0.6, 1.2, 0.9
mask_ratio = 0.75
unmasked_steps = 0                        # the recipe trains unmasked in a stage of its own
caption_dropout = 0.1

# 2048 images a step = 8 GPUs x 256 micro-batch x 1 accumulation (4 GPUs: 2 accumulation; 1 GPU: 8).
# 256 is the released config's micro-batch on 80 GB H100s, which sharded gradients and optimizer state; plain DDP
# keeps ~19 GB of fp32 weights, gradients and AdamW moments on every GPU: lower micro_batch if memory runs out.
batch_size = 2048
micro_batch = 256
max_steps = 250_000                       # 512M images, ~14 passes over the 37M-image mix
lr = 2.4e-4
lr_schedule = "cosine"
warmup_steps = 2500
min_lr_ratio = 0.33                       # the cosine ends at 0.8e-4: the lr of every later stage
beta1, beta2, eps, weight_decay = 0.9, 0.999, 1e-8, 0.1
grad_clip = 0.25
ema_decay = 0.0                           # the paper averages weights only at 512px

bf16 = True                               # autocast; bf16 needs no loss scaling
compile = True
log_every = 100
# 282 training GFLOPs per image (model.flops_per_image): 0.18 s a step at 40% MFU on 8 H100s, so a checkpoint
# every ~3 minutes bounds what a hard kill (no SIGTERM) can cost; a SIGTERM always gets its own checkpoint.
ckpt_every = 1000
keep_ckpts = 2
eval_n = 0                                # held-out prompts exist for the shapes dataset only
val_n = 1024                              # validation loss on data_dir/val, when there is one
