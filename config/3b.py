# A 3B decoder for a fork that asks whether the study's answer holds one size up. Not a size
# the study trained: its shape follows the usual 3B recipe (32 layers of 2560, 20 heads of 128,
# SwiGLU 6912), and its learning rate is a guess below the 1.4B model's 1e-2 (tune it first).
# DDP would need 49.3 GB per GPU for weights, gradients and AdamW before any activation, so it
# shards them with FSDP2: 6.2 GB per GPU on 8 GPUs (docs/gpu_study.md, "Past one GPU's memory").
# torchrun --standalone --nproc_per_node=8 pretrain.py config/1b.py config/3b.py
out_dir = "out/3b"
n_layer = 32
n_head = 20
n_kv_head = 20
n_embd = 2560
ffn_hidden = 6912
learning_rate = 3e-3
batch_size = 4  # per GPU
grad_accum = 64  # 64 x 4 = 256 rows per step over all ranks, as config/1b.py
max_iters = 116_000  # 61B text tokens (about 20 per parameter)
image_iters = 116_000
parallel = "fsdp"
