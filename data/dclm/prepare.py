"""
DCLM-Baseline (mlfoundations/dclm-baseline-1.0-parquet), the study's text corpus, as text shards.

    python data/dclm/prepare.py --max_tokens=30_000_000_000     # 28B tokens for config/1b.py
    python data/dclm/prepare.py --local_dir=DIR                  # files already on disk, no download

Each parquet file of the repository (column `text`, one document per row) becomes one shard
train_text_NNNNN.bin: every document tokenized with cl100k_base and ended by <|endoftext|>.
The repository's last file becomes val_text_00000.bin and is never trained on. Rows whose text
is missing or empty are skipped and counted. data/fineweb_edu/prepare.py reuses this script.
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
from data.shards import write_text_shard  # noqa: E402
from data.errors import UserError, report_user_errors  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ID = "mlfoundations/dclm-baseline-1.0-parquet"
REVISION = "main"  # the repository has not changed since its release; pass --revision=<commit> to pin one
PATTERNS = ["*.parquet"]


def tokenize_file(args, path, out_path):
    """One parquet file -> one text shard. Returns the skipped rows by reason."""
    local = fetch(args, path)
    parquet = open_parquet(local, [args.column])
    schema = parquet.schema_arrow
    if str(schema.field(args.column).type) not in ("string", "large_string"):
        raise UserError(f"{local}: column {args.column!r} holds {schema.field(args.column).type}, not strings")
    tok = Tokenizer()
    chunks, skipped = [], Counter()
    for batch in parquet.iter_batches(columns=[args.column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if not text or not text.strip():
                skipped["missing or empty text"] += 1
                continue
            chunks.append(np.array(tok.encode(text) + [tok.eot_id], dtype=np.uint32))
    write_text_shard(out_path, np.concatenate(chunks) if chunks else np.zeros(0, np.uint32), tok.vocab_size)
    done_with(args, local)
    return skipped


def main(argv=None, repo_id=REPO_ID, revision=REVISION, patterns=PATTERNS, out_dir=HERE, description=__doc__):
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    add_hub_args(parser, repo_id, revision)
    parser.add_argument("--out_dir", default=out_dir)
    parser.add_argument("--column", default="text", help="the parquet column holding each document")
    parser.add_argument("--max_tokens", type=int, default=0, help="stop after the training shards hold at least "
                        "this many tokens, in whole input files (0: the whole dataset)")
    args = parser.parse_args(argv)
    if args.num_proc < 1 or args.max_tokens < 0:
        raise UserError(f"--num_proc must be positive (got {args.num_proc}) and --max_tokens not negative "
                        f"(got {args.max_tokens})")
    files = list_files(args, patterns)
    if len(files) < 2:
        raise UserError(f"{args.local_dir or args.repo_id}: need at least 2 parquet files (the last one is "
                         f"the validation set), found {len(files)}")
    make_folder(args.out_dir, "--out_dir")
    shard_tokens = lambda shard: shard.num_tokens  # noqa: E731

    val = os.path.join(args.out_dir, "val_text_00000.bin")
    val_tokens, val_skipped = run_jobs(tokenize_file, [(val, (args, files[-1], val))], 1, shard_tokens)
    train = [os.path.join(args.out_dir, f"train_text_{i:05d}.bin") for i in range(len(files) - 1)]
    jobs = [(p, (args, f, p)) for p, f in zip(train, files[:-1])]
    tokens, train_skipped = run_jobs(tokenize_file, jobs, args.num_proc, shard_tokens, args.max_tokens)
    remove_stale(args.out_dir, ["train_text_*.bin"], train)
    report("validation", val_tokens, "tokens", val_skipped, args.out_dir)
    report("training", tokens, "tokens", train_skipped, args.out_dir)


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main()
