"""
What pretrain.py and finetune.py share: device and DDP setup, mixed precision, the optimizer
step, learning-rate shapes, checkpoints, logging and the MFU peak table.
"""

import contextlib
import glob
import json
import math
import os

import torch
import torch.distributed as dist

from data.tokenizer import Tokenizer

# Dense bf16 matmul peaks (FLOP/s) by device name, from the vendors' data sheets. MFU is
# reported against the peak of the card actually in use, times the number of ranks.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def peak_flops(device):
    """The card's dense bf16 peak, or None where we do not know it (CPUs, unknown cards)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # more specific names come first
        if key in name:
            return flops
    return None


def setup_distributed(device_setting):
    """Returns (rank, local_rank, world_size, device). Under torchrun the process group is
    NCCL on CUDA and gloo on the CPU; otherwise a single process."""
    if "RANK" in os.environ:
        use_cuda = torch.cuda.is_available() and device_setting != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ["LOCAL_RANK"])
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(device)
        return rank, local_rank, world_size, device
    if device_setting == "auto":
        device_setting = "cuda" if torch.cuda.is_available() else "cpu"
    return 0, 0, 1, device_setting


def setup_training(device_setting, grad_accum, seed, dtype):
    """What every training script does first. Returns (rank, local_rank, world_size, device,
    micro-batches per rank, autocast context); grad_accum counts micro-batches over all ranks."""
    rank, local_rank, world_size, device = setup_distributed(device_setting)
    if grad_accum % world_size:
        raise ValueError(f"grad_accum {grad_accum} must be a multiple of the number of ranks {world_size}")
    torch.manual_seed(seed)
    autocast = autocast_context(torch.device(device).type, dtype)
    return rank, local_rank, world_size, device, grad_accum // world_size, autocast


def autocast_context(device_type, dtype):
    """bfloat16 autocast on CUDA, and on CPUs with AMX bf16 units (there it is about 2x faster
    than float32, see DESIGN.md); plain float32 elsewhere or when dtype = 'float32'."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    if device_type == "cpu" and not torch.cpu._is_amx_tile_supported():
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def cosine_schedule(it, warmup_iters, total_iters, peak_lr, min_lr):
    """Linear warmup to peak_lr, then a cosine decay that reaches min_lr at total_iters and
    stays there. `it` may be fractional (an image phase replays the schedule stretched)."""
    if it < warmup_iters:
        return peak_lr * min(1.0, (it + 1) / warmup_iters)
    progress = min(1.0, (it - warmup_iters) / max(1, total_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


def find_shards(data_dir, pattern):
    files = sorted(glob.glob(os.path.join(data_dir, pattern)))
    if not files:
        raise FileNotFoundError(f"no shards match {os.path.join(data_dir, pattern)} "
                                "(for the toy world, run: python data/toyworld/prepare.py)")
    return files


def load_tokenizer(data_dir):
    """The dataset's tokenizer: its compact vocabulary from meta.json when it has one,
    else the full cl100k_base vocabulary."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        return Tokenizer()
    with open(meta_path) as f:
        meta = json.load(f)
    return Tokenizer(meta.get("compact_vocab"))


def train_step(model, optimizer, micro_batches, autocast, vision_params, step_has_images, grad_clip):
    """One optimizer step over this rank's micro-batches [(x, y, images), ...].
    Returns (summed per-token losses [B, T] of each micro-batch, gradient norm)."""
    token_losses = []
    n = len(micro_batches)
    for i, (x, y, images) in enumerate(micro_batches):
        # Under DDP, all-reduce the gradients only once, after the last micro-batch.
        last = i == n - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast:
                loss, losses = model(x, y, images)
            (loss / n).backward()
        token_losses.append(losses.detach())
    if not step_has_images:
        # No rank saw an image this step: the encoder's gradients are the zeros the model added
        # for DDP. Dropping them makes AdamW skip the encoder entirely (no weight decay, no
        # moment updates), so it waits untouched, as freshly initialised, for its first image.
        for p in vision_params:
            p.grad = None
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.grad is not None], grad_clip if grad_clip > 0 else float("inf"))
    return token_losses, grad_norm


@torch.no_grad()
def mean_loss(raw_model, next_batch, num_batches, autocast, device, world_size):
    """Mean loss per trained token over num_batches micro-batches of every rank, averaged over
    all ranks. Runs the raw module: evaluating a compiled one would trigger recompiles."""
    was_training = raw_model.training
    raw_model.eval()
    total = torch.zeros(2, device=device)
    for _ in range(num_batches):
        x, y, images = next_batch()
        with autocast:
            _, losses = raw_model(x, y, images)
        total += torch.stack([losses.sum(), (y != -1).sum().float()])
    total = all_reduce_sum(total, world_size)
    raw_model.train(was_training)
    return (total[0] / total[1]).item()


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, checkpoint):
    """Writes to a temporary file and renames it, so a crash mid-write leaves the previous
    checkpoint intact and never a half-written one."""
    tmp = f"{path}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=device, weights_only=False)


def check_same_settings(checkpoint, config, keys, what):
    """Refuses to continue a checkpoint under settings that would change its past."""
    saved = checkpoint["config"]
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {config[k]!r}" for k in keys if saved.get(k) != config[k]]
    if differ:
        raise ValueError(f"{what}: these settings differ from the checkpoint's:\n  " + "\n  ".join(differ))


class JsonlLog:
    """One JSON object per line in out_dir/log.jsonl, each with "iter": the step it describes
    (a training record) or the step before which it was measured (a validation record). On
    resume, records at or after the resumed step, written before the interruption, are
    dropped, so the log reads as if the run had never stopped."""

    def __init__(self, path, resume_iter=None):
        self.path = path
        if resume_iter is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line)["iter"] < resume_iter]
            with open(f"{path}.tmp", "w") as f:
                f.writelines(kept)
            os.replace(f"{path}.tmp", path)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def all_reduce_sum(tensor, world_size):
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
