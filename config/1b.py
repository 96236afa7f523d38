# The study's 1.4B model (DESIGN.md): 24 layers, d_model 2048, 16 heads of 128, context 2048,
# warmup 5000, global batch 256 x 2048 tokens, and a 28B-token image phase.
# torchrun --standalone --nproc_per_node=8 pretrain.py config/1b.py
out_dir = "out/1b"
data_dir = "data/dclm"  # text shards: python data/dclm/prepare.py (README, "Running the real study")
train_captions = "../cc12m/train_caption*.bin"  # image-caption shards, relative to data_dir
val_captions = "../cc12m/val_caption*.bin"  # python data/cc3m/prepare.py --dataset=cc12m
n_layer = 24
n_head = 16
n_kv_head = 16
n_embd = 2048
ffn_hidden = 5632
seq_len = 2048
image_size = 224
patch_size = 14  # 256 image tokens per image
vit_depth = 12
vit_width = 768
vit_heads = 12
caption_len = 64  # 6 samples of 256 + 64 + 1 positions per image-caption row
batch_size = 8  # per GPU; fits an 80 GB card with the fused head
grad_accum = 32  # 32 x 8 = 256 rows per step over all ranks
max_iters = 53_400  # 28B text tokens (about 20 per parameter)
warmup_iters = 5000
# The study's peak of 1e-2 comes with OpenLM's qk-norm, which this decoder does not have;
# 3e-3 is the safer peak without it.
learning_rate = 3e-3
min_lr = 3e-4
vision_start_frac = 0.8
image_iters = 53_400  # the study's 28B image-phase tokens
image_ratio = 0.1
rewarm_lr = 3e-3  # the study re-warms to 3e-3 at vision_start_frac = 1.0
rewarm_iters = 1000
log_interval = 10
eval_interval = 1000
ckpt_interval = 1000
