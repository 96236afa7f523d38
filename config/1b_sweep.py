# The study at the paper's scale (config/1b.py) on one node of 8 GPUs:
# python sweep.py config/1b_sweep.py
#
# Expected cost per seed, from DESIGN.md's measured 52.2k tokens/s per H200 (compiled, 1.64B
# params, 2048 context), assuming DDP over 8 GPUs keeps that rate per GPU:
#   one step = 256 rows x 2048 = 524,288 tokens
#   text run:      53,400 steps x 524,288 = 28.0B tokens / 52.2k tok/s = 536k GPU-s =   149 GPU-h
#   image phase:   the same 28.0B tokens per cell (image_iters = max_iters)  =           149 GPU-h
#                  (the 12-layer ViT over 6 x 256 patches adds ~6% to an image row, so at most
#                  +2% at ratio 0.3: left out); 6 fractions x 2 ratios = 12 cells = 1,788 GPU-h
#   fine-tuning:   665k conversations (LLaVA-665k) x 2 epochs x 2,048 positions (config/1b_sft.py
#                  pads every conversation to seq_len) = 2.72B positions / 52.2k
#                  = 52k GPU-s = 14.5 GPU-h per cell, x 12                   =     174 GPU-h
#   evaluation:    about 1 GPU-h per cell (one process; a VQAv2-sized suite) =      12 GPU-h
#   total per seed                                                          ~ 2,120 GPU-h
# = about 265 hours (11 days) on one 8 x H200 node; each extra seed costs as much again.
# Fine-tuning with --finetune_args="('--seq_len=1024',)" would halve its share if the
# conversations fit (256 image tokens + the chat).
# While evaluate.py runs on one GPU the other seven wait: ~12 node-hours per seed of idle GPUs
# unless evaluation runs elsewhere. A cheaper first look: --ratios="(0.1,)" (about half), or
# --fracs="(0.4, 0.8, 1.0)".
# Disk: a checkpoint with its AdamW state is ~21 GB (1.75B params x 12 bytes); the text run
# keeps 7 and each cell 2 (image phase, fine-tuning): ~650 GB per seed. branch_point_ckpt is off
# here, as the test of the shared prefix it serves would add 21 GB per cell.
sweep_dir = "out/1b_sweep"
data_dir = ""  # each stage's own: config/1b.py's text and captions, config/1b_sft.py's conversations
pretrain_config = "config/1b.py"
sft_config = "config/1b_sft.py"
fracs = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
ratios = (0.1, 0.3)
seeds = (1337,)
pretrain_args = ()
finetune_args = ()
evaluate_args = ("--data_dir=data/llava",)  # eval_<task>.json + eval_images.npy, next to the conversations
nproc = 8
parallel = 1
branch_point_ckpt = False
