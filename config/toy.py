# The toy world on a CPU: a 4-layer, 256-wide model, a few minutes on 2 cores.
# python data/toyworld/prepare.py && python pretrain.py config/toy.py
out_dir = "out/toy"
data_dir = "data/toyworld"
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 256
ffn_hidden = 704
seq_len = 256
image_size = 32
patch_size = 8  # 16 image tokens per image
vit_depth = 0
caption_len = 32
batch_size = 16
grad_accum = 1
max_iters = 400
warmup_iters = 40
learning_rate = 3e-3
min_lr = 3e-4
vision_start_frac = 0.8
# The toy's patch encoder starts from scratch (the study's is a pretrained SigLIP), so it needs
# a few thousand captions to ground at all: 200 image steps at half image rows show it about
# 8,000; 100 steps at a fifth (1,600 captions) left the vision tasks at chance.
image_iters = 200
image_ratio = 0.5
log_interval = 20
eval_interval = 100
ckpt_interval = 100
