# The study's 1.4B model (Keh et al. 2025): an OpenLM-style decoder with qk-norm, 24 layers,
# d_model 2048, 16 heads of 128, context 2048, peak LR 1e-2 with warmup 5000, global batch
# 256 x 2048 tokens, a frozen pretrained SigLIP encoder with an MLP projector, and a 28B-token
# image phase.
# torchrun --standalone --nproc_per_node=8 pretrain.py config/1b.py
out_dir = "out/1b"
data_dir = "data/dclm"  # text shards: python data/dclm/prepare.py (docs/gpu_study.md)
train_captions = "../cc12m/train_caption*.bin"  # image-caption shards, relative to data_dir
val_captions = "../cc12m/val_caption*.bin"  # python data/cc3m/prepare.py --dataset=cc12m
n_layer = 24
n_head = 16
n_kv_head = 16
n_embd = 2048
ffn_hidden = 5632
qk_norm = True
seq_len = 2048
# SigLIP-B/16 at 224 from the Hub, its second-to-last block feeding the projector; the study's
# ablation, a plain patch projection trained from scratch, is --vision_encoder=patches
# --freeze_vision=False.
vision_encoder = "siglip"
vision_weights = "google/siglip-base-patch16-224"
vision_revision = "7fd15f0689c79d79e38b1c2e2e2370a7bf2761ed"
freeze_vision = True
image_size = 224
patch_size = 16  # 14 x 14 = 196 image tokens per image
caption_len = 64  # 7 samples of 196 + 64 + 1 = 261 positions per image-caption row (1,827 of 2,048)
batch_size = 8  # per GPU; fits an 80 GB card with the fused head
grad_accum = 32  # 32 x 8 = 256 rows per step over all ranks
max_iters = 53_400  # 28B text tokens (about 20 per parameter)
warmup_iters = 5000
learning_rate = 1e-2
min_lr = 3e-4
vision_start_frac = 0.8
image_iters = 53_400  # the study's 28B image-phase tokens
image_ratio = 0.1
# Instruction data in the image phase (the study's third question): add --instruct_ratio=0.05
# --train_chat='../cauldron/train_chat*.bin' (python data/cauldron/prepare.py); each such row
# holds one conversation, padded to seq_len.
rewarm_lr = 3e-3  # the study re-warms to 3e-3 at vision_start_frac = 1.0
rewarm_iters = 1000
log_interval = 10
eval_interval = 1000
ckpt_interval = 1000
compile = True  # torch.compile the model (the scripts default to eager, for the short CPU toy runs)
