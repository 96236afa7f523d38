"""
The study's benchmarks as evaluate.py tasks, downloaded from the Hugging Face Hub.

    python data/benchmarks/prepare.py                                 # all nine, into data/benchmarks/
    python data/benchmarks/prepare.py --tasks=pope,arc_easy,piqa      # some of them
    python data/benchmarks/prepare.py --vqav2_subset=10000            # VQAv2: a fixed 10k-question subset
    python data/benchmarks/prepare.py --local_dir=DIR                 # no download: DIR/<owner>/<name>/...
    python evaluate.py --ckpt=out/sft/ckpt.pt --data_dir=data/benchmarks --val_text=""

Each task uses the prompt, split and reference answers of the harness that reports it, so a score
here means what the same score means in a paper:
  vision (lmms-eval, github.com/EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/<task>/; generation,
  answers scored with the VQA soft accuracy, or exact match with one reference):
    vqav2     lmms-lab/VQAv2 validation, 214,354 questions   "{question}" + ANSWER_BRIEFLY
    gqa       lmms-lab/GQA testdev-balanced, 12,578          "{question}" + ANSWER_BRIEFLY
    textvqa   lmms-lab/textvqa validation, 5,000             "{question.capitalize()}" + ANSWER_BRIEFLY
    vizwiz    lmms-lab/VizWiz-VQA val, 4,319                 "{question.capitalize()}" + UNANSWERABLE + ANSWER_BRIEFLY
    pope      lmms-lab/POPE test, 9,000 (3,000 each of adversarial, popular, random: "category")
                                                             "{question.strip()}" + ANSWER_BRIEFLY
  text (EleutherAI lm-evaluation-harness 0.4, lm_eval/tasks/<task>/; log-likelihood of each option):
    arc_easy, arc_challenge   allenai/ai2_arc test, 2,376 / 1,172   "Question: {question}\\nAnswer:"
    hellaswag                 Rowan/hellaswag validation, 10,042    "{activity_label}: {ctx_a} {ctx_b.capitalize()}",
                                                                    cleaned as lm-eval's hellaswag/utils.py does
    piqa                      baber/piqa validation, 1,838          "Question: {goal}\\nAnswer:"
A text task's options are stored without the space that joins them to the prompt; the task's
"delimiter" (" ", lm-eval's target_delimiter) says what goes between.

What it writes into --out_dir, per task (evaluate.py's format; see its docstring):
    eval_<task>.json          {"name", "modality", "kind", "chance", "description", "source",
                              "skipped", "images" (vision) or "delimiter" (text), "items"; open
                              tasks add "metric": vqa, vqa_evalai or exact_match}
    eval_<task>_images.npy    vision tasks: uint8 [N, S, S, 3], each picture once (questions about
                              the same picture share it), prepared by data/images.py's load_image
The .json is written last, so its presence means the task is complete; a re-run skips complete
tasks (--overwrite redoes them). Rows that cannot be used (no question, no answer, an image
without bytes or that does not decode, an answer key that names no option) are skipped and
counted; the counts are printed and kept in the task's "skipped".

VQAv2's validation split is large (214k questions on 40k pictures, 6 GB at 224 px), so
--vqav2_subset=N keeps N questions drawn uniformly, without replacement, by a random.Random(
--subset_seed) sample of the usable rows' positions in the split's files (sorted by name) at the
pinned revision: the same N, seed and revision always give the same questions (fewer if one of
their pictures does not decode). --max_samples=N keeps the first N rows of every task instead,
for a quick look.
"""

import argparse
import glob
import hashlib
import json
import os
import random
import re
import sys
import time
from collections import Counter
from multiprocessing import Pool

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.atomic import atomic_write, make_folder, write_text  # noqa: E402
from data.errors import MissingFileError, UserError, report_user_errors  # noqa: E402
from data.hub import open_parquet  # noqa: E402
from data.images import load_image  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# lmms-eval's post_prompt strings (their "default" model kwargs)
ANSWER_BRIEFLY = "\nAnswer the question using a single word or phrase."
UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."


class Skip(Exception):
    """A row that cannot become an item; its message is the reason it is counted under."""


# ----------------------------------------------------------------------------------------------
# One function per benchmark: a parquet row (a dict) -> an item without its image.

def text_of(row, column):
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise Skip(f"no {column}")
    return value


def string_list(values, what):
    strings = [v for v in values or [] if isinstance(v, str)]
    if not strings:
        raise Skip(f"no {what}")
    return strings


def vqav2_item(row):
    answers = string_list([a.get("answer") for a in row.get("answers") or [] if a], "answers")
    return {"id": row["question_id"], "prompt": text_of(row, "question") + ANSWER_BRIEFLY, "answer": answers}


def gqa_item(row):
    return {"id": row["id"], "prompt": text_of(row, "question") + ANSWER_BRIEFLY, "answer": [text_of(row, "answer")]}


def textvqa_item(row):
    return {"id": row["question_id"], "prompt": text_of(row, "question").capitalize() + ANSWER_BRIEFLY,
            "answer": string_list(row.get("answers"), "answers")}


def vizwiz_item(row):
    return {"id": row["question_id"], "prompt": text_of(row, "question").capitalize() + UNANSWERABLE + ANSWER_BRIEFLY,
            "answer": string_list(row.get("answers"), "answers")}


def pope_item(row):
    answer = text_of(row, "answer").lower().strip()
    if answer not in ("yes", "no"):
        raise Skip("answer not yes or no")
    return {"id": row["question_id"], "prompt": text_of(row, "question").strip() + ANSWER_BRIEFLY, "answer": answer,
            "category": text_of(row, "category")}


def arc_item(row):
    choices = row.get("choices") or {}
    options, labels = string_list(choices.get("text"), "choices"), choices.get("label") or []
    if len(labels) != len(options) or row.get("answerKey") not in labels:
        raise Skip("answerKey names no choice")
    return {"id": row["id"], "prompt": f"Question: {text_of(row, 'question')}\nAnswer:", "options": options,
            "answer": labels.index(row["answerKey"])}


def hellaswag_clean(text):
    """lm-eval's hellaswag/utils.py preprocess: WikiHow's bracketed artefacts out, " [title]" to ". "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(row):
    endings = string_list(row.get("endings"), "endings")
    label = row.get("label")
    if not (isinstance(label, str) and label.isdigit() and int(label) < len(endings)):
        raise Skip("label names no ending")
    context = (row.get("ctx_a") or "") + " " + (row.get("ctx_b") or "").capitalize()
    return {"id": row["ind"], "prompt": hellaswag_clean(text_of(row, "activity_label") + ": " + context),
            "options": [hellaswag_clean(e) for e in endings], "answer": int(label)}


def piqa_item(row):
    if row.get("label") not in (0, 1):
        raise Skip("label not 0 or 1")
    return {"prompt": f"Question: {text_of(row, 'goal')}\nAnswer:",
            "options": [text_of(row, "sol1"), text_of(row, "sol2")], "answer": row["label"]}


# ----------------------------------------------------------------------------------------------
# The benchmarks. revision: the commit a download is pinned to (--revision NAME=COMMIT changes
# one). Three say "main": no full commit id of theirs could be confirmed when this was written;
# every task records the commit it was actually built from in its "source", so a run can be
# repeated exactly with --revision. columns: what the item function reads, checked in every file.
# (lmms-eval's newest task files read copies of the lmms-lab sets under lmms-lab-encoder/.)

TASKS = {
    "vqav2": dict(
        repo="lmms-lab/VQAv2", revision="32665d35052eb4a6d4414851c3c829a72754915a",
        files=["data/validation-*.parquet"], columns=["question_id", "question", "answers", "image"],
        item=vqav2_item, modality="vision", kind="open", metric="vqa",
        harness="lmms-eval vqav2_val: generate_until, max_new_tokens 16; VQA soft accuracy over 10 answers"),
    "gqa": dict(
        repo="lmms-lab/GQA", revision="388eadb3fad5cc6818bf6e2ac7a64d809c6e59e7",
        files=["testdev_balanced_instructions/testdev-*.parquet"], columns=["id", "imageId", "question", "answer"],
        # the questions name their picture by imageId; the pictures are a second config
        image_table=dict(files=["testdev_balanced_images/testdev-*.parquet"], key="id", ref="imageId"),
        item=gqa_item, modality="vision", kind="open", metric="exact_match",
        harness="lmms-eval gqa: generate_until, max_new_tokens 16; exact match (case and punctuation ignored)"),
    "textvqa": dict(
        repo="lmms-lab/textvqa", revision="main",
        files=["data/validation-*.parquet"], columns=["question_id", "question", "answers", "image"],
        item=textvqa_item, modality="vision", kind="open", metric="vqa_evalai",
        harness="lmms-eval textvqa_val (ocr tokens off): generate_until; VQA soft accuracy over 10 answers"),
    "vizwiz": dict(
        repo="lmms-lab/VizWiz-VQA", revision="d428a2dae984f79cf1b9d99467dfa883e0c30686",
        files=["data/val-*.parquet"], columns=["question_id", "question", "answers", "image"],
        item=vizwiz_item, modality="vision", kind="open", metric="vqa_evalai",
        harness="lmms-eval vizwiz_vqa_val: generate_until; VQA soft accuracy over 10 answers"),
    "pope": dict(
        repo="lmms-lab/POPE", revision="4db1276663dfa5eb8ad16a52d24c31a09e470896",
        files=["data/test-*.parquet"], columns=["question_id", "question", "answer", "category", "image"],
        item=pope_item, modality="vision", kind="yes_no",
        harness="lmms-eval pope: accuracy, precision, recall, F1 of yes, yes ratio; per category: pope_adv/pop/random"),
    "arc_easy": dict(
        repo="allenai/ai2_arc", revision="main",
        files=["ARC-Easy/test-*.parquet"], columns=["id", "question", "choices", "answerKey"],
        item=arc_item, modality="text", kind="multiple_choice",
        harness="lm-eval arc_easy: multiple_choice, acc and acc_norm, 0-shot"),
    "arc_challenge": dict(
        repo="allenai/ai2_arc", revision="main",
        files=["ARC-Challenge/test-*.parquet"], columns=["id", "question", "choices", "answerKey"],
        item=arc_item, modality="text", kind="multiple_choice",
        harness="lm-eval arc_challenge: multiple_choice, acc and acc_norm, 0-shot"),
    "hellaswag": dict(
        repo="Rowan/hellaswag", revision="9c75cc00ec2e1f93893cbd25ba617ee30eb70d88",
        files=["data/validation-*.parquet"], columns=["ind", "activity_label", "ctx_a", "ctx_b", "endings", "label"],
        item=hellaswag_item, modality="text", kind="multiple_choice",
        harness="lm-eval hellaswag: multiple_choice, acc and acc_norm, 0-shot"),
    "piqa": dict(
        repo="baber/piqa", revision="main",
        files=["piqa_validation.parquet"], columns=["goal", "sol1", "sol2", "label"],
        item=piqa_item, modality="text", kind="multiple_choice",
        harness="lm-eval piqa: multiple_choice, acc and acc_norm, 0-shot"),
}


# ----------------------------------------------------------------------------------------------
# Reading parquet

def repo_folder(args, spec):
    """(folder holding the task's repository files, the commit they are from): under --local_dir,
    or downloaded (only the files the task reads) at the pinned revision."""
    if args.local_dir:
        folder = os.path.join(args.local_dir, spec["repo"])
        if not os.path.isdir(folder):
            raise MissingFileError(f"--local_dir: {folder} does not exist (expected {spec['repo']}'s files there, "
                                    f"laid out as in the Hub repository)")
        return folder, "local"
    from huggingface_hub import snapshot_download
    patterns = spec["files"] + spec.get("image_table", {}).get("files", [])
    folder = snapshot_download(spec["repo"], repo_type="dataset", revision=spec["revision"], allow_patterns=patterns,
                               cache_dir=args.cache_dir or None)
    return folder, os.path.basename(folder)  # the cache keeps each snapshot in a folder named by its commit


def find_files(folder, patterns):
    paths = sorted(p for pattern in patterns for p in glob.glob(os.path.join(folder, pattern)))
    if not paths:
        raise MissingFileError(f"{folder}: no files match {', '.join(patterns)}")
    return paths


def read_rows(path, columns):
    """Yields the rows of one parquet file as dicts of the named columns, a batch at a time."""
    parquet = open_parquet(path, columns)
    for batch in parquet.iter_batches(columns=columns, batch_size=256):
        yield from batch.to_pylist()


def image_bytes(value):
    """The encoded bytes of an image cell (struct<bytes: binary, path: string>)."""
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise Skip("image without bytes")
    return data


def picture_key(data):
    return hashlib.sha1(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Building one task

def decode(job):
    """Worker: (key, encoded bytes, size) -> (key, uint8 picture or None when it does not decode)."""
    key, data, size = job
    try:
        return key, load_image(data, size)
    except ValueError:
        return key, None


class Progress:
    def __init__(self, label, total):
        self.label, self.total, self.done, self.start = label, total, 0, time.time()

    def update(self, n=1):
        self.done += n
        if self.done == self.total or self.done % 500 == 0:
            end = "\n" if self.done == self.total else ""
            print(f"\r  {self.label}: {self.done:,}/{self.total:,} pictures ({time.time() - self.start:.0f}s)",
                  end=end, file=sys.stderr, flush=True)


def build_task(name, spec, args):
    """Reads the task's rows, keeps the usable ones and writes their pictures; returns the task."""
    folder, commit = repo_folder(args, spec)
    files = find_files(folder, spec["files"])
    vision = spec["modality"] == "vision"
    skipped = Counter()

    pictures = None  # GQA: the pictures live in their own table, keyed by id
    if "image_table" in spec:
        table = spec["image_table"]
        pictures = {}
        for path in find_files(folder, table["files"]):
            for row in read_rows(path, [table["key"], "image"]):
                pictures[row[table["key"]]] = row["image"]

    # pass 1: every row becomes an item (with its picture's key) or a skip reason
    items, keys = [], []
    for path in files:
        for row in read_rows(path, spec["columns"]):
            try:
                item = spec["item"](row)
                if vision:
                    if pictures is None:
                        cell = row["image"]
                    elif row[spec["image_table"]["ref"]] in pictures:
                        cell = pictures[row[spec["image_table"]["ref"]]]
                    else:
                        raise Skip(f"{spec['image_table']['ref']} names no picture")
                    keys.append(picture_key(image_bytes(cell)))
                items.append(item)
            except Skip as reason:
                skipped[str(reason)] += 1
    n_rows = len(items) + sum(skipped.values())

    chosen = range(len(items))
    if name == "vqav2" and args.vqav2_subset > 0:
        chosen = sorted(random.Random(args.subset_seed).sample(chosen, min(args.vqav2_subset, len(items))))
    if args.max_samples > 0:
        chosen = chosen[:args.max_samples]
    items = [items[i] for i in chosen]

    task = {"name": name, "modality": spec["modality"], "kind": spec["kind"]}
    if vision:
        keys = [keys[i] for i in chosen]
        slots = write_pictures(name, spec, args, keys, files, pictures)
        kept = [(item, slots.get(key)) for item, key in zip(items, keys)]
        skipped["image does not decode"] += sum(slot is None for _, slot in kept)
        items = [dict(item, image=slot) for item, slot in kept if slot is not None]
        task["images"] = f"eval_{name}_images.npy"
        if "metric" in spec:  # evaluate.py's name for the answer rule lmms-eval applies to this task
            task["metric"] = spec["metric"]
        # open answers: no guessing floor; yes/no: half the answers are "yes" by POPE's design
        task["chance"] = 0.5 if spec["kind"] == "yes_no" else 0.0
    else:
        items = [dict(item, image=None) for item in items]
        task["delimiter"] = " "
        # ARC has a few 3- and 5-option questions, so chance is the mean of 1/options
        task["chance"] = float(np.mean([1 / len(item["options"]) for item in items])) if items else 0.0
    if not items:
        raise UserError(f"{name}: no usable rows in {', '.join(files)} (skipped: {dict(skipped)})")
    task["description"] = f"{spec['repo']} {', '.join(spec['files'])}; {spec['harness']}"
    task["source"] = {"repo": spec["repo"], "revision": spec["revision"], "commit": commit, "rows": n_rows,
                      "files": [os.path.relpath(f, folder) for f in files]}
    if name == "vqav2" and args.vqav2_subset > 0:
        task["source"]["subset"] = {"questions": args.vqav2_subset, "seed": args.subset_seed}
    task["skipped"] = {reason: n for reason, n in sorted(skipped.items()) if n}
    task["items"] = items
    return task


def write_pictures(name, spec, args, keys, files, pictures):
    """Decodes each distinct picture the kept items need once, in the order the files hold them,
    into out_dir/eval_<name>_images.npy (memory-mapped while written, so VQAv2 never has to fit in
    memory). Returns {key: row in that file}; a picture that does not decode gets no row, and the
    rows it would have used stay at the end of the file, unused."""
    needed = {}
    for key in keys:
        needed.setdefault(key, len(needed))

    def sources():  # (key, bytes, size) of each needed picture, once
        left = set(needed)
        if pictures is not None:  # GQA: the table is in memory; take its pictures in the items' order
            by_key = {picture_key(c["bytes"]): c for c in pictures.values() if isinstance(c, dict) and c.get("bytes")}
            cells = (by_key[key] for key in needed)
        else:
            cells = (row["image"] for path in files for row in read_rows(path, ["image"]))
        for cell in cells:
            data = cell.get("bytes") if isinstance(cell, dict) else None
            key = picture_key(data) if data else None
            if key in left:
                left.discard(key)
                yield key, data, args.image_size
            if not left:
                return

    path = os.path.join(args.out_dir, f"eval_{name}_images.npy")
    with atomic_write(path, mode=None) as tmp:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                          shape=(len(needed), args.image_size, args.image_size, 3))
        slots, progress = {}, Progress(name, len(needed))
        pool = Pool(args.workers) if args.workers > 1 else None
        decoded = pool.imap(decode, sources(), chunksize=8) if pool else map(decode, sources())
        for key, picture in decoded:
            if picture is not None:
                store[len(slots)] = picture
                slots[key] = len(slots)
            progress.update()
        if pool:
            pool.close()
            pool.join()
        store.flush()
        del store
    return slots


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from: " + ", ".join(TASKS))
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--local_dir", default="", help="read DIR/<owner>/<name>/<files> instead of downloading")
    parser.add_argument("--cache_dir", default="", help="huggingface_hub's download cache (default: its own)")
    parser.add_argument("--revision", action="append", default=[], metavar="TASK=COMMIT",
                        help="download TASK's repository at COMMIT instead of the pinned one")
    parser.add_argument("--image_size", type=int, default=224, help="square picture side (SigLIP-B/16: 224)")
    parser.add_argument("--vqav2_subset", type=int, default=0, help="keep N VQAv2 questions (0: all 214,354)")
    parser.add_argument("--subset_seed", type=int, default=1337)
    parser.add_argument("--max_samples", type=int, default=0, help="keep the first N rows of every task (0: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes decoding pictures")
    parser.add_argument("--overwrite", action="store_true", help="redo tasks that are already complete")
    args = parser.parse_args(argv)

    names = [n for n in args.tasks.split(",") if n]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"--tasks: unknown task {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(TASKS)}")
    if args.image_size < 8 or args.workers < 1:
        raise UserError(f"--image_size must be at least 8 (got {args.image_size}) and --workers positive "
                        f"(got {args.workers})")
    specs = {n: dict(TASKS[n]) for n in names}
    for override in args.revision:
        task, _, commit = override.partition("=")
        if task not in specs or not commit:
            raise UserError(f"--revision {override!r}: expected TASK=COMMIT with TASK one of {', '.join(names)}")
        specs[task]["revision"] = commit
    make_folder(args.out_dir, "--out_dir")

    for name, spec in specs.items():
        path = os.path.join(args.out_dir, f"eval_{name}.json")
        if os.path.exists(path) and not args.overwrite:
            print(f"{name}: {path} exists, skipped (--overwrite redoes it)")
            continue
        t0 = time.time()
        task = build_task(name, spec, args)
        write_json(path, task)
        skipped = ", ".join(f"{n:,} {reason}" for reason, n in task["skipped"].items()) or "none"
        pictures = f", {len(set(i['image'] for i in task['items'])):,} pictures" if task["modality"] == "vision" else ""
        print(f"{name}: {len(task['items']):,} items{pictures}, chance {task['chance']:.3f}; "
              f"skipped rows: {skipped}; {time.time() - t0:.1f} s")


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main()
