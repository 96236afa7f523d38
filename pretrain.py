"""
Pretraining: text only at first, then text mixed with image-caption rows from
vision_start_frac on (and, with instruct_ratio > 0, instruction-tuning conversations). One process:

    python pretrain.py config/toy.py
    python pretrain.py config/toy.py --vision_start_frac=0.4 --image_ratio=0.2
    python pretrain.py config/toy.py --instruct_ratio=0.1

Many GPUs (DDP):

    torchrun --standalone --nproc_per_node=8 pretrain.py config/1b.py

The schedule (the study's protocol) lives in schedule.py: the text run is max_iters steps of
warmup + cosine decay; images start at step round(vision_start_frac * max_iters) and the image
phase replays the rest of that schedule over image_iters steps. save_fracs keeps text-only
checkpoints that other runs branch from with init_from=PATH (sweep.py trains the shared text
prefix once).
"""

import math
import os
import sys
import time
from dataclasses import asdict

import torch

from common import (JsonlLog, StopSignals, all_reduce_sum, check_positive, check_same_data, check_same_settings,
                    claim_out_dir, compile_and_wrap, load_checkpoint, load_training_state, mean_loss, peak_flops,
                    restore_rng_state, rng_state, save_checkpoint, setup_training, shard_model, stop_if_not_finite,
                    train_step, training_state)
from configurator import apply_overrides
from data.errors import UserError, report_user_errors
from data.loader import MixedLoader
from data.shards import find_shards, fingerprint
from data.tokenizer import load_tokenizer
from model import VISION_ENCODERS, VLM, configure_optimizer, model_config_from_settings
from schedule import (IMAGE_RATIO_RAMPS, batch_layouts, fraction_step, image_ratio_at, image_start_step,
                      instruct_ratio_at, learning_rate_at, text_checkpoint_name, total_steps)
from vision_weights import check_vision_weights, load_pretrained, weights_folder

# -----------------------------------------------------------------------------
# defaults: the toy world on a CPU, a 2-layer, 128-wide model, under a minute on 2 cores
# (config/toy.py names that run; config/79m.py and config/1b.py override these for real data)
# I/O
out_dir = "out/pretrain"
data_dir = "data/toyworld"
train_text = "train_text*.bin"  # shard file patterns inside data_dir
train_captions = "train_caption*.bin"
train_chat = "train_chat*.bin"  # conversations, read only when instruct_ratio > 0
val_text = "val_text*.bin"
val_captions = "val_caption*.bin"
init_from = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt), or a checkpoint path to branch from
overwrite = False  # True: a new run may replace the run already in out_dir (otherwise refused)
save_fracs = ()  # text-schedule fractions at which to keep a checkpoint, e.g. (0.2, 0.4, 1.0)
ckpt_interval = 100  # steps between resumable checkpoints (out_dir/ckpt.pt)
stop_at_iter = -1  # end this invocation after this step (checkpointed), e.g. for time-limited jobs
log_interval = 20
eval_interval = 100
eval_batches = 8  # micro-batches per validation set (text, image-caption), over all ranks
seed = 1337
# model
n_layer = 2
n_head = 4
n_kv_head = 4
n_embd = 128
ffn_hidden = 352
seq_len = 128  # two toy image-caption samples a row (16 image + 32 caption tokens + end)
tie_embeddings = False
rope_theta = 10000.0
qk_norm = False  # OpenLM's qk-norm on queries and keys (the study's decoder has it)
# "patches": a PatchEncoder trained from scratch (the toy default, the study's ablation);
# "siglip": a pretrained SigLIP tower, loaded from vision_weights on a scratch start
vision_encoder = "patches"
vision_weights = ""  # "siglip": a Hub repository id, or a local folder in the Hub's layout
vision_revision = "main"  # the Hub revision (commit) of vision_weights; configs pin one
siglip_feature_layer = -2  # which SigLIP block feeds the projector (-2: second-to-last, as Prismatic)
freeze_vision = False  # keep the encoder as initialised or loaded; the projector still trains
image_size = 32  # with SigLIP these two must equal the checkpoint's
patch_size = 8
vit_depth = 0  # > 0: fine-tune with freeze_vision=True, else fine-tuning undoes the blocks (docs/toy_notes.md)
vit_width = 256
vit_heads = 4
caption_len = 32  # caption tokens per image-caption sample (longer ones are cut)
# optimisation
batch_size = 16  # rows per micro-batch and rank
grad_accum = 1  # micro-batches per step over all ranks (must divide by the number of ranks)
max_iters = 300  # length of the text-only schedule
warmup_iters = 30
learning_rate = 3e-3
min_lr = 3e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# vision
vision_start_frac = 0.8
# The toy's patch encoder starts from scratch (the study's is a pretrained SigLIP), so its
# captions need thousands of pictures before they read them. Caption grounding (held-out
# caption loss with swapped pictures minus with their own) measured from one text checkpoint
# at 0.8 after image phases of 200, 400, 600 steps at ratio 0.5 (16 captions a step): 0.019,
# 0.134, 0.279 nats; at ratio 0.3, 200 and 400 steps: 0.006, 0.036 (docs/toy_notes.md).
# Fine-tuning teaches the vision tasks either way; only a grounded image phase gives the start
# fraction something to change.
image_iters = 600  # length of the image phase
image_ratio = 0.5  # share of image-caption rows (= positions) in the image phase
image_ratio_ramp_iters = 0  # > 0: ramp the ratio up from 0 over this many image-phase steps
image_ratio_ramp = "linear"  # the ramp's shape: "linear" or "cosine" (slow, fast, slow); see schedule.py
# The study's third question: instruction-tuning conversations inside the image phase (it found
# they hurt the vision-language tasks but can help the text tasks). A conversation row is built
# as fine-tuning builds it (loss on the answers only); it starts and ramps with the image ratio.
instruct_ratio = 0.0  # share of conversation rows in the image phase, beside image_ratio's
rewarm_lr = 1e-3  # the image phase's peak when vision_start_frac = 1.0
rewarm_iters = 20
# system
device = "auto"  # "auto", "cuda" or "cpu"
dtype = "bfloat16"  # autocast dtype ("float32" turns it off)
compile = False  # torch.compile the model: what the GPU configs do; on the CPU it pays off past the toy runs
use_kernels = True  # Triton kernels (CUDA only; the PyTorch references run elsewhere)
parallel = "ddp"  # under torchrun: "ddp" (a full copy per GPU) or "fsdp" (FSDP2, sharded; docs/gpu_study.md)
# -----------------------------------------------------------------------------
report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
config = apply_overrides(globals(), sys.argv[1:])
# Settings that cannot change a run's past. A resume (init_from=resume) must match its
# checkpoint on every other setting, so a setting added later is checked without anyone
# remembering to list it.
# data_dir is one: a resume compares the training shards themselves (check_same_data).
RUN_ONLY_SETTINGS = ["out_dir", "data_dir", "init_from", "overwrite", "save_fracs", "ckpt_interval", "stop_at_iter",
                     "log_interval", "eval_interval", "eval_batches", "val_text", "val_captions", "device", "dtype",
                     "compile", "use_kernels", "parallel"]
# A branch (init_from=PATH, a text-only checkpoint) may also choose its own image phase.
IMAGE_PHASE_SETTINGS = ["train_captions", "caption_len", "vision_start_frac", "image_iters", "image_ratio",
                        "image_ratio_ramp_iters", "image_ratio_ramp", "rewarm_lr", "rewarm_iters", "instruct_ratio",
                        "train_chat"]


def check_settings():
    check_positive(config, ["n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "seq_len", "image_size",
                            "patch_size", "vit_width", "vit_heads", "caption_len", "batch_size", "grad_accum",
                            "max_iters", "ckpt_interval", "log_interval", "eval_interval", "eval_batches"])
    if n_embd % n_head or n_head % n_kv_head:
        raise UserError(f"n_head ({n_head}) must divide n_embd ({n_embd}) and be a multiple of n_kv_head ({n_kv_head})")
    if n_embd // n_head % 2:
        raise UserError(f"the head size n_embd / n_head ({n_embd // n_head}) must be even: rotary embeddings turn "
                        "pairs of dimensions")
    if vision_encoder == "patches" and image_size % patch_size:
        raise UserError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
    if vision_encoder not in VISION_ENCODERS:
        raise UserError(f"vision_encoder must be one of {tuple(VISION_ENCODERS)}, got {vision_encoder!r}")
    check_vision_weights(config)
    for name in ("learning_rate", "min_lr", "rewarm_lr", "weight_decay", "grad_clip"):
        if config[name] < 0:
            raise UserError(f"{name} must not be negative, got {config[name]}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise UserError(f"beta1 and beta2 must lie in [0, 1), got {beta1} and {beta2}")
    if vit_depth > 0 and (vit_heads <= 0 or vit_width % vit_heads):
        raise UserError(f"vit_heads ({vit_heads}) must be positive and divide vit_width ({vit_width})")
    if not 0.0 <= vision_start_frac <= 1.0:
        raise UserError(f"vision_start_frac must lie in [0, 1], got {vision_start_frac}")
    if not 0.0 <= image_ratio <= 1.0:
        raise UserError(f"image_ratio must lie in [0, 1], got {image_ratio}")
    if instruct_ratio < 0 or image_ratio + instruct_ratio > 1:
        raise UserError(f"instruct_ratio must not be negative and image_ratio + instruct_ratio must not exceed 1 "
                        f"(they are shares of the same rows), got image_ratio {image_ratio} and instruct_ratio "
                        f"{instruct_ratio}")
    if any(not 0.0 <= f <= 1.0 for f in save_fracs):
        raise UserError(f"save_fracs must lie in [0, 1], got {save_fracs}")
    names = [text_checkpoint_name(f) for f in save_fracs]  # two fractions alike to 2 decimals would share one
    if len(set(names)) < len(names):
        raise UserError(f"save_fracs {save_fracs} name one checkpoint twice: "
                        f"{', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    for name in ("image_iters", "warmup_iters", "rewarm_iters", "image_ratio_ramp_iters", "vit_depth"):
        if config[name] < 0:
            raise UserError(f"{name} must not be negative, got {config[name]}")
    if image_ratio_ramp not in IMAGE_RATIO_RAMPS:
        raise UserError(f"image_ratio_ramp must be one of {IMAGE_RATIO_RAMPS}, got {image_ratio_ramp!r}")


check_settings()
rank, local_rank, world_size, device, accum_per_rank, autocast = setup_training(device, grad_accum, seed, dtype)
master = rank == 0
device_type = torch.device(device).type
# one writer per out_dir, and a new run never replaces another (docs/faults.md)
out_dir_lock = claim_out_dir(out_dir, init_from != "resume", overwrite, rank, world_size, device)
signals = StopSignals(verbose=master)  # already during set-up (it can take minutes): a signal stops at step one

start_iter = image_start_step(config)  # the first step that sees images
total_iters = total_steps(config)
save_iters = {fraction_step(config, f): f for f in save_fracs}


# -----------------------------------------------------------------------------
# data and model
tokenizer = load_tokenizer(data_dir)
# Only a scratch start needs the pretrained weights; a resume or branch has them in its checkpoint.
encoder_folder = weights_folder(config, with_weights=init_from == "scratch")
model_config = model_config_from_settings(config, tokenizer.vocab_size, tokenizer.image_id, encoder_folder,
                                          use_kernels=use_kernels and device_type == "cuda")


def make_loader(text_pattern, caption_pattern, chat_files, loader_rank, loader_world):
    loader = MixedLoader(
        text_files=find_shards(data_dir, text_pattern), caption_files=find_shards(data_dir, caption_pattern),
        chat_files=chat_files, seed=seed, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len,
        tokens_per_image=model_config.tokens_per_image, caption_len=caption_len, rank=loader_rank,
        world_size=loader_world, device=device)
    if loader.image_size != (image_size, image_size):
        raise UserError(f"{caption_pattern}: images are {loader.image_size}, the model expects "
                        f"{image_size}x{image_size}")
    return loader


# Training data: every rank walks the same slots; see data/loader.py.
# Conversation rows are for training only: validation scores text and captions, as without them.
train_chat_files = [] if instruct_ratio == 0 else find_shards(
    data_dir, train_chat, hint=f"instruct_ratio={instruct_ratio} mixes conversation rows into the image phase; "
    "without conversations, set --instruct_ratio=0")
train_loader = make_loader(train_text, train_captions, train_chat_files, rank, world_size)
train_data = {name: fingerprint(find_shards(data_dir, config[name]))
              for name in ("train_text", "train_captions", "train_chat") if name != "train_chat" or train_chat_files}
val_loader = make_loader(val_text, val_captions, [], rank, world_size)

raw_model = VLM(model_config).to(device)
if init_from == "scratch":
    load_pretrained(raw_model.vision.encoder, config, encoder_folder)
raw_model.set_trainable(encoder=not freeze_vision)  # before the optimizer: no state for frozen ones
shard_model(raw_model, parallel, autocast)  # FSDP: before the optimizer, after the pretrained weights
optimizer = configure_optimizer(raw_model, learning_rate, weight_decay, (beta1, beta2), device_type)
vision_params = [p for p in raw_model.vision.parameters() if p.requires_grad]
iter_num = 0
log_window = None

if init_from != "scratch":
    ckpt_path = os.path.join(out_dir, "ckpt.pt") if init_from == "resume" else init_from
    checkpoint = load_checkpoint(ckpt_path)
    saved = checkpoint["config"]
    if checkpoint.get("compact_vocab") != tokenizer.compact_vocab:
        raise UserError(f"{ckpt_path} was trained with another vocabulary than {data_dir}'s")
    if init_from == "resume":
        check_same_settings(saved, config, RUN_ONLY_SETTINGS, ckpt_path)
        check_same_data(checkpoint.get("data"), train_data, ckpt_path)
    else:
        check_same_settings(saved, config, RUN_ONLY_SETTINGS + IMAGE_PHASE_SETTINGS, ckpt_path)
        check_same_data(checkpoint.get("data"), train_data, ckpt_path, may_differ=["train_captions", "train_chat"])
        if checkpoint["iter_num"] > checkpoint.get("image_start_step", image_start_step(saved)):
            raise UserError(f"{ckpt_path} is at step {checkpoint['iter_num']}, after its run's image start: "
                            "a branch must start from a text-only checkpoint")
        if checkpoint["iter_num"] > start_iter:
            raise UserError(f"{ckpt_path} is at step {checkpoint['iter_num']}, past this run's image start "
                            f"{start_iter}: a branch must start from a text-only checkpoint at or before it")
    load_training_state(raw_model, optimizer, checkpoint["model"], checkpoint["optimizer"])
    train_loader.load_state_dict(checkpoint["loader"])
    restore_rng_state(checkpoint["rng"])
    iter_num = checkpoint["iter_num"]
    log_window = checkpoint["log_window"]
    del checkpoint

# Rows never change shape (see data/loader.py), but the number of image-caption and
# conversation rows per micro-batch does, and each layout is one compiled graph.
layouts = batch_layouts(config)
model = compile_and_wrap(raw_model, compile, device, world_size, local_rank, len(layouts), parallel)

if master:
    log = JsonlLog(os.path.join(out_dir, "log.jsonl"), resume_iter=iter_num if init_from == "resume" else None)
    for it, f in sorted(save_iters.items()):
        if it > start_iter:
            print(f"warning: save_fracs {f} (step {it}) lies after the image start (step {start_iter}); "
                  "only text-only checkpoints are kept, so it is skipped")
    print(f"model: {raw_model.num_params('decoder'):,} decoder + {raw_model.num_params('vision'):,} vision params; "
          f"text steps 0..{start_iter - 1}, image steps {start_iter}..{total_iters - 1}; "
          f"{grad_accum * batch_size * seq_len:,} tokens per step on {world_size} rank(s), {device}"
          + (f", {parallel}" if world_size > 1 else ""))


def save(path):
    """Called on every rank: the logging window's sums are gathered so a resumed run's first
    log record averages over the same steps as the uninterrupted run's."""
    window = all_reduce_sum(stats.clone(), world_size).tolist()
    model_state, optimizer_state = training_state(raw_model, optimizer)  # FSDP gathers on every rank
    if master:
        save_checkpoint(path, {
            "model": model_state, "optimizer": optimizer_state,
            "loader": train_loader.state_dict(), "rng": rng_state(), "iter_num": iter_num,
            "stage": "pretrain", "image_start_step": start_iter,
            "log_window": {"stats": window, "image_rows": image_rows, "chat_rows": chat_rows, "step_rows": step_rows},
            "config": config, "model_config": asdict(model_config), "compact_vocab": tokenizer.compact_vocab,
            "data": train_data})


def validation_losses():
    """Mean loss on held-out text rows and on held-out image-caption rows, and on the same
    caption rows with every picture swapped for its neighbour's in the micro-batch. The
    swapped loss minus the true one is how much the captions read their pictures: about 0
    while the vision path is unused (before the image phase, or when it failed to ground)."""
    def batches(ratio, swap):
        def next_batch():
            x, y, images = val_loader.next_batch(ratio)
            return x, y, (images.roll(1, dims=0) if swap else images)
        return next_batch

    result = {}
    for name, ratio, swap in (("val_text_loss", 0.0, False), ("val_caption_loss", 1.0, False),
                              ("val_caption_loss_swapped", 1.0, True)):
        val_loader.reset()  # the same held-out batches every time
        result[name] = mean_loss(raw_model, batches(ratio, swap), math.ceil(eval_batches / world_size), autocast,
                                 device, world_size)
    return result


# -----------------------------------------------------------------------------
# the training loop
flops_per_step = raw_model.flops_per_token(seq_len) * grad_accum * batch_size * seq_len
peak = peak_flops(device)
# Sums over the steps since the last log record: the loss and the trained targets of text rows,
# of image-caption rows and of conversation rows (this rank's), and image-caption rows,
# conversation rows and all rows (every rank's).
stats = torch.zeros(6, device=device)
image_rows = chat_rows = step_rows = 0
if log_window is not None:
    if master:  # a checkpoint from before conversation rows holds the first four sums
        stats[:len(log_window["stats"])] += torch.tensor(log_window["stats"], device=device)
    image_rows, chat_rows, step_rows = log_window["image_rows"], log_window.get("chat_rows", 0), log_window["step_rows"]
row_index = torch.arange(batch_size, device=device).unsqueeze(1)  # a micro-batch's rows, [B, 1]
stop_requested = False
while True:
    if iter_num in save_iters and iter_num <= start_iter:
        save(os.path.join(out_dir, text_checkpoint_name(save_iters[iter_num])))
    if iter_num % eval_interval == 0 or iter_num == total_iters:
        val = validation_losses()
        if master:
            log.write({"iter": iter_num, **val})
            print(f"iter {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    if iter_num == total_iters or iter_num == stop_at_iter or stop_requested:
        save(os.path.join(out_dir, "ckpt.pt"))
        break
    if iter_num > 0 and iter_num % ckpt_interval == 0:
        save(os.path.join(out_dir, "ckpt.pt"))

    t0 = time.time()
    lr = learning_rate_at(config, iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    ratio, chat_ratio = image_ratio_at(config, iter_num), instruct_ratio_at(config, iter_num)
    image_rows_before, chat_rows_before = train_loader.state["image_rows"], train_loader.state["chat_sample"]
    micro_batches, micro_layouts = [], []
    for _ in range(accum_per_rank):
        micro_batches.append(train_loader.next_batch(ratio, chat_ratio))
        micro_layouts.append(train_loader.layout)  # (image-caption rows, conversation rows), the first rows
    step_image_rows = train_loader.state["image_rows"] - image_rows_before  # over all ranks
    step_chat_rows = train_loader.state["chat_sample"] - chat_rows_before  # one conversation a row
    token_losses, grad_norm = train_step(model, optimizer, micro_batches, autocast, vision_params,
                                         step_image_rows + step_chat_rows > 0, grad_clip)
    stop_if_not_finite(grad_norm, iter_num, os.path.join(out_dir, "ckpt.pt"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for (x, y, images), losses, (n_image, n_chat) in zip(micro_batches, token_losses, micro_layouts):
        trained = y != -1
        is_image_row, is_chat_row = row_index < n_image, (row_index >= n_image) & (row_index < n_image + n_chat)
        for i, rows in enumerate((~(is_image_row | is_chat_row), is_image_row, is_chat_row)):
            stats[2 * i] += (losses * rows).sum()
            stats[2 * i + 1] += (trained & rows).sum()
    image_rows += step_image_rows
    chat_rows += step_chat_rows
    step_rows += grad_accum * batch_size

    if iter_num % log_interval == 0 or iter_num == total_iters - 1:
        total = all_reduce_sum(stats.clone(), world_size).tolist()
        dt = time.time() - t0
        if master:
            record = {
                "iter": iter_num, "lr": lr, "image_ratio": ratio, "instruct_ratio": chat_ratio,
                "loss": (total[0] + total[2] + total[4]) / max(total[1] + total[3] + total[5], 1),
                "text_loss": total[0] / total[1] if total[1] else None,
                "caption_loss": total[2] / total[3] if total[3] else None,
                "chat_loss": total[4] / total[5] if total[5] else None,  # the conversations' answers
                "image_share": image_rows / step_rows,  # image-caption rows = positions, since the last log
                "instruct_share": chat_rows / step_rows,  # conversation rows, since the last log
                "grad_norm": grad_norm.item(),
                "tokens_per_s": grad_accum * batch_size * seq_len / dt,
                "mfu": flops_per_step / dt / (peak * world_size) if peak else None,
            }
            log.write(record)
            mfu = f", mfu {100 * record['mfu']:.1f}%" if peak else ""
            text = f"text {record['text_loss']:.4f}" if record["text_loss"] is not None else "no text"
            caption = f", caption {record['caption_loss']:.4f}" if record["caption_loss"] is not None else ""
            chat = f", chat {record['chat_loss']:.4f}" if record["chat_loss"] is not None else ""
            chats = f", chats {record['instruct_share']:.3f}" if instruct_ratio > 0 else ""
            print(f"iter {iter_num}: loss {record['loss']:.4f} ({text}{caption}{chat}), lr {lr:.2e}, "
                  f"images {record['image_share']:.3f}{chats}, {record['tokens_per_s']:,.0f} tok/s{mfu}")
        stats.zero_()
        image_rows = chat_rows = step_rows = 0
    # SIGTERM or Ctrl-C: stop after this step. Under DDP the ranks agree at log steps only,
    # beside the log's own all-reduce, so that no step pays for an extra host sync.
    if world_size == 1 or iter_num % log_interval == 0:
        stop_requested = signals.agreed(world_size, device)
    iter_num += 1

if world_size > 1:
    torch.distributed.barrier()  # let rank 0 finish its checkpoint before the group goes away
    torch.distributed.destroy_process_group()
if stop_requested and iter_num < total_iters:
    signals.exit("pretrain.py", os.path.join(out_dir, "ckpt.pt"), iter_num)
