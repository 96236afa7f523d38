# The study's third question on the toy world: instruction conversations mixed into the image
# phase (pretrain.py's instruct_ratio). Used on top of config/toy_sweep.py, whose settings it
# keeps but for the grid and the folder:
# python data/toyworld/prepare.py && python sweep.py config/toy_sweep.py config/toy_instruct_sweep.py
# One start fraction (0.8, the main job's), the toy's image ratio 0.5, and three shares of
# conversation rows (0, 10% and 20% of every image-phase batch, taken from its text rows: the
# image-caption share stays as it is), three seeds. The 0.0 cells are the main job's settings.
sweep_dir = "out/toy_instruct_sweep"
axes = {"vision_start_frac": (0.8,), "image_ratio": (0.5,), "instruct_ratio": (0.0, 0.1, 0.2)}
