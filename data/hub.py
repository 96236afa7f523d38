"""
What every data/<source>/prepare.py shares: finding a dataset's files (on the Hugging Face Hub or
in a local folder laid out like the Hub repository), turning each input file into one output
shard on a pool of processes, a progress line, and resuming.

One input file -> one shard keeps resuming simple and exact: a shard that exists (writers write a
temporary file and rename it, so an existing shard is a whole one) is finished and never redone,
provided it was made from the same input file with the same settings: out_dir/sources.json
records, for every shard, its input (the Hub repository, revision and path, or the local file with
its size and time) and the settings that shape it. A shard made from something else is redone, and
remove_stale deletes shards of an earlier run that this run's inputs no longer make.
A budget (--max_tokens / --max_samples) takes input files in order until their shards hold at
least that much, so the same command always yields the same shards.

We call huggingface_hub directly rather than `datasets` or `webdataset`: one file at a time,
downloaded at a pinned revision when a worker needs it, with nothing between the file and us.
"""

import fnmatch
import glob
import json
import os
import sys
import time
from collections import Counter
from multiprocessing import Pool

from data.atomic import write_text
from data.errors import MissingFileError, UserError
from data.shards import ShardError, read_shard


def add_hub_args(parser, repo_id, revision):
    """The arguments every prepare script takes."""
    parser.add_argument("--repo_id", default=repo_id, help="dataset repository on the Hub")
    parser.add_argument("--revision", default=revision, help="commit, tag or branch to download")
    parser.add_argument("--local_dir", default="", help="read the files from this folder, laid out like the "
                        "Hub repository, instead of downloading them")
    parser.add_argument("--download_dir", default="", help="where downloaded files go (default: OUT_DIR/downloads)")
    parser.add_argument("--keep_downloads", action="store_true", help="keep each downloaded file after its shard "
                        "is written (by default it is deleted, so the disk holds shards and a few downloads)")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="worker processes")


def list_files(args, patterns, required=True):
    """The dataset's files (paths relative to the repository root) matching any pattern, sorted."""
    if args.local_dir:
        if not os.path.isdir(args.local_dir):
            raise MissingFileError(f"--local_dir {args.local_dir}: no such folder")
        paths = [os.path.relpath(p, args.local_dir)
                 for p in glob.glob(os.path.join(args.local_dir, "**", "*"), recursive=True) if os.path.isfile(p)]
        where = args.local_dir
    else:
        from huggingface_hub import list_repo_files
        paths = list_repo_files(args.repo_id, repo_type="dataset", revision=args.revision)
        where = f"{args.repo_id}@{args.revision}"
    chosen = sorted(p for p in paths if any(fnmatch.fnmatch(p, pattern) for pattern in patterns))
    if required and not chosen:
        raise MissingFileError(f"{where}: no files match {', '.join(patterns)}")
    return chosen


def fetch(args, path):
    """A local path to one of the dataset's files, downloading it first unless --local_dir holds it.
    Called inside the workers, so downloads overlap with processing."""
    if args.local_dir:
        return os.path.join(args.local_dir, path)
    from huggingface_hub import hf_hub_download
    return hf_hub_download(args.repo_id, path, repo_type="dataset", revision=args.revision,
                           local_dir=args.download_dir or os.path.join(args.out_dir, "downloads"))


def open_parquet(path, columns):
    """A pyarrow ParquetFile, checked to hold `columns`. A file that is not parquet, or lacks one
    of them, raises a UserError naming it (raised in a worker, the parent reports it)."""
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid, an OSError: not a parquet file
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise UserError(f"{path}: no column {', '.join(map(repr, missing))} "
                        f"(its columns: {', '.join(parquet.schema_arrow.names) or 'none'})")
    return parquet


def done_with(args, local):
    """Deletes a downloaded file once its shard is written (never a file of --local_dir)."""
    if not args.local_dir and not args.keep_downloads:
        os.remove(local)


def _call(job):
    worker, job_args = job
    return worker(*job_args)


# Settings that do not change what a shard holds: which files, how many, where, how fast.
NOT_SHARD_SETTINGS = {"repo_id", "revision", "local_dir", "download_dir", "keep_downloads", "num_proc", "out_dir",
                      "max_tokens", "max_samples", "dataset", "subsets", "train_pattern", "val_pattern"}


def shard_source(args, path):
    """What a shard is made from: its input file and the settings that shape it (sources.json)."""
    if args.local_dir:
        local = os.path.join(args.local_dir, path)
        stat = os.stat(local)
        source = {"file": os.path.abspath(local), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    else:
        source = {"repo": args.repo_id, "revision": args.revision, "file": path}
    return {**source, "settings": {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SHARD_SETTINGS}}


def read_sources(folder):
    path = os.path.join(folder, "sources.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def remove_stale(folder, patterns, keep):
    """Deletes the shards in folder that match patterns but are not in keep: an earlier run's,
    from more input files than this run has, which a training pattern such as train_text*.bin
    would otherwise pick up."""
    keep = {os.path.basename(p) for p in keep}
    stale = sorted({n for pattern in patterns for n in fnmatch.filter(os.listdir(folder), pattern)} - keep)
    sources = read_sources(folder)
    for name in stale:
        os.remove(os.path.join(folder, name))
        sources.pop(name, None)
    if stale:
        write_text(os.path.join(folder, "sources.json"), json.dumps(sources, indent=1))
        print(f"removed {len(stale)} shard(s) of an earlier run that this run's inputs do not make: "
              f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}")


def run_jobs(worker, jobs, num_proc, size_of, budget=0, unit="tokens", made_from=None):
    """Runs worker(*args) for each (out_path, args) in jobs, num_proc at a time. `made_from` says
    what each shard is made from (sources.json; a shard already there is kept only when it
    matches); by default shard_source of each job's first two args, which for the Hub
    preparers are (the parsed arguments, the input file's path). The worker writes out_path and
    returns a Counter of the rows it skipped, by reason. size_of(shard) measures a finished shard
    (in `unit`); once the shards, in job order, hold `budget` (0: no limit), the remaining jobs are
    cancelled and any shard they wrote is removed. Returns (total, skipped)."""
    if not jobs:
        raise UserError("nothing to prepare: no input files")
    folder = os.path.dirname(jobs[0][0])
    sources = read_sources(folder)
    made_from = made_from or [shard_source(*job_args[:2]) for _, job_args in jobs]
    finished = {}
    for i, (out_path, _) in enumerate(jobs):
        if os.path.exists(out_path) and sources.get(os.path.basename(out_path)) == made_from[i]:
            try:
                finished[i] = size_of(read_shard(out_path))
            except ShardError:
                pass  # cannot happen to a shard we renamed into place; redo it anyway
    todo = [i for i in range(len(jobs)) if i not in finished]
    total, skipped, start, stop = 0, Counter(), time.time(), len(jobs)
    pool = Pool(max(1, min(num_proc, len(todo)))) if todo else None
    try:
        results = pool.imap(_call, [(worker, jobs[i][1]) for i in todo]) if pool else iter(())
        for i, (out_path, _) in enumerate(jobs):
            if i in finished:
                total += finished[i]
            else:
                skipped += next(results)
                total += size_of(read_shard(out_path))
                sources[os.path.basename(out_path)] = made_from[i]
                write_text(os.path.join(folder, "sources.json"), json.dumps(sources, indent=1))
            print(f"\r{i + 1}/{len(jobs)} files, {total:,} {unit} ({len(finished)} shards already there), "
                  f"{time.time() - start:.0f} s", end="", file=sys.stderr, flush=True)
            if budget and total >= budget:
                stop = i + 1
                break
    finally:
        print(file=sys.stderr)
        if pool:
            pool.terminate()
            pool.join()
        for folder in {os.path.dirname(out_path) for out_path, _ in jobs}:
            for name in fnmatch.filter(os.listdir(folder), "*.bin.tmp*"):
                os.remove(os.path.join(folder, name))  # a killed worker's unfinished shard
    for j in todo:
        if j >= stop and os.path.exists(jobs[j][0]):
            os.remove(jobs[j][0])  # written by a job that the budget cancelled
    return total, skipped


def report(what, total, unit, skipped, out_dir):
    """The closing lines: what was written and every skipped row, by reason."""
    print(f"{what}: {total:,} {unit} in {out_dir}")
    for reason, n in sorted(skipped.items()):
        print(f"  skipped {n:,} rows: {reason}")
