# The whole study on the toy world, three seeds, on a 2-core CPU:
# python data/toyworld/prepare.py && python sweep.py config/toy_sweep.py
# Per seed: one text run, then 6 start fractions x 1 image ratio = 6 cells of image phase,
# fine-tuning and evaluation, each with the single-run toy settings (pretrain.py's and
# finetune.py's defaults, the README's main job): a 2-layer, 128-wide model, 300 text steps
# and a 600-step image phase of 16 x 128 tokens, six fine-tuning epochs. The main job has the
# settings of the cell at start fraction 0.8 of the first seed. README "The answer so far: the
# toy sweep" has the results; docs/sweep.md the time the three seeds took (40 min on 2 cores).
sweep_dir = "out/toy_sweep"
data_dir = "data/toyworld"
pretrain_config = "config/toy.py"
sft_config = "config/toy_sft.py"
# Image ratio 0.5 over the 600 image steps grounds the captions; 0.3 over 200 did not (docs/toy_notes.md)
axes = {"vision_start_frac": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "image_ratio": (0.5,)}
# Three seeds: one seed's differences between neighbouring cells are about as large as what a
# second seed moves (README), so the table and plot show min..max over these.
seeds = (1337, 1338, 1339)
pretrain_args = ("--log_interval=10", "--eval_interval=100", "--ckpt_interval=1000")
finetune_args = ("--log_interval=20", "--eval_interval=1000", "--ckpt_interval=1000")
evaluate_args = ()
nproc = 1
# Two cells at once with one thread each: a training step of this model took ~105 ms on one
# thread and ~70 ms on two, so two one-thread runs do ~1.3x the work of one two-thread run, and
# a two-thread run slows down many times whenever anything else wants a core.
cells_at_once = 2
