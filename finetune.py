"""
Instruction tuning: a pretrained VLM learns to answer questions about images, LLaVA-style.
Each conversation is its image's placeholders, then the chat turns; the loss falls on the
assistant's answers only (see Tokenizer.encode_conversation). A row holds one conversation, or
with pack_conversations as many as fit, each attending only to itself.

    python finetune.py config/toy_sft.py
    torchrun --standalone --nproc_per_node=8 finetune.py config/1b_sft.py --init_from=out/1b/ckpt.pt

It shares pretrain.py's conventions: settings, checkpoints (init_from=resume continues
exactly), DDP, logging to out_dir/log.jsonl.
"""

import math
import os
import sys
import time
from dataclasses import asdict

import torch

from common import (JsonlLog, StopSignals, all_reduce_sum, check_positive, check_same_data, check_same_settings,
                    claim_out_dir, compile_and_wrap, load_checkpoint, load_training_state, mean_loss,
                    restore_rng_state, rng_state, save_checkpoint, setup_training, shard_model, stop_if_not_finite,
                    train_step, training_state)
from configurator import apply_overrides
from data.errors import UserError, report_user_errors
from data.loader import ConversationLoader, MixedLoader
from data.shards import find_shards, fingerprint
from data.tokenizer import load_tokenizer, vocab_growth
from model import VLM, ModelConfig, configure_optimizer
from schedule import cosine_schedule, finetune_steps

# -----------------------------------------------------------------------------
# defaults: the toy world's instruction tuning, a few minutes on 2 CPU cores (config/toy_sft.py
# names that run; config/1b_sft.py overrides these for real data)
out_dir = "out/finetune"
init_from = "out/pretrain/ckpt.pt"  # a pretraining checkpoint, or "resume" (out_dir/ckpt.pt)
overwrite = False  # True: a new run may replace the run already in out_dir (otherwise refused)
data_dir = "data/toyworld"
train_chat = "train_chat*.bin"  # conversation shard patterns inside data_dir
val_chat = "val_chat*.bin"
train_text = "train_text*.bin"  # pretraining text, for text_rows
# The study found 2-4 epochs best. The toy needs more: its yes/no task (exists_yn) compares the
# asked colour and shape with every shape in the picture, a skill that appears late. Two epochs
# left it at chance; with four it still stayed near chance in 3 of 18 toy sweep cells (+1.3,
# +1.7, +9.0), and six took those cells to +22.7, +30.0 and +33.3 (docs/toy_notes.md).
epochs = 6
batch_size = 32  # rows per micro-batch and rank
# Of those rows, how many are plain pretraining text (0 = conversations only, as the study).
# Chat-only tuning at the toy's learning rate took its text tasks from +49 to +4 points above
# chance (text bits per byte 0.37 -> 3.55) with the same vision scores (measured, docs/stages.md);
# 8 text rows in 32 keep them.
text_rows = 8
grad_accum = 1  # micro-batches per step over all ranks
# positions per row; 0 = the pretrained model's context length. A toy conversation takes 38 on
# average (16 image tokens and the chat), at most 85, so none is cut at 96 (longer ones would be).
seq_len = 96
# Several conversations a row, attention kept inside each (the model masks across them): per
# conversation the same computation as one a row, without the padding. Rows of 96 hold two toy
# conversations on average, and a CPU thread trains ~1.3x more conversations a second than at
# one a row of 64; rows of 128 hold 2.8 but pay for their longer attention (docs/measured.md).
pack_conversations = True
learning_rate = 2e-3
min_lr = 2e-4
warmup_frac = 0.05  # of all fine-tuning steps
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
freeze_vision = False  # keep the vision encoder as pretrained; the projector still trains (Prismatic's recipe)
freeze_decoder = False  # train only the vision encoder and projector
ckpt_interval = 250
stop_at_iter = -1
log_interval = 20
eval_interval = 250
eval_batches = 8  # validation micro-batches over all ranks
seed = 1337
device = "auto"
dtype = "bfloat16"
compile = False  # torch.compile the model (see pretrain.py)
use_kernels = True  # CUDA only
parallel = "ddp"  # under torchrun: "ddp" or "fsdp" (see pretrain.py)
# -----------------------------------------------------------------------------
report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
config = apply_overrides(globals(), sys.argv[1:])
# Settings that cannot change a run's past: a resume must match its checkpoint on all others.
RUN_ONLY_SETTINGS = ["out_dir", "data_dir", "init_from", "overwrite", "ckpt_interval", "stop_at_iter", "log_interval",
                     "eval_interval", "eval_batches", "val_chat", "device", "dtype", "compile", "use_kernels",
                     "parallel"]


def check_settings():
    check_positive(config, ["epochs", "batch_size", "grad_accum", "ckpt_interval", "log_interval", "eval_interval",
                            "eval_batches"])
    if seq_len < 0:
        raise UserError(f"seq_len must be positive, or 0 for the pretrained model's context length; got {seq_len}")
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        if config[name] < 0:
            raise UserError(f"{name} must not be negative, got {config[name]}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0 and 0.0 <= warmup_frac <= 1.0):
        raise UserError(f"beta1 and beta2 must lie in [0, 1) and warmup_frac in [0, 1], got {beta1}, {beta2} and "
                        f"{warmup_frac}")
    if freeze_vision and freeze_decoder:
        raise UserError("freeze_vision and freeze_decoder together leave nothing to train")
    if not 0 <= text_rows < batch_size:
        raise UserError(f"text_rows must lie in [0, batch_size), got {text_rows} with batch_size {batch_size}")


check_settings()
chat_rows = batch_size - text_rows

rank, local_rank, world_size, device, accum_per_rank, autocast = setup_training(device, grad_accum, seed, dtype)
master = rank == 0
device_type = torch.device(device).type
resume = init_from == "resume"
out_dir_lock = claim_out_dir(out_dir, not resume, overwrite, rank, world_size, device)  # as in pretrain.py
signals = StopSignals(verbose=master)

checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt") if resume else init_from)
if resume:
    check_same_settings(checkpoint["config"], config, RUN_ONLY_SETTINGS, os.path.join(out_dir, "ckpt.pt"))
tokenizer = load_tokenizer(data_dir)


def grow_vocabulary(checkpoint):
    """Fits the checkpoint's token rows to the data's vocabulary. Data prepared with
    `data/own/prepare.py --vocab=CKPT` spells new words with ids the checkpoint lacks: each added
    id gets an embedding and an output row at the mean of the existing ones (an average token,
    no likelier than the others at first), and the old rows move to their tokens' new ids. A
    vocabulary that drops some of the checkpoint's tokens is refused, as is any change on resume."""
    old, new = checkpoint.get("compact_vocab"), tokenizer.compact_vocab
    if old == new:
        return
    try:
        if resume:
            raise ValueError("a resumed run keeps its vocabulary")
        source = torch.tensor(vocab_growth(old, new))
    except ValueError as e:
        raise UserError(f"{init_from} was trained with another vocabulary than {data_dir}'s: {e}") from None
    added = source < 0
    for key in ("wte.weight", "lm_head.weight"):  # both keys even when tied: they hold the same rows
        rows = checkpoint["model"][key]
        grown = rows[source.clamp(min=0)]
        grown[added] = rows.float().mean(0).to(rows.dtype)
        checkpoint["model"][key] = grown
    checkpoint["model_config"].update(vocab_size=len(source), image_token_id=tokenizer.image_id)  # ids moved
    if master:
        print(f"vocabulary: {len(source) - int(added.sum()):,} tokens of {init_from} and {int(added.sum()):,} "
              f"new ones from {data_dir}, initialised at the mean of the existing rows")


grow_vocabulary(checkpoint)
model_config = ModelConfig(**{**checkpoint["model_config"], "use_kernels": use_kernels and device_type == "cuda"})
seq_len = seq_len or model_config.block_size
if seq_len > model_config.block_size:
    raise UserError(f"seq_len {seq_len} exceeds the pretrained model's context length {model_config.block_size}")

raw_model = VLM(model_config).to(device)
raw_model.set_trainable(encoder=not freeze_vision, decoder=not freeze_decoder)
shard_model(raw_model, parallel, autocast)  # FSDP: before the optimizer
optimizer = configure_optimizer(raw_model, learning_rate, weight_decay, (beta1, beta2), device_type)
load_training_state(raw_model, optimizer, checkpoint["model"], checkpoint["optimizer"] if resume else None)
vision_params = [p for p in raw_model.vision.parameters() if p.requires_grad]


def make_loader(pattern, loader_rank, shuffle):
    return ConversationLoader(files=find_shards(data_dir, pattern), tokenizer=tokenizer, batch_size=chat_rows,
                              seq_len=seq_len, tokens_per_image=model_config.tokens_per_image, seed=seed,
                              shuffle=shuffle, rank=loader_rank, world_size=world_size, device=device,
                              pack=pack_conversations)


train_loader = make_loader(train_chat, rank, shuffle=True)
val_loader = make_loader(val_chat, rank, shuffle=False)
if train_loader.image_size != (model_config.image_size,) * 2:
    raise UserError(f"{train_chat}: images are {train_loader.image_size}, the model expects "
                    f"{model_config.image_size}x{model_config.image_size}")
# Chat-only fine-tuning at a toy model's learning rates erases what pretraining taught about
# text; a few rows of pretraining text in every batch keep it (text_rows).
text_loader = None if text_rows == 0 else MixedLoader(
    text_files=find_shards(data_dir, train_text, hint=f"text_rows={text_rows} mixes rows of plain text into each "
                           "batch; to fine-tune on conversations only, set --text_rows=0"),
    tokenizer=tokenizer, batch_size=text_rows, seq_len=seq_len, rank=rank, world_size=world_size, device=device)
train_data = {name: fingerprint(find_shards(data_dir, config[name])) for name in ("train_chat", "train_text")
              if name != "train_text" or text_loader is not None}  # what a resume compares, as in pretrain.py
if resume:
    check_same_data(checkpoint.get("data"), train_data, os.path.join(out_dir, "ckpt.pt"))


def next_batch():
    """chat_rows conversation rows, then text_rows rows of plain text (no images, loss
    everywhere; packed, each text row is one segment)."""
    batch = train_loader.next_batch()
    if text_loader is None:
        return batch
    text_x, text_y, _ = text_loader.next_batch(0.0)
    x, y, images = torch.cat([batch[0], text_x]), torch.cat([batch[1], text_y]), batch[2]
    if not pack_conversations:
        return x, y, images
    return x, y, images, torch.cat([batch[3], torch.zeros_like(text_x)])


chat_rows_in_all = train_loader.rows_to_cover(epochs * train_loader.num_samples)  # over all ranks
max_iters = finetune_steps(config, chat_rows_in_all)
warmup_iters = round(warmup_frac * max_iters)
iter_num = 0
if resume:
    train_loader.load_state_dict(checkpoint["loader"]["chat"])
    if text_loader is not None:
        text_loader.load_state_dict(checkpoint["loader"]["text"])
    restore_rng_state(checkpoint["rng"])
    iter_num = checkpoint["iter_num"]
pretrained_from = checkpoint.get("pretrained_from", init_from)
del checkpoint

model = compile_and_wrap(raw_model, compile, device, world_size, local_rank, 1, parallel)  # every batch alike

if master:
    log = JsonlLog(os.path.join(out_dir, "log.jsonl"), resume_iter=iter_num if resume else None)
    trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    print(f"fine-tuning {pretrained_from}: {trainable:,} trainable params, {train_loader.num_samples:,} "
          f"conversations x {epochs} epochs = {max_iters} steps"
          + (f", {epochs * train_loader.num_samples / chat_rows_in_all:.2f} conversations a row" if pack_conversations
             else ""))


def save(path):
    """Called on every rank, as in pretrain.py; rank 0 writes."""
    model_state, optimizer_state = training_state(raw_model, optimizer)  # FSDP gathers on every rank
    if master:
        loaders = {"chat": train_loader.state_dict(), "text": text_loader.state_dict() if text_loader else None}
        save_checkpoint(path, {
            "model": model_state, "optimizer": optimizer_state, "loader": loaders,
            "rng": rng_state(), "iter_num": iter_num, "config": config, "model_config": asdict(model_config),
            "compact_vocab": tokenizer.compact_vocab, "stage": "finetune", "pretrained_from": pretrained_from,
            "data": train_data})


def validation_loss():
    val_loader.reset()
    return mean_loss(raw_model, val_loader.next_batch, math.ceil(eval_batches / world_size), autocast, device,
                     world_size)


stop_requested = False
while True:
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        val = validation_loss()
        if master:
            log.write({"iter": iter_num, "val_chat_loss": val})
            print(f"iter {iter_num}: val_chat_loss {val:.4f}")
    if iter_num == max_iters or iter_num == stop_at_iter or stop_requested:
        save(os.path.join(out_dir, "ckpt.pt"))
        break
    if iter_num > 0 and iter_num % ckpt_interval == 0:
        save(os.path.join(out_dir, "ckpt.pt"))

    t0 = time.time()
    lr = cosine_schedule(iter_num, warmup_iters, max_iters, learning_rate, min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro_batches = [next_batch() for _ in range(accum_per_rank)]
    token_losses, grad_norm = train_step(model, optimizer, micro_batches, autocast, vision_params, True, grad_clip)
    stop_if_not_finite(grad_norm, iter_num, os.path.join(out_dir, "ckpt.pt"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if iter_num % log_interval == 0 or iter_num == max_iters - 1:
        # this step's loss per trained token over every rank's micro-batches, as pretrain.py logs it
        total = torch.stack([sum(losses.sum() for losses in token_losses).float(),
                             sum((batch[1] != -1).sum() for batch in micro_batches).float()])
        loss_sum, trained = all_reduce_sum(total, world_size).tolist()
        dt = time.time() - t0
        if master:
            record = {"iter": iter_num, "loss": loss_sum / max(trained, 1), "lr": lr, "grad_norm": grad_norm.item(),
                      "epoch": train_loader.state["position"] / train_loader.num_samples,
                      "tokens_per_s": grad_accum * batch_size * seq_len / dt}
            log.write(record)
            print(f"iter {iter_num}: loss {record['loss']:.4f}, lr {lr:.2e}, epoch {record['epoch']:.2f}, "
                  f"{record['tokens_per_s']:,.0f} tok/s")
    # SIGTERM or Ctrl-C: stop after this step (under DDP, every rank at the same log step).
    if world_size == 1 or iter_num % log_interval == 0:
        stop_requested = signals.agreed(world_size, device)
    iter_num += 1

if world_size > 1:
    torch.distributed.barrier()  # let rank 0 finish its checkpoint before the group goes away
    torch.distributed.destroy_process_group()
if stop_requested and iter_num < max_iters:
    signals.exit("finetune.py", os.path.join(out_dir, "ckpt.pt"), iter_num)
