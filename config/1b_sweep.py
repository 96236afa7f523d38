# The study at the paper's scale (config/1b.py), on one node of 8 GPUs or on a SLURM cluster:
# python sweep.py config/1b_sweep.py --dry_run=True        # the plan and its cost, computed
# python sweep.py config/1b_sweep.py                        # one node, one stage after another
# python sweep.py config/1b_sweep.py --launcher=slurm --partition=gpu --account=myproject
#
# --dry_run computes the cost from the settings below: a stage's tokens / gpu_tokens_per_s. With
# 52.2k tokens/s per GPU (a plain compiled Llama-style decoder of config/1b.py's shape, 1.64B
# parameters at 2048 context, measured on one H200 with torch 2.11; our own model's rate awaits
# bench.py on a GPU) and assuming DDP over 8 GPUs keeps that rate per GPU, it prints per seed:
#   text run:      53,400 steps x 256 rows x 2048 = 28.0B tokens                     149 GPU-h
#   image phase:   the same 28.0B tokens per cell (image_iters = max_iters) x 12  1,788 GPU-h
#                  (the frozen SigLIP-B/16 tower's forward over 7 x 196 patches adds a few
#                  percent to an image row, less at ratio 0.1: left out)
#   fine-tuning:   665k conversations (LLaVA-665k) x 2 epochs x 2,048 positions (config/1b_sft.py
#                  pads every conversation to seq_len) = 2.72B, 14.5 GPU-h per cell    174 GPU-h
#   evaluation:    eval_gpu_hours per cell (a guess for one process, a VQAv2-sized suite) 12 GPU-h
#   total per seed                                                              ~ 2,123 GPU-h
# = about 265 hours (11 days) on one 8 x H200 node; each extra seed costs as much again. On SLURM
# every cell runs at once: about 40 hours per seed on 8-GPU jobs, 21 with --nodes=2.
# Disk: a checkpoint with its AdamW state is 20.1 GB (float32 weights, and AdamW's two moments
# for all but the frozen SigLIP tower); the text run keeps 7 and each cell 2 (image phase,
# fine-tuning): the dry run prints the total. branch_point_ckpt is off here, as the test of the
# shared prefix it serves would add 20 GB per cell.
# Fine-tuning with --finetune_args="('--seq_len=1024',)" would halve its share if the
# conversations fit (196 image tokens + the chat). A cheaper first look: image ratio 0.1 alone,
# 1,136 GPU-h per seed, or only three start fractions of it, 642 GPU-h:
# --axes="{'vision_start_frac': (0.4, 0.8, 1.0), 'image_ratio': (0.1,)}"
sweep_dir = "out/1b_sweep"
data_dir = ""  # each stage's own: config/1b.py's text and captions, config/1b_sft.py's conversations
pretrain_config = "config/1b.py"
sft_config = "config/1b_sft.py"
axes = {"vision_start_frac": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "image_ratio": (0.1, 0.3)}
# The study's fourth variable: fine-tuning epochs, of which the paper tried 1 to 4 (2 to 4 balanced
# the vision and text scores). Each value fine-tunes and evaluates every cell once more, from the
# cell's one image phase: with (1, 2, 4), 609 GPU-h of fine-tuning instead of 174 and 2,582 GPU-h
# per seed in all (the dry run's figures).
# axes["finetune.epochs"] = (1, 2, 4)
seeds = (1337,)
pretrain_args = ()
finetune_args = ()
# the study's benchmarks (python data/benchmarks/prepare.py); they hold no validation text shards
evaluate_args = ("--data_dir=data/benchmarks", "--val_text=")
nproc = 8
cells_at_once = 1
branch_point_ckpt = False
# SLURM: each training job gets `nodes` nodes of `nproc` GPUs; stages longer than time_limit run
# as several jobs (the text run and each image phase take 18.6 hours on 8 GPUs)
nodes = 1
time_limit = "24:00:00"
partition = ""
account = ""
gpu_tokens_per_s = 52_200.0
sft_conversations = 665_000  # LLaVA-665k, for the estimate before its shards exist
eval_gpu_hours = 1.0
