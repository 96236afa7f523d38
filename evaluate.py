"""
Evaluates a checkpoint on one suite of vision-language and text-only tasks, in one table.

    python evaluate.py --ckpt=out/toy_sft/ckpt.pt
    python evaluate.py --ckpt=out/toy_sft/ckpt.pt --tasks=color_qa,arith_mc

A task is a file data_dir/eval_<name>.json (the toy world writes six; see its prepare.py):
{"name", "modality": "vision" | "text", "kind", "chance", "items": [{"image", "prompt",
"options", "answer"}]}, with images in data_dir/eval_images.npy. Three kinds are scored:
  - multiple_choice: the option with the highest log-likelihood wins ("acc"); "acc_norm"
    divides each option's log-likelihood by its length in bytes first (lm-eval's ARC style);
  - open: greedy generation, answers normalised as VQAv2 does; with 3 or more reference
    answers (VQAv2 has 10 annotators) the VQAv2 soft accuracy, else exact match;
  - yes_no (POPE): log-likelihood of "yes" against "no"; accuracy and F1 of "yes".
Vision prompts use the chat template after the image (the model is evaluated after
instruction tuning, as in the study); text prompts are plain language-model completions.
Each task's "stable score" is accuracy minus chance, in points; the table ends with the vision,
text and overall averages of those scores, and the text validation loss in bits per byte.
Results go next to the checkpoint: <ckpt>.eval.json and <ckpt>.eval.md.
"""

import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

from common import autocast_context, check_positive, find_shards, load_checkpoint
from configurator import apply_overrides
from data.errors import MissingFileError, UserError, report_user_errors
from data.loader import PretrainLoader, to_device
from data.tokenizer import Tokenizer
from model import VLM, ModelConfig

# -----------------------------------------------------------------------------
ckpt = "out/finetune/ckpt.pt"
data_dir = "data/toyworld"
tasks = ""  # comma-separated task names; "" = every eval_*.json in data_dir
max_items = 0  # > 0: only the first items of each task (a quick look)
batch_size = 64  # sequences scored at once
max_new_tokens = 8  # for open-ended answers
val_text = "val_text*.bin"  # for bits per byte; "" skips it
bpb_batches = 8
device = "auto"
dtype = "bfloat16"
# -----------------------------------------------------------------------------

# ------------------------------------------------------------------ scoring (pure functions)
_PUNCTUATION = re.compile(r"[^\w\s]")
_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}


def normalize_answer(text):
    """VQAv2-style normalisation: lower case, no punctuation or articles, numbers as digits."""
    words = _PUNCTUATION.sub("", text.lower().replace("\n", " ")).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_accuracy(prediction, references):
    """VQAv2: min(1, matching annotators / 3), averaged over the ways of leaving one annotator
    out. With fewer than 3 references this is plain exact match against any of them."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) < 3:
        return float(pred in refs)
    matches = [r == pred for r in refs]
    return sum(min(1.0, (sum(matches) - m) / 3.0) for m in matches) / len(refs)


def f1_score(predicted_yes, actual_yes):
    true_pos = sum(p and a for p, a in zip(predicted_yes, actual_yes))
    predicted, actual = sum(predicted_yes), sum(actual_yes)
    if true_pos == 0:
        return 0.0
    precision, recall = true_pos / predicted, true_pos / actual
    return 2 * precision * recall / (precision + recall)


def pick_option(loglikelihoods, byte_lengths):
    """(index by raw log-likelihood, index by log-likelihood per byte)."""
    raw = int(np.argmax(loglikelihoods))
    normed = int(np.argmax(np.asarray(loglikelihoods) / np.maximum(np.asarray(byte_lengths), 1)))
    return raw, normed


def stable_score(accuracy, chance):
    """The study's summary: accuracy above chance, in points."""
    return 100.0 * (accuracy - chance)


# ------------------------------------------------------------------ model queries (batched)

class Progress:
    """A one-line progress counter on stderr."""

    def __init__(self, label, total):
        self.label, self.total, self.done, self.start = label, total, 0, time.time()

    def update(self, n):
        self.done += n
        end = "\n" if self.done >= self.total else ""
        print(f"\r  {self.label}: {self.done}/{self.total} ({time.time() - self.start:.0f}s)", end=end,
              file=sys.stderr, flush=True)


def stack_images(image_store, indices):
    """The images of a batch's rows, in row order ([0, H, W, 3] for text-only rows)."""
    chosen = [image_store[i] for i in indices if i is not None]
    return np.stack(chosen) if chosen else np.zeros((0, 1, 1, 3), np.uint8)


@torch.no_grad()
def loglikelihoods(model, requests, image_store, pad_id, device, autocast, batch_size, progress=None):
    """Sum of log-probabilities of each continuation after its context.
    requests: [(context ids, continuation ids, image index or None)]. Rows are right-padded,
    which causal attention makes harmless; image placeholders must already be in the context."""
    results = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        width = max(len(ctx) + len(cont) for ctx, cont, _ in chunk) - 1
        x = np.full((len(chunk), width), pad_id, dtype=np.int64)
        y = np.full((len(chunk), width), -1, dtype=np.int64)
        for row, (ctx, cont, _) in enumerate(chunk):
            seq = list(ctx) + list(cont)
            x[row, :len(seq) - 1] = seq[:-1]
            y[row, len(ctx) - 1:len(seq) - 1] = cont  # predict each continuation token
        x, y, images = to_device([x, y, stack_images(image_store, [i for _, _, i in chunk])], device)
        with autocast:
            _, token_losses = model(x, y, images)
        results += (-token_losses.float().sum(dim=1)).tolist()
        if progress:
            progress.update(len(chunk))
    return results


@torch.no_grad()
def greedy_answers(model, prompts, image_store, stop_id, device, autocast, batch_size, max_new, progress=None):
    """Greedy continuations of prompts [(ids, image index or None)]. Prompts of equal length
    are batched together, so no padding (and no attention mask) is ever needed."""
    answers = [None] * len(prompts)
    by_length = {}
    for i, (ids, _) in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            idx = np.array([prompts[i][0] for i in chunk], dtype=np.int64)
            images = stack_images(image_store, [prompts[i][1] for i in chunk])
            idx, images = to_device([idx, images], device)
            with autocast:
                new = model.generate(idx, images, max_new, stop_id=stop_id)
            for i, row in zip(chunk, new.tolist()):
                answers[i] = row[:row.index(stop_id)] if stop_id in row else row
            if progress:
                progress.update(len(chunk))
    return answers


def evaluate_task(task, model, tokenizer, image_store, device, autocast, batch_size, max_new):
    """Scores one task; returns a dict of its metrics."""
    items = task["items"]
    vision = task["modality"] == "vision"
    P = model.config.tokens_per_image

    def context(item):
        if vision:
            return [tokenizer.image_id] * P + tokenizer.encode_prompt(item["prompt"])
        return tokenizer.encode(item["prompt"])

    def option_ids(text):  # a chat answer ends with <|end|>, which is part of what is scored
        return tokenizer.encode(text) + ([tokenizer.end_id] if vision else [])

    image_of = (lambda item: item["image"]) if vision else (lambda item: None)
    kind = task["kind"]
    result = {"name": task["name"], "modality": task["modality"], "kind": kind, "n": len(items),
              "chance": task["chance"]}
    if kind in ("multiple_choice", "yes_no"):
        options_of = (lambda item: item["options"]) if kind == "multiple_choice" else (lambda item: ["yes", "no"])
        requests, spans = [], []
        for item in items:
            ctx = context(item)
            spans.append((len(requests), len(options_of(item))))
            requests += [(ctx, option_ids(o), image_of(item)) for o in options_of(item)]
        ll = loglikelihoods(model, requests, image_store, tokenizer.eot_id, device, autocast, batch_size,
                            Progress(task["name"], len(requests)))
        picks = []
        for item, (start, n) in zip(items, spans):
            byte_lengths = [len(o.encode("utf-8")) for o in options_of(item)]
            picks.append(pick_option(ll[start:start + n], byte_lengths))
        if kind == "multiple_choice":
            answers = [item["answer"] for item in items]
            result["accuracy"] = float(np.mean([raw == a for (raw, _), a in zip(picks, answers)]))
            result["acc_norm"] = float(np.mean([normed == a for (_, normed), a in zip(picks, answers)]))
        else:
            said_yes = [raw == 0 for raw, _ in picks]
            is_yes = [item["answer"] == "yes" for item in items]
            result["accuracy"] = float(np.mean([s == a for s, a in zip(said_yes, is_yes)]))
            result["f1"] = f1_score(said_yes, is_yes)
            result["yes_ratio"] = float(np.mean(said_yes))
    elif kind == "open":
        prompts = [(context(item), image_of(item)) for item in items]
        answers = greedy_answers(model, prompts, image_store, tokenizer.end_id, device, autocast, batch_size,
                                 max_new, Progress(task["name"], len(prompts)))
        texts = [tokenizer.decode(a) for a in answers]
        result["accuracy"] = float(np.mean([vqa_soft_accuracy(t, item["answer"]) for t, item in zip(texts, items)]))
        result["examples"] = [{"prompt": item["prompt"], "answer": t, "references": item["answer"]}
                              for t, item in list(zip(texts, items))[:5]]
    else:
        raise ValueError(f"task {task['name']}: unknown kind {kind!r}")
    result["stable"] = stable_score(result["accuracy"], result["chance"])
    return result


@torch.no_grad()
def bits_per_byte(model, tokenizer, files, seq_len, batches, device, autocast, batch_size):
    """Text validation loss in bits per UTF-8 byte of the predicted text, which, unlike loss
    per token, compares models with different tokenizers. Special-token targets are left out."""
    loader = PretrainLoader(files, [], batch_size, seq_len, model.config.tokens_per_image, 0, tokenizer.image_id,
                            tokenizer.eot_id, tokenizer.vocab_size, device=device)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), device=device)
    special = {tokenizer.eot_id, tokenizer.image_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id}
    nats = n_bytes = 0.0
    for _ in range(batches):
        x, y, _ = loader.next_batch(0.0)
        for s in special:
            y = torch.where(y == s, -1, y)
        with autocast:
            _, token_losses = model(x, y)
        nats += token_losses.float().sum().item()
        n_bytes += token_bytes[y.clamp(min=0)][y != -1].sum().item()
    return nats / math.log(2) / n_bytes


def summarize(results):
    def average(rows):
        return float(np.mean([r["stable"] for r in rows])) if rows else None
    vision = [r for r in results if r["modality"] == "vision"]
    text = [r for r in results if r["modality"] == "text"]
    return {"vision_avg": average(vision), "text_avg": average(text), "overall_avg": average(results)}


def markdown_table(results, summary, bpb):
    lines = ["| task | modality | kind | n | accuracy | chance | stable score |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        extra = f" (F1 {100 * r['f1']:.1f})" if "f1" in r else (f" (norm {100 * r['acc_norm']:.1f})" if "acc_norm" in r else "")
        lines.append(f"| {r['name']} | {r['modality']} | {r['kind']} | {r['n']} | {100 * r['accuracy']:.1f}{extra} "
                     f"| {100 * r['chance']:.1f} | {r['stable']:+.1f} |")
    for key, label in (("vision_avg", "vision average"), ("text_avg", "text average"), ("overall_avg", "overall")):
        if summary[key] is not None:
            lines.append(f"| **{label}** | | | | | | **{summary[key]:+.1f}** |")
    if bpb is not None:
        lines.append(f"\nText validation loss: {bpb:.4f} bits per byte.")
    return "\n".join(lines)


def load_model(path, device):
    checkpoint = load_checkpoint(path)
    config = ModelConfig(**{**checkpoint["model_config"], "use_kernels": False})  # eager references
    model = VLM(config).to(device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, Tokenizer(checkpoint.get("compact_vocab"))


def write_atomically(path, text):
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def main(argv):
    settings = dict(ckpt=ckpt, data_dir=data_dir, tasks=tasks, max_items=max_items, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, val_text=val_text, bpb_batches=bpb_batches, device=device,
                    dtype=dtype)
    apply_overrides(settings, argv)
    check_positive(settings, ["batch_size", "max_new_tokens", "bpb_batches"])
    if settings["max_items"] < 0:
        raise UserError(f"max_items must be 0 (every item) or positive, got {settings['max_items']}")
    s = settings
    dev = s["device"] if s["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    autocast = autocast_context(torch.device(dev).type, s["dtype"])
    model, tokenizer = load_model(s["ckpt"], dev)
    names = s["tasks"].split(",") if s["tasks"] else sorted(
        f[len("eval_"):-len(".json")] for f in os.listdir(s["data_dir"]) if f.startswith("eval_") and f.endswith(".json"))
    if not names:
        raise MissingFileError(f"no eval_*.json tasks in {s['data_dir']}")
    image_path = os.path.join(s["data_dir"], "eval_images.npy")
    image_store = np.load(image_path, mmap_mode="r") if os.path.exists(image_path) else None
    results = []
    for name in names:
        path = os.path.join(s["data_dir"], f"eval_{name}.json")
        if not os.path.exists(path):
            raise MissingFileError(f"task {name!r}: {path} does not exist")
        with open(path) as f:
            task = json.load(f)
        if s["max_items"] > 0:
            task["items"] = task["items"][:s["max_items"]]
        if task["modality"] == "vision" and image_store is None:
            raise MissingFileError(f"task {name!r} needs images, but {image_path} does not exist")
        results.append(evaluate_task(task, model, tokenizer, image_store, dev, autocast, s["batch_size"],
                                     s["max_new_tokens"]))
    summary = summarize(results)
    bpb = None
    if s["val_text"]:
        bpb = bits_per_byte(model, tokenizer, find_shards(s["data_dir"], s["val_text"]), model.config.block_size,
                            s["bpb_batches"], dev, autocast, 8)
    table = markdown_table(results, summary, bpb)
    print(table)
    report = {"ckpt": s["ckpt"], "tasks": results, **summary, "val_text_bpb": bpb}
    write_atomically(f"{s['ckpt']}.eval.json", json.dumps(report, indent=1))
    write_atomically(f"{s['ckpt']}.eval.md", table + "\n")
    return report


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main(sys.argv[1:])
