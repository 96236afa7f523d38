"""
What pretrain.py and finetune.py share: device, DDP and FSDP setup, mixed precision, the
optimizer step, learning-rate shapes, checkpoints, logging and the MFU peak table.
"""

import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from data.atomic import atomic_write
from data.errors import MissingFileError, UserError

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


def resolve_device(device_setting):
    """The `device` setting of every script, checked: "auto" (CUDA when there is a GPU, else
    the CPU), "cpu", "cuda" or "cuda:N"."""
    if device_setting not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device_setting):
        raise UserError(f"device must be 'auto', 'cuda' or 'cpu', got {device_setting!r}")
    if device_setting.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device is {device_setting!r}, but torch {torch.__version__} sees no CUDA GPU: "
                        "use --device=cpu (or auto)")
    if device_setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_setting


def setup_distributed(device_setting):
    """Returns (rank, local_rank, world_size, device). Under torchrun the process group is
    NCCL on CUDA and gloo on the CPU; otherwise a single process."""
    device_setting = resolve_device(device_setting)
    if "RANK" in os.environ:
        use_cuda = torch.cuda.is_available() and device_setting != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ["LOCAL_RANK"])
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
        if use_cuda:
            torch.cuda.set_device(device)
        return rank, local_rank, world_size, device
    return 0, 0, 1, device_setting


def setup_training(device_setting, grad_accum, seed, dtype):
    """What every training script does first. Returns (rank, local_rank, world_size, device,
    micro-batches per rank, autocast context); grad_accum counts micro-batches over all ranks."""
    rank, local_rank, world_size, device = setup_distributed(device_setting)
    if grad_accum % world_size:
        raise UserError(f"grad_accum {grad_accum} must be a multiple of the number of ranks {world_size}")
    torch.manual_seed(seed)
    autocast = autocast_context(torch.device(device).type, dtype)
    return rank, local_rank, world_size, device, grad_accum // world_size, autocast


def cpu_has_native_bf16():
    """Whether this CPU multiplies bfloat16 in hardware: AMX (Intel Xeon since Sapphire Rapids)
    or AVX512-BF16 (AMD EPYC since Zen 4, Intel since Cooper Lake). On such CPUs a bf16 training
    step is about 1.5-2x a float32 one (bench_cpu.py measures it); elsewhere bf16 is emulated
    and slower than float32."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def autocast_context(device_type, dtype):
    """bfloat16 autocast on CUDA and on CPUs with native bf16 (cpu_has_native_bf16); plain
    float32 elsewhere or when dtype = 'float32'."""
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype != "bfloat16":
        raise UserError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    if device_type == "cpu" and not cpu_has_native_bf16():
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


PARALLEL_MODES = ("ddp", "fsdp")


def shard_model(raw_model, parallel, autocast):
    """How the ranks under torchrun share the model. "ddp": every rank keeps all of it (weights,
    gradients and AdamW state: 16 bytes a parameter); compile_and_wrap wraps it later. "fsdp":
    PyTorch's FSDP2 (fully_shard) over each decoder block and then the root (embedding, head,
    final norm and the whole vision side), so each rank keeps 1/world_size of every parameter,
    gradient and moment and gathers a block's weights just before using them. Weights are
    gathered in the autocast dtype (bf16) and gradients reduced in float32. Must run before the
    optimizer is built (it must see the sharded parameters) and after any pretrained weights
    are loaded into the unsharded module. Frozen parameters (a frozen SigLIP tower) stay
    sharded but have no gradients to reduce and no optimizer state."""
    if parallel not in PARALLEL_MODES:
        raise UserError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if parallel != "fsdp" or not dist.is_initialized():  # one process without torchrun: nothing to spread
        return
    compute_dtype = autocast.fast_dtype if isinstance(autocast, torch.autocast) else None
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in raw_model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(raw_model, mp_policy=policy)


def _optimizer_names(raw_model, optimizer):
    """The parameter name of each of the optimizer's parameters, in its own order."""
    name_of = {id(p): name for name, p in raw_model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def training_state(raw_model, optimizer):
    """(model state, optimizer state) as full tensors keyed by parameter name, whichever way the
    model is spread, so that a checkpoint resumes under DDP, FSDP or one process alike, and
    evaluate.py, sample.py and export_hf.py read it as they always have. The optimizer's state
    is optimizer.state_dict() with names for indices: a parameter that has not stepped yet
    (the vision side during the text-only steps) has none. (torch.distributed.checkpoint's
    get/set_optimizer_state_dict would instead give every parameter a state by running a
    zero-gradient step first, which changes AdamW's step count, and so the run.) Under FSDP
    every rank must call it (the shards are gathered) and rank 0 gets the state, on the CPU."""
    sharded = isinstance(raw_model, FSDPModule)

    def full(value):
        return value.full_tensor().cpu() if isinstance(value, DTensor) else value

    model_state = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=sharded))
    names, optimizer_state = _optimizer_names(raw_model, optimizer), optimizer.state_dict()
    return model_state, {
        "state": {names[i]: {k: full(v) for k, v in state.items()} for i, state in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                         for group in optimizer_state["param_groups"]]}


def load_training_state(raw_model, optimizer, model_state, optimizer_state=None):
    """Loads training_state's output (every rank holds the whole checkpoint) into the model,
    sharded or not, and into the optimizer when given."""
    set_model_state_dict(raw_model, model_state, options=StateDictOptions(full_state_dict=True))
    if optimizer_state is None:
        return
    if any(isinstance(i, int) for group in optimizer_state["param_groups"] for i in group["params"]):
        # written before optimizer state was keyed by name: optimizer.state_dict() as it was
        if isinstance(raw_model, FSDPModule):
            raise UserError("this checkpoint keys its optimizer state by index (written before FSDP support): "
                            "resume it with --parallel=ddp once, and its next checkpoint resumes under FSDP")
        optimizer.load_state_dict(optimizer_state)
        return
    names = _optimizer_names(raw_model, optimizer)
    index, params = {name: i for i, name in enumerate(names)}, dict(raw_model.named_parameters())

    def like(value, param):  # AdamW's moments have the parameter's shape, and its sharding
        if isinstance(param, DTensor) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        return value

    optimizer.load_state_dict({
        "state": {index[name]: {k: like(v, params[name]) for k, v in state.items()}
                  for name, state in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in optimizer_state["param_groups"]]})


def compile_and_wrap(raw_model, compile, device, world_size, local_rank, layouts, parallel="ddp"):
    """The module the training loop calls: torch.compile'd when `compile` is on and, under
    torchrun with parallel = "ddp", wrapped in DDP (an FSDP model was sharded by shard_model).
    Shapes are static, so Dynamo compiles one graph per batch layout it meets (how many rows
    hold images): `layouts` says how many the caller can produce, and Dynamo's limit (8 by
    default, past which it silently runs the rest eagerly) is raised to fit. Each layout costs
    one compile, once per process: on the CPU about half a minute for 1.2-1.5x faster steps,
    which the toy's pretraining does not earn back, its fine-tuning just does, and longer CPU
    runs do (docs/measured.md)."""
    model = raw_model
    device_type = torch.device(device).type
    if compile:
        cxx = os.environ.get("CXX", "g++")  # the compiler inductor looks for on the CPU
        if device_type == "cpu" and shutil.which(cxx) is None:
            raise UserError(f"compile=True on the CPU needs a C++ compiler ({cxx}, or the one the CXX "
                            "variable names): inductor builds its kernels with it. Install one or pass "
                            "--compile=False")
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, layouts)
        model = torch.compile(model, dynamic=False)
    if world_size > 1 and parallel == "ddp":
        model = DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)
    return model


def train_step(model, optimizer, micro_batches, autocast, vision_params, step_has_images, grad_clip):
    """One optimizer step over this rank's micro-batches [(x, y, images), ...]; a micro-batch of
    packed conversations adds their segments (x, y, images, segments; see VLM.hidden_states).
    Returns (summed per-token losses [B, T] of each micro-batch, gradient norm)."""
    token_losses = []
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        # Reduce the gradients across ranks only once, after the last micro-batch.
        last = i == n - 1
        sync = contextlib.nullcontext()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(last)
        elif not last and hasattr(model, "no_sync"):  # DDP
            sync = model.no_sync()
        with sync:
            with autocast:
                loss, losses = model(*batch)
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
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    return token_losses, grad_norm


def stop_if_not_finite(grad_norm, iter_num, last_ckpt):
    """Ends the run when a step's loss or gradient is NaN or inf (the norm is all-reduced, so
    every rank stops together), naming the last good checkpoint; the optimizer has not stepped."""
    if not math.isfinite(grad_norm.item()):
        raise SystemExit(f"error: iter {iter_num}: the loss or its gradient is not finite (gradient norm "
                         f"{grad_norm.item()}); stopping. The last good checkpoint is {last_ckpt} "
                         f"({'present' if os.path.exists(last_ckpt) else 'none written yet'}).")


@torch.no_grad()
def mean_loss(raw_model, next_batch, num_batches, autocast, device, world_size):
    """Mean loss per trained token over num_batches micro-batches of every rank, averaged over
    all ranks. Runs the raw module: evaluating a compiled one would trigger recompiles."""
    was_training = raw_model.training
    raw_model.eval()
    total = torch.zeros(2, device=device)
    for _ in range(num_batches):
        batch = next_batch()  # (x, y, images) or (x, y, images, segments), as train_step
        with autocast:
            _, losses = raw_model(*batch)
        total += torch.stack([losses.sum(), (batch[1] != -1).sum().float()])
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


def claim_out_dir(out_dir, new_run, overwrite, rank, world_size, device):
    """Makes out_dir this run's own before any work: rank 0 takes its lock (out_dir/.lock, an
    flock that the kernel releases when the process ends, kill -9 included, so a crash never
    leaves it stuck) and refuses a second writer. A new run (anything but init_from=resume)
    refuses a folder that already holds a run unless `overwrite`, which then deletes that run's
    log and checkpoints. Temporary files of writers that died mid-write (ckpt.pt.tmp<pid>) are
    removed. Under DDP the other ranks wait for rank 0's answer and stop with it. Returns the
    lock's open file, which the caller keeps for the life of the process."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = lock_folder(out_dir, "out_dir")
            held = _run_in(out_dir) if new_run else None
            if held and not overwrite:
                raise UserError(f"out_dir {out_dir} already holds a run ({held}): continue it with "
                                "--init_from=resume, or choose another --out_dir (--overwrite=True replaces it)")
            if held:
                for path in [os.path.join(out_dir, "log.jsonl"), *glob.glob(os.path.join(out_dir, "ckpt*.pt"))]:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
            remove_dead_writers_files(out_dir)
        except UserError as e:
            refusal = e
    if world_size > 1:
        refused = torch.tensor([float(refusal is not None)], device=device)
        if all_reduce_sum(refused, world_size).item() > 0 and refusal is None:
            raise SystemExit(1)  # rank 0 says why
    if refusal is not None:
        raise refusal
    return lock


def lock_folder(folder, setting):
    """Takes `folder`'s lock for the life of the process (see claim_out_dir; sweep.py locks
    sweep_dir with it), naming `setting` when it cannot. Returns the lock's open file."""
    if not folder:
        raise UserError(f"{setting} must not be empty")
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+")
    except OSError as e:
        raise UserError(f"cannot write to {setting} {folder}: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{setting} {folder} is in use by {holder}: one run writes a folder at a time; "
                        "wait for it to end or choose another folder") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def _run_in(out_dir):
    """What in out_dir makes it hold a run (a checkpoint or logged records), or None."""
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "ckpt*.pt")))
    log = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(log) and os.path.getsize(log) > 0:
        with open(log, "rb") as f:
            found.append(f"log.jsonl with {sum(1 for _ in f)} records")
    return ", ".join(found) or None


def remove_dead_writers_files(folder):
    """Deletes the temporary files (see data/atomic.py: <name>.tmp<pid>) that a writer killed
    mid-write left in `folder`; a checkpoint's can be gigabytes. A file whose process still
    lives on this machine is kept (another program, such as evaluate.py, may be writing it)."""
    for name in os.listdir(folder):
        match = re.search(r"\.tmp(\d+)$", name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it lives, as another user's process
        pass
    return True


def check_positive(config, names):
    """Settings that count something (rows, steps, layers) must be at least 1."""
    for name in names:
        if config[name] <= 0:
            raise UserError(f"{name} must be positive, got {config[name]!r}")


def check_same_settings(saved, config, may_differ, what):
    """Refuses to continue a checkpoint under settings that would change its past: every
    setting must equal the checkpoint's except those named in may_differ. A setting that is
    new since the checkpoint was written is therefore checked too (the checkpoint has none)."""
    # Upper-case keys are constants that older checkpoints saved beside their settings: not settings.
    differ = [f"{k}: checkpoint {saved.get(k, '(not set)')!r}, now {config.get(k, '(not set)')!r}"
              for k in sorted(set(saved) | set(config))
              if k.islower() and k not in may_differ and saved.get(k) != config.get(k)]
    if differ:
        raise UserError(f"{what}: settings differ from the checkpoint's, which would change its past: "
                        + "; ".join(differ))


def check_same_data(saved, current, what, may_differ=()):
    """Refuses to continue a checkpoint on other training data than it was trained on: `saved`
    and `current` map a shard pattern setting to data.shards.fingerprint of its files. Only the
    files' names and contents count, not the folder's path."""
    if saved is None:  # a checkpoint from before data was recorded
        return
    for name in sorted(set(saved) | set(current)):
        if name in may_differ or saved.get(name) == current.get(name):
            continue
        before = {f[0]: f for f in saved.get(name) or []}
        now = {f[0]: f for f in current.get(name) or []}
        changes = ([f"{n} is new" for n in sorted(set(now) - set(before))]
                   + [f"{n} is gone" for n in sorted(set(before) - set(now))]
                   + [f"{n} has other contents" for n in sorted(set(now) & set(before)) if now[n] != before[n]])
        raise UserError(f"{what}: the {name} shards are not those it was trained on ({'; '.join(changes[:3])}"
                        f"{f'; {len(changes) - 3} more' if len(changes) > 3 else ''}): was the data regenerated? "
                        "Continue on the data it was trained on, or start a new run")


def _leaves(value, name=""):
    """(name, value) for every tensor and plain value inside nested dicts, lists and tuples."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple, torch.Tensor)) for v in value):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{name}[{i}]")
    else:
        yield name, value


def _tensor_digest(tensor):
    """sha256 of a tensor's dtype, shape and bytes, and whether it is all finite."""
    t = tensor.detach().cpu().contiguous()
    finite = not t.is_floating_point() or bool(torch.isfinite(t).all())
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.digest(), finite


def checkpoint_digest(checkpoint):
    """sha256 over everything a checkpoint holds (every tensor's bytes, every setting and
    counter), and the names of floating-point tensors holding NaN or inf. sha256 runs at about
    1.4 GB/s on one core, so tensors are hashed on up to 8 threads (hashlib and torch release
    the GIL): a 21 GB checkpoint of a 1B run then costs seconds, not a quarter of a minute."""
    leaves = list(_leaves(checkpoint))
    tensors = [v for _, v in leaves if isinstance(v, torch.Tensor)]
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        digests = iter(list(pool.map(_tensor_digest, tensors)))
    total, non_finite = hashlib.sha256(), []
    for name, value in leaves:
        total.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            digest, finite = next(digests)
            total.update(digest)
            if not finite:
                non_finite.append(name)
        else:
            total.update(repr(value).encode() + b"\0")
    return total.hexdigest(), non_finite


def save_checkpoint(path, checkpoint):
    """Writes a checkpoint with its sha256 (see checkpoint_digest) to a temporary file, then
    renames it, so a crash mid-write leaves the previous checkpoint intact. A checkpoint whose
    tensors are not all finite is refused: the last one on disk stays the last good one. A
    failed write (a full disk, Ctrl-C) removes the temporary file, which would otherwise keep
    the disk full (see data/atomic.py)."""
    digest, non_finite = checkpoint_digest(checkpoint)
    if non_finite:
        raise UserError(f"not writing {path}: NaN or inf in {', '.join(non_finite[:3])}"
                        f"{f' and {len(non_finite) - 3} more tensors' if len(non_finite) > 3 else ''}; "
                        "the training has diverged, the last checkpoint on disk is the last good one")
    with atomic_write(path, "wb") as f:
        torch.save({**checkpoint, "sha256": digest}, f)


def load_checkpoint(path):
    """Loads a checkpoint written by save_checkpoint and checks its sha256: a truncated,
    overwritten or foreign file raises a UserError naming it. The tensors stay memory-mapped on
    the CPU (load_state_dict copies them to the model's device), so 8 ranks resuming a 1B run
    share one copy in the page cache instead of holding 8."""
    if not os.path.exists(path):
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read, it is truncated or not a checkpoint "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty file'})") from None
    if not isinstance(checkpoint, dict) or "sha256" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint written by pretrain.py or finetune.py "
                        "(a raw state dict or another program's file?): it has no sha256")
    expected = checkpoint.pop("sha256")
    if checkpoint_digest(checkpoint)[0] != expected:
        raise UserError(f"checkpoint {path} is corrupt: its contents do not match the sha256 recorded when "
                        "it was written")
    missing = [k for k in ("model", "model_config", "config") if k not in checkpoint]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}")
    return checkpoint


class JsonlLog:
    """One JSON object per line in out_dir/log.jsonl, each with "iter": the step it describes
    (a training record) or the step before which it was measured (a validation record). On
    resume, records at or after the resumed step, written before the interruption, are
    dropped, so the log reads as if the run had never stopped. So is a cut-off last record
    (a full disk or a kill mid-write)."""

    def __init__(self, path, resume_iter=None):
        self.path = path
        if resume_iter is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()
            kept = []
            for n, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if n < len(lines):
                        raise UserError(f"{path}: line {n} is not a JSON record") from None
                    print(f"warning: {path}: dropped its last line, a cut-off record: {line.strip()[:80]!r}")
                    break
                if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
                    raise UserError(f"{path}: line {n} has no \"iter\" (the step it describes), so a resume cannot "
                                    "tell which records to keep: remove or fix that line")
                if record["iter"] < resume_iter:
                    kept.append(line if line.endswith("\n") else line + "\n")
            with atomic_write(path) as f:
                f.writelines(kept)

    def write(self, record):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: say so; a resume drops the cut-off record
            raise UserError(f"cannot write {self.path}: {e.strerror}") from e


class StopSignals:
    """SIGTERM (a cluster scheduler's notice before preemption) and SIGINT (Ctrl-C) ask the
    training loop to stop: it finishes the step, writes out_dir/ckpt.pt and exits. A second
    Ctrl-C stops at once (losing the steps since the last checkpoint)."""

    def __init__(self, verbose):
        self.received = None  # the first signal's number
        self.verbose = verbose
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # schedulers may repeat SIGTERM; we are already stopping
        self.received = signum
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def agreed(self, world_size, device):
        """Whether any rank got a signal. Under DDP this all-reduces, so every rank must call
        it at the same steps (the scripts do so at log steps: no extra host sync per step)."""
        if world_size == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=device)
        return all_reduce_sum(flag, world_size).item() > 0

    def exit(self, script, ckpt_path, iter_num):
        """Exits 128 + the signal's number, as a process killed by it would (130 for Ctrl-C,
        143 for SIGTERM): a scheduler sees an interrupted job, and `pretrain.py && finetune.py`
        does not go on to fine-tune an unfinished run."""
        signum = self.received or signal.SIGTERM  # a rank that learnt of it from another
        if self.verbose:
            args = [a for a in sys.argv[1:] if not a.startswith("--init_from=")] + ["--init_from=resume"]
            ranks = int(os.environ.get("WORLD_SIZE", "1"))
            launcher = f"torchrun --standalone --nproc_per_node={ranks}" if ranks > 1 else "python"
            print(f"stopped by {signal.Signals(signum).name} before step {iter_num}; {ckpt_path} is written. "
                  f"To continue: {launcher} {script} {shlex.join(args)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)


def all_reduce_sum(tensor, world_size):
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
