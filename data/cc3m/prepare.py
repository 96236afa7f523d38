"""
Conceptual Captions (CC3M, or CC12M with --dataset=cc12m) from their webdataset tars on the Hub
as image-caption shards.

    python data/cc3m/prepare.py                        # pixparse/cc3m-wds: 2.9M pairs, for config/79m.py
    python data/cc3m/prepare.py --dataset=cc12m        # pixparse/cc12m-wds: about 10M pairs, for config/1b.py
    python data/cc3m/prepare.py --local_dir=DIR        # tars already on disk, no download

Each tar holds samples as members {key}.jpg (the picture) and {key}.txt (its caption), the
webdataset convention, read here with the standard library's tarfile. Each training tar becomes
one shard train_caption_NNNNN.bin; the first validation tar (CC3M) or, where the set has no
validation split (CC12M), the last training tar becomes val_caption_00000.bin. Every picture
goes through data/images.py's load_image: RGB, bicubic resize of the whole picture straight to
--image_size x --image_size, no crop, as SigLIP was trained. A sample whose picture does not
decode, whose caption is empty, or that lacks one of its two members is skipped and counted.
"""

import argparse
import os
import sys
import tarfile
from collections import Counter

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.atomic import make_folder  # noqa: E402
from data.hub import add_hub_args, done_with, fetch, list_files, remove_stale, report, run_jobs  # noqa: E402
from data.images import load_image  # noqa: E402
from data.errors import UserError, report_user_errors  # noqa: E402
from data.shards import write_image_caption_shard  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402

DATASETS = {  # repository, revision, training tars, validation tars
    # 46f3d69: the repository's latest commit when this was written (2023-12-15)
    "cc3m": ("pixparse/cc3m-wds", "46f3d69f840e59d77d52e8decfe5baec97e94c7f",
             "cc3m-train-*.tar", "cc3m-validation-*.tar"),
    "cc12m": ("pixparse/cc12m-wds", "main", "cc12m-train-*.tar", ""),  # pass --revision=<commit> to pin one
}


def samples_of(tar, local, image_ext, caption_ext):
    """{key: {extension: member}} in the tar's order; raises if no member has an extension we need."""
    samples = {}
    for member in tar.getmembers():
        if member.isfile():
            folder, base = os.path.split(member.name)
            key, _, ext = base.partition(".")
            samples.setdefault(os.path.join(folder, key), {})[ext] = member
    for ext in (image_ext, caption_ext):
        if not any(ext in s for s in samples.values()):
            raise UserError(f"{local}: no {{key}}.{ext} members (a webdataset tar of {{key}}.{image_ext} + "
                             f"{{key}}.{caption_ext} pairs was expected)")
    return samples


def convert_tar(args, path, out_path):
    """One webdataset tar -> one image-caption shard. Returns the skipped samples by reason."""
    local = fetch(args, path)
    tok = Tokenizer()
    skipped = Counter()
    try:
        tar = tarfile.open(local)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{local}: not a readable tar file ({type(e).__name__})") from None
    with tar:
        samples = samples_of(tar, local, args.image_ext, args.caption_ext)
        images = np.empty((len(samples), args.image_size, args.image_size, 3), dtype=np.uint8)
        captions = []
        for members in samples.values():
            if args.image_ext not in members or args.caption_ext not in members:
                skipped[f"a {{key}}.{args.image_ext} or {{key}}.{args.caption_ext} member missing"] += 1
                continue
            caption = tar.extractfile(members[args.caption_ext]).read().decode("utf-8", errors="replace").strip()
            if not caption:
                skipped["empty caption"] += 1
                continue
            try:
                images[len(captions)] = load_image(tar.extractfile(members[args.image_ext]).read(), args.image_size)
            except ValueError:
                skipped["undecodable image"] += 1
                continue
            captions.append(tok.encode(caption))
    write_image_caption_shard(out_path, images[:len(captions)], captions, tok.vocab_size)
    done_with(args, local)
    return skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cc3m", choices=sorted(DATASETS))
    known, _ = parser.parse_known_args(argv)
    repo_id, revision, train_pattern, val_pattern = DATASETS[known.dataset]
    add_hub_args(parser, repo_id, revision)
    data_folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--out_dir", default=os.path.join(data_folder, known.dataset))
    parser.add_argument("--image_size", type=int, default=224, help="the model's image_size (224 for SigLIP-B/16)")
    parser.add_argument("--train_pattern", default=train_pattern)
    parser.add_argument("--val_pattern", default=val_pattern, help='"": hold out the last training tar')
    parser.add_argument("--image_ext", default="jpg")
    parser.add_argument("--caption_ext", default="txt")
    parser.add_argument("--max_samples", type=int, default=0, help="stop after the training shards hold at "
                        "least this many pairs, in whole tars (0: the whole dataset)")
    args = parser.parse_args(argv)
    if args.image_size < 8 or args.num_proc < 1:
        raise UserError(f"--image_size must be at least 8 (got {args.image_size}) and --num_proc positive "
                        f"(got {args.num_proc})")
    train = list_files(args, [args.train_pattern])
    val = list_files(args, [args.val_pattern]) if args.val_pattern else []
    if not val:
        if len(train) < 2:
            raise UserError(f"{args.local_dir or args.repo_id}: no validation tars and only {len(train)} "
                             "training tar to hold one out from")
        train, val = train[:-1], train[-1:]
    make_folder(args.out_dir, "--out_dir")
    shard_samples = lambda shard: shard.num_samples  # noqa: E731

    val_path = os.path.join(args.out_dir, "val_caption_00000.bin")
    val_n, val_skipped = run_jobs(convert_tar, [(val_path, (args, val[0], val_path))], 1, shard_samples,
                                  unit="pairs")
    paths = [os.path.join(args.out_dir, f"train_caption_{i:05d}.bin") for i in range(len(train))]
    jobs = [(p, (args, f, p)) for p, f in zip(paths, train)]
    n, skipped = run_jobs(convert_tar, jobs, args.num_proc, shard_samples, args.max_samples, unit="pairs")
    remove_stale(args.out_dir, ["train_caption_*.bin"], paths)
    report("validation", val_n, "pairs", val_skipped, args.out_dir)
    report("training", n, "pairs", skipped, args.out_dir)


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main()
