# Instruction tuning on the toy world's image conversations, about two minutes on 2 CPU
# cores. python finetune.py config/toy_sft.py
# finetune.py's defaults are this run's settings (rows, lengths, learning rate, text_rows); this
# file names the run and the pretraining checkpoint it starts from (config/toy.py's).
out_dir = "out/toy_sft"
init_from = "out/toy/ckpt.pt"
