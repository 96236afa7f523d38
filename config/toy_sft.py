# Instruction tuning on the toy world's image conversations, a few minutes on 2 CPU cores.
# python finetune.py config/toy_sft.py
out_dir = "out/toy_sft"
init_from = "out/toy/ckpt.pt"
data_dir = "data/toyworld"
# Two epochs learn colour and counting but leave the yes/no task (exists_yn) at chance: its answer
# must compare the asked colour and shape with every shape in the picture, a skill that appears
# late. Four epochs learn it in the toy sweep's small model (+29 points); this model gained from
# -0.3 to +6.7 (docs/toy_notes.md).
epochs = 4
batch_size = 32
# 8 of each batch's 32 rows are plain pretraining text: chat-only tuning at this learning rate
# took the text tasks from +49 to +4 points (text bits per byte 0.37 -> 3.55), with the same
# vision scores (measured; README).
text_rows = 8
seq_len = 64  # 16 image tokens + the chat; 97% of toy conversations fit, the rest are cut short
learning_rate = 1e-3
min_lr = 1e-4
log_interval = 20
eval_interval = 250
