# Instruction tuning on the toy world's image conversations, a few minutes on 2 CPU cores.
# python finetune.py config/toy_sft.py
out_dir = "out/toy_sft"
init_from = "out/toy/ckpt.pt"
data_dir = "data/toyworld"
epochs = 2
batch_size = 32
seq_len = 64  # 16 image tokens + the chat; 97% of toy conversations fit, the rest are cut short
learning_rate = 1e-3
min_lr = 1e-4
log_interval = 20
eval_interval = 250
