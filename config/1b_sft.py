# Instruction tuning of a 1B pretraining checkpoint, LLaVA-style (global batch 128 conversations,
# peak LR 2e-5, 3% warmup, 2 epochs; the study found 2-4 epochs best).
# torchrun --standalone --nproc_per_node=8 finetune.py config/1b_sft.py --init_from=out/1b/ckpt.pt
out_dir = "out/1b_sft"
init_from = "out/1b/ckpt.pt"
data_dir = "data/cauldron"  # conversation shards: python data/cauldron/prepare.py
epochs = 2
batch_size = 8  # per GPU
grad_accum = 16  # 16 x 8 = 128 conversations per step over all ranks
seq_len = 2048
# One conversation a row, as the study (LLaVA's recipe): a step is 128 conversations. Packing
# (finetune.py's pack_conversations) would fit several into 2048 positions and change that.
pack_conversations = False
# The SigLIP tower stays frozen, as in the study's codebase (Prismatic): the projector and the
# decoder train.
freeze_vision = True
text_rows = 0  # conversations only, as the study
learning_rate = 2e-5
min_lr = 2e-6
warmup_frac = 0.03
log_interval = 10
eval_interval = 500
ckpt_interval = 1000
compile = True  # torch.compile the model (the scripts default to eager, for the short CPU toy runs)
