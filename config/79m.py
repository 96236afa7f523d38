# The study's small model (Keh et al. 2025): 8 layers, d_model 512, 4 heads, qk-norm, peak LR
# 3e-3 with warmup 400, global batch 512 x 2048 tokens, the same frozen SigLIP encoder as 1b.py.
# Our vocabulary is cl100k_base (padded to 100,352), so the embedding and head add 103M
# parameters to the 25M in the blocks (the study's count differs).
# torchrun --standalone --nproc_per_node=8 pretrain.py config/79m.py
out_dir = "out/79m"
data_dir = "data/dclm"  # text shards: python data/dclm/prepare.py (docs/gpu_study.md)
train_captions = "../cc3m/train_caption*.bin"  # image-caption shards, relative to data_dir
val_captions = "../cc3m/val_caption*.bin"  # python data/cc3m/prepare.py
n_layer = 8
n_head = 4
n_kv_head = 4
n_embd = 512
ffn_hidden = 1408
qk_norm = True
seq_len = 2048
vision_encoder = "siglip"
vision_weights = "google/siglip-base-patch16-224"
vision_revision = "7fd15f0689c79d79e38b1c2e2e2370a7bf2761ed"
freeze_vision = True
image_size = 224
patch_size = 16  # 14 x 14 = 196 image tokens per image
caption_len = 64  # 7 samples of 196 + 64 + 1 = 261 positions per image-caption row (1,827 of 2,048)
batch_size = 32
grad_accum = 16  # 16 x 32 = 512 rows per step over all ranks
max_iters = 30_000  # 31B text tokens
warmup_iters = 400
learning_rate = 3e-3
min_lr = 3e-4
vision_start_frac = 0.8
image_iters = 7_500
image_ratio = 0.1
rewarm_lr = 1e-3
rewarm_iters = 400
log_interval = 10
eval_interval = 500
ckpt_interval = 1000
compile = True  # torch.compile the model (the scripts default to eager, for the short CPU toy runs)
