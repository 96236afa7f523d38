"""
Instruction conversations about pictures from HuggingFaceM4/the_cauldron as conversation shards,
for finetune.py (config/1b_sft.py).

    python data/cauldron/prepare.py                                   # the default subsets below
    python data/cauldron/prepare.py --subsets=vqav2,aokvqa --max_samples=100000
    python data/cauldron/prepare.py --local_dir=DIR                   # files already on disk

Why the_cauldron and not LLaVA-Instruct-150K: LLaVA's JSON names COCO train2017 pictures that its
repository does not carry (cocodataset.org's 19 GB zip, on the Hub only as individuals' re-uploads,
so a second, unofficial download and a join by file name), while each of
the_cauldron's ~50 subsets is a folder {subset}/train-*.parquet whose rows carry their pictures:
column `images` (a list of struct<bytes: binary, path: string>) and column `texts` (a list of
struct<user, assistant, source>, one per turn). One source, one download rule, one pinned revision.
The default subsets are the cauldron's versions of what LLaVA-665k mixes in (VQAv2, OK-VQA,
A-OKVQA, OCR-VQA, TextCaps, Visual7W, COCO-QA) plus localized narratives for long answers.

Each row becomes one conversation: its picture (prepared by data/images.py's load_image), then
the turns <|user|> question <|end|> <|assistant|> answer <|end|> ..., with the loss on the
answers and their closing <|end|> only (Tokenizer.encode_conversation). Our conversation shard
holds exactly one picture per conversation, so rows with several pictures (nlvr2, spot_the_diff,
...) or none are skipped and counted, as are undecodable pictures and empty turns. Each parquet
file becomes train_chat_{subset}_NNNNN.bin; every --val_every-th row of it goes to the matching
val_chat_{subset}_NNNNN.bin instead (the cauldron has only a training split).
"""

import argparse
import os
import sys
from collections import Counter

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.atomic import make_folder  # noqa: E402
from data.hub import (add_hub_args, done_with, fetch, list_files, open_parquet, remove_stale, report,  # noqa: E402
                      run_jobs)
from data.images import load_image  # noqa: E402
from data.errors import UserError, report_user_errors  # noqa: E402
from data.shards import write_conversation_shard  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402

REPO_ID = "HuggingFaceM4/the_cauldron"
REVISION = "main"  # pass --revision=<commit> to pin one
SUBSETS = "vqav2,okvqa,aokvqa,ocrvqa,textcaps,visual7w,cocoqa,localized_narratives"


def conversation_of(row, tok, image_size, skipped):
    """(image, ids, loss_mask) of one parquet row, or None (counted in skipped)."""
    images, texts = row["images"] or [], row["texts"] or []
    if len(images) != 1:
        skipped["no picture" if not images else "several pictures (a shard holds one per conversation)"] += 1
        return None
    turns = []
    for turn in texts:
        if not turn or not (turn.get("user") or "").strip() or not (turn.get("assistant") or "").strip():
            skipped["an empty turn"] += 1
            return None
        turns += [("user", turn["user"].strip()), ("assistant", turn["assistant"].strip())]
    if not turns:
        skipped["no turns"] += 1
        return None
    try:
        image = load_image((images[0] or {}).get("bytes") or b"", image_size)
    except ValueError:
        skipped["undecodable picture"] += 1
        return None
    ids, mask = tok.encode_conversation(turns)
    return image, ids, mask


def convert_file(args, path, out_path, val_path):
    """One parquet file -> a training and a validation conversation shard. Returns skipped rows by reason."""
    local = fetch(args, path)
    parquet = open_parquet(local, ["images", "texts"])
    tok = Tokenizer()
    skipped = Counter()
    splits = {"train": ([], [], []), "val": ([], [], [])}
    row_index = 0
    for batch in parquet.iter_batches(columns=["images", "texts"], batch_size=256):
        for row in batch.to_pylist():
            split = "val" if row_index % args.val_every == 0 else "train"
            row_index += 1
            sample = conversation_of(row, tok, args.image_size, skipped)
            if sample is not None:
                for part, value in zip(splits[split], sample):
                    part.append(value)
    for split, out in (("val", val_path), ("train", out_path)):  # train last: its existence means done
        images, ids, masks = splits[split]
        images = np.stack(images) if images else np.zeros((0, args.image_size, args.image_size, 3), np.uint8)
        write_conversation_shard(out, images, ids, masks, tok.vocab_size)
    done_with(args, local)
    return skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_hub_args(parser, REPO_ID, REVISION)
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--subsets", default=SUBSETS, help="comma-separated folders of the repository")
    parser.add_argument("--image_size", type=int, default=224, help="the model's image_size (224 for SigLIP-B/16)")
    parser.add_argument("--val_every", type=int, default=200, help="every N-th row is a validation conversation")
    parser.add_argument("--max_samples", type=int, default=0, help="stop after the training shards hold at "
                        "least this many conversations, in whole files (0: all)")
    args = parser.parse_args(argv)
    if args.image_size < 8 or args.val_every < 2 or args.num_proc < 1:
        raise UserError(f"--image_size must be at least 8 (got {args.image_size}), --val_every at least 2 "
                        f"(got {args.val_every}) and --num_proc positive (got {args.num_proc})")
    subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    if not subsets:
        raise UserError("--subsets names no subset")
    files = {subset: list_files(args, [f"{subset}/*.parquet"]) for subset in subsets}
    jobs = []  # subsets take turns, file by file, so that a --max_samples slice mixes them all
    for i in range(max(len(paths) for paths in files.values())):
        for subset, paths in files.items():
            if i < len(paths):
                out, val = (os.path.join(args.out_dir, f"{split}_chat_{subset}_{i:05d}.bin") for split in ("train", "val"))
                jobs.append((out, (args, paths[i], out, val)))
    make_folder(args.out_dir, "--out_dir")
    n, skipped = run_jobs(convert_file, jobs, args.num_proc, lambda shard: shard.num_samples, args.max_samples,
                          unit="conversations")
    for out, (_, _, _, val) in jobs:
        if not os.path.exists(out) and os.path.exists(val):
            os.remove(val)  # a job cancelled by --max_samples: its validation rows go with it
    remove_stale(args.out_dir, ["train_chat_*.bin", "val_chat_*.bin"], [p for _, job in jobs for p in job[2:]])
    report("training", n, "conversations", skipped, args.out_dir)


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main()
