# The toy world on a CPU: a 2-layer, 128-wide model, under a minute on 2 cores.
# python data/toyworld/prepare.py && python pretrain.py config/toy.py
# pretrain.py's defaults are this run's settings (model, schedule, image phase); this file
# names the run, so that config/toy_sft.py and sweep.py find its checkpoint.
out_dir = "out/toy"
