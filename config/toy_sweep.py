# The whole study on the toy world, on a 2-core CPU in about 12 minutes (estimated below):
# python data/toyworld/prepare.py && python sweep.py config/toy_sweep.py
# One text run, then 6 start fractions x 1 image ratio = 6 cells of image phase + fine-tuning
# + evaluation. config/toy.py and config/toy_sft.py (a single run of each takes minutes) are
# shrunk below: a 2-layer, 128-wide model; 300 text steps of 16 x 128 tokens and a 200-step
# image phase; toy_sft's four epochs on 64-token rows (a toy conversation is 16 image tokens
# and, for 97% of them, at most 48 chat tokens), in batches of 32 at twice its learning rate.
# Fine-tuning is where the vision tasks are learnt: one epoch left them at +7 points above
# chance on average, two at +15 (start fraction 0.8, ratio 0.3), with the yes/no task at chance;
# four epochs learn it too (+29; docs/toy_notes.md). Four epochs double the fine-tuning, the
# bulk of a cell: with two ratios a seed measured 13 min 20 s (a 44 s text run, then 6 pairs of
# cells at 2 min 15 s, 90 s of it fine-tuning), so twelve cells would now take about 23 minutes
# and six, one ratio (0.3), about 12 (an estimate, not measured).
sweep_dir = "out/toy_sweep"
data_dir = "data/toyworld"
pretrain_config = "config/toy.py"
sft_config = "config/toy_sft.py"
fracs = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
ratios = (0.3,)
seeds = (1337,)
pretrain_args = ("--n_layer=2", "--n_head=4", "--n_kv_head=4", "--n_embd=128", "--ffn_hidden=352", "--seq_len=128",
                 "--max_iters=300", "--warmup_iters=30", "--image_iters=200", "--rewarm_iters=20",
                 "--log_interval=10", "--eval_interval=100", "--ckpt_interval=1000")
finetune_args = ("--epochs=4", "--batch_size=32", "--seq_len=64", "--learning_rate=2e-3", "--min_lr=2e-4",
                 "--log_interval=20", "--eval_interval=1000", "--ckpt_interval=1000")
evaluate_args = ()
nproc = 1
# Two cells at once with one thread each: a training step of this model takes ~105 ms on one
# thread and ~70 ms on two, so two one-thread runs do ~1.3x the work of one two-thread run, and
# a two-thread run slows down many times whenever anything else wants a core.
parallel = 2
