"""
Your own files as training shards and evaluate.py tasks: conversations, image-caption pairs and
evaluation sets, in a vocabulary that fits them.

    python data/own/prepare.py --out_dir=data/own/shapes --vocab=out/toy/ckpt.pt \\
        --conversations=shapes/train.json --eval=shapes/test.jsonl
    python data/own/prepare.py --out_dir=data/own/photos --vocab=full --image_size=224 --captions=photos.csv

What it reads (any mix; each option may be given several times; NAME is the file's name without
its extension, or the folder's name):
  --conversations FILE  LLaVA's instruction format, a JSON list (or JSONL) of {"image": "rel/path.jpg",
                        "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
                        "value": "..."}, ...]} -> train_chat_NAME_NNNNN.bin, val_chat_NAME_NNNNN.bin
                        ("human"/"user" and "gpt"/"assistant" turns; "<image>" marks are dropped: the
                        picture always comes first, as the shards hold it)
  --captions PATH       image-caption pairs: JSONL rows {"image", "caption"}, a CSV file with columns
                        "image" and "caption", or a folder of {key}.jpg (or .png, ...) + {key}.txt
                        -> train_caption_NAME_NNNNN.bin, val_caption_NAME_NNNNN.bin (for pretrain.py)
  --eval FILE           an evaluation set, JSONL rows {"image", "question", "answer": a string or a
                        list of references, optional "options", "answer_type", "id"}
                        -> eval_NAME.json + eval_NAME_images.npy, an evaluate.py task of one kind:
                        multiple_choice when rows carry "options" (the answer must be one of them);
                        else yes_no when every answer is yes or no; else open, scored by --metric
                        ("vqa": the VQA soft accuracy, exact match when a row has fewer than 3
                        references; "exact_match": GQA's rule)
Image paths are relative to --image_dir (default: the folder of the file naming them). Every
--val_every-th row of a training file goes to validation (finetune.py needs some).

--vocab picks the token ids (meta.json records the choice; data/tokenizer.py reads it):
  full      all of cl100k_base (100,352 ids): spells any text; what real-data models use
  compact   only the cl100k ids these files use, like the toy world: a small output layer, for a
            model trained from scratch on this data
  CKPT      the compact vocabulary of checkpoint CKPT plus the ids of these files' words it lacks:
            finetune.py gives the added ids embedding and output rows of their own, so a toy
            checkpoint learns new words (a full-vocabulary checkpoint keeps the full vocabulary).
            --image_size then defaults to the checkpoint's and must equal it.

As the Hub preparers: every picture goes through data/images.py's load_image; rows that cannot be
used (no image, a missing or undecodable image file, an empty caption or turn, an answer that is
not among the options, ...) are skipped and counted by reason; a file that cannot be read at all
stops it with one line naming the file. Shards hold --shard_rows rows of a file each, written on
--num_proc processes; a re-run skips shards and tasks already written (meta.json, written first,
pins the vocabulary and image size: a re-run, with these files or new ones, keeps them, and is
refused where its files need words the vocabulary lacks or pictures of another size).
"""

import argparse
import csv
import json
import os
import sys
from collections import Counter
from multiprocessing import Pool

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.atomic import atomic_write  # noqa: E402
from data.benchmarks.prepare import Progress, Skip, decode, write_json  # noqa: E402
from data.errors import MissingFileError, UserError, report_user_errors  # noqa: E402
from data.hub import remove_stale, report, run_jobs  # noqa: E402
from data.images import load_image  # noqa: E402
from data.shards import read_shard, write_conversation_shard, write_image_caption_shard  # noqa: E402
from data.tokenizer import Tokenizer, extended_vocab  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
OPEN_METRICS = ("vqa", "exact_match", "vqa_evalai")  # evaluate.py's names


# ----------------------------------------------------------------------------------------------
# Reading the files: each row becomes a sample (image path and text) or a reason to skip it

def read_json_rows(path):
    """The objects of a JSON list or of a JSONL file (one per line). A JSONL line that is not JSON
    is a bad row (returned as a Skip); a JSON file that is not a list is a bad file."""
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                rows = json.load(f)
                if not isinstance(rows, list):
                    raise UserError(f"{path}: expected a JSON list of rows, got a JSON {type(rows).__name__}")
                return rows
            lines = [line for line in f if line.strip()]
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); a file of one object a line "
                        "must be named .jsonl") from None
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append(Skip("a line that is not JSON"))
    return rows


def read_csv_rows(path):
    """The rows of a CSV file with a header, as dicts."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read it as CSV ({e})") from None
    missing = [c for c in ("image", "caption") if c not in columns]
    if missing:
        raise UserError(f"{path}: no column {', '.join(map(repr, missing))} in its header line "
                        f"(it has {', '.join(map(repr, columns)) or 'none'})")
    return rows


def read_caption_folder(folder):
    """{key}.jpg + {key}.txt pairs of a folder (and its subfolders) as rows {"image", "caption"};
    a key with only one of the two becomes a Skip."""
    members = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            key, ext = os.path.splitext(os.path.relpath(os.path.join(root, name), folder))
            members.setdefault(key, {})[ext.lower()] = os.path.join(root, name)
    rows = []
    for key, files in members.items():
        images = [files[ext] for ext in IMAGE_EXTENSIONS if ext in files]
        if not images or ".txt" not in files:
            rows.append(Skip("an image or a .txt caption without the other"))
            continue
        try:
            with open(files[".txt"], encoding="utf-8") as f:
                rows.append({"image": images[0], "caption": f.read()})
        except (OSError, UnicodeDecodeError):
            rows.append(Skip("a caption file that is not UTF-8 text"))
    return rows


def text_field(row, key):
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Skip(f"no {key}" if value is None else f"an empty or non-text {key}")
    return value.strip()


def image_field(row, image_dir):
    """The path of a row's one picture, checked to exist."""
    value = row.get("image")
    if isinstance(value, list):  # some LLaVA variants list the pictures
        if len(value) > 1:
            raise Skip("several images (a conversation shard holds one per row)")
        value = value[0] if value else None
    if not isinstance(value, str) or not value.strip():
        raise Skip("no image")
    path = os.path.join(image_dir, value.strip())
    if not os.path.isfile(path):
        raise Skip("image file missing")
    return path


def without_image_mark(text):
    """LLaVA's "<image>" mark says where the picture goes; our rows always put it first."""
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()


def conversation_sample(row, image_dir):
    """A LLaVA row -> (image path, [(role, text), ...])."""
    turns = []
    for turn in row.get("conversations") or []:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            raise Skip("a turn not from human/user or gpt/assistant")
        text = without_image_mark(turn.get("value") if isinstance(turn.get("value"), str) else "")
        if not text:
            raise Skip("an empty turn")
        turns.append((ROLES[turn["from"]], text))
    if not turns:
        raise Skip("no conversations")
    if turns[0][0] != "user" or "assistant" not in [role for role, _ in turns]:
        raise Skip("no user question followed by an answer")
    return image_field(row, image_dir), turns


def caption_sample(row, image_dir):
    """A caption row -> (image path, caption)."""
    return image_field(row, image_dir), text_field(row, "caption")


def eval_sample(row, image_dir):
    """An evaluation row -> (image path, item without its picture's slot)."""
    question = without_image_mark(text_field(row, "question"))
    answers = row.get("answer", row.get("answers"))
    answers = [answers] if isinstance(answers, str) else answers
    if isinstance(answers, list):  # VQA's own files list {"answer": ...} objects
        answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise Skip("no answer")
    item = {"id": row.get("id"), "prompt": question, "answer": [a.strip() for a in answers]}
    options = row.get("options")
    if options is not None:
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip()
                                                                         for o in options):
            raise Skip("options that are not a list of two or more texts")
        item["options"] = [o.strip() for o in options]
        if item["answer"][0] not in item["options"]:
            raise Skip("an answer that is not one of the options")
    if row.get("answer_type") is not None:
        item["answer_type"] = str(row["answer_type"])
    return image_field(row, image_dir), item


def parse_rows(rows, parse, image_dir, skipped):
    """[(row number, sample)] of the usable rows; the others counted in skipped by reason."""
    samples = []
    for number, row in enumerate(rows):
        try:
            if isinstance(row, Skip):
                raise row
            if not isinstance(row, dict):
                raise Skip("a row that is not an object")
            samples.append((number, parse(row, image_dir)))
        except Skip as reason:
            skipped[str(reason)] += 1
    return samples


# ----------------------------------------------------------------------------------------------
# Training files: shards of --shard_rows rows, on a pool of processes

def write_training_shards(kind, samples, first_row, args, vocab, train_path, val_path):
    """Worker: decodes the pictures of one slice of a file's rows and writes its validation
    shard (every --val_every-th row, if any) and then its training shard. Returns skipped rows."""
    tok = Tokenizer(vocab)
    skipped = Counter()
    splits = {"train": ([], [], []), "val": ([], [], [])}
    for number, (image_path, text) in samples:
        try:
            image = load_image(image_path, args.image_size)
        except UserError:
            skipped["undecodable image"] += 1
            continue
        ids, mask = tok.encode_conversation(text) if kind == "chat" else (tok.encode(text), None)
        for part, value in zip(splits["val" if number % args.val_every == 0 else "train"], (image, ids, mask)):
            part.append(value)
    if not splits["train"][0]:
        raise UserError(f"{train_path}: rows {first_row} to {first_row + args.shard_rows - 1} of its file hold "
                        f"no usable training row (skipped: {dict(skipped)})")
    for path, (images, ids, masks) in ((val_path, splits["val"]), (train_path, splits["train"])):  # train last
        if not images:
            continue  # a slice without validation rows
        if kind == "chat":
            write_conversation_shard(path, np.stack(images), ids, masks, tok.vocab_size)
        else:
            write_image_caption_shard(path, np.stack(images), ids, tok.vocab_size)
    return skipped


def prepare_training_file(kind, name, path, samples, skipped, args, vocab):
    """All shards of one training file; prints what it wrote and skipped."""
    jobs, sources = [], []
    stat = os.stat(path)
    chunks = {}  # first row of a shard's slice -> its samples, in order
    for n, sample in samples:
        chunks.setdefault(n - n % args.shard_rows, []).append((n, sample))
    for start, chunk in sorted(chunks.items()):
        train, val = (os.path.join(args.out_dir, f"{split}_{kind}_{name}_{len(jobs):05d}.bin")
                      for split in ("train", "val"))
        jobs.append((train, (kind, chunk, start, args, vocab, train, val)))
        # what a shard already there must have been made from to be kept (sources.json)
        sources.append({"file": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "first_row": start, "settings": {"image_size": args.image_size, "vocab": args.vocab,
                                                         "val_every": args.val_every,
                                                         "shard_rows": args.shard_rows}})
    # an earlier run over more rows of this file left shards past this run's last: they would join training
    remove_stale(args.out_dir, [f"{split}_{kind}_{name}_*.bin" for split in ("train", "val")],
                 [p for _, (*_, train, val) in jobs for p in (train, val)])
    unit = "conversations" if kind == "chat" else "pairs"
    n, decode_skips = run_jobs(write_training_shards, jobs, args.num_proc, lambda shard: shard.num_samples,
                               unit=unit, made_from=sources)
    n_val = sum(read_shard(val).num_samples for _, (*_, val) in jobs if os.path.exists(val))
    report(f"{name}: training", n, unit, skipped + decode_skips, args.out_dir)
    print(f"{name}: validation: {n_val:,} {unit}")
    if n_val == 0:
        raise UserError(f"{name}: no validation rows; lower --val_every (now {args.val_every})")


# ----------------------------------------------------------------------------------------------
# Evaluation files: one evaluate.py task each

def task_of(name, path, samples, skipped, args):
    """The task's kind, chance and items; the items that do not fit the kind are skipped."""
    rows = len(samples) + sum(skipped.values())
    items = [item for _, (_, item) in samples]
    if any("options" in item for item in items):
        kind = "multiple_choice"
    elif items and all(a.lower() in ("yes", "no") for item in items for a in item["answer"]):
        kind = "yes_no"
    else:
        kind = "open"
    kept = []
    for number, (image_path, item) in samples:
        if kind == "multiple_choice" and "options" not in item:
            skipped["no options (other rows have them)"] += 1
            continue
        if kind == "multiple_choice":
            item["answer"] = item["options"].index(item["answer"][0])
        elif kind == "yes_no":
            item["answer"] = item["answer"][0].lower()
        item["id"] = number if item["id"] is None else item["id"]
        kept.append((image_path, item))
    task = {"name": name, "modality": "vision", "kind": kind}
    if kind == "multiple_choice":
        task["delimiter"] = ""  # options follow the chat prompt's <|assistant|> directly
        task["chance"] = float(np.mean([1 / len(item["options"]) for _, item in kept])) if kept else 0.0
    else:
        task["chance"] = 0.5 if kind == "yes_no" else 0.0
    if kind == "open":
        task["metric"] = args.metric
    task["description"] = f"{path}: {kind}" + (f", scored by {args.metric}" if kind == "open" else "")
    task["source"] = {"file": os.path.abspath(path), "rows": rows}
    return task, kept


def prepare_eval_file(name, path, samples, skipped, args):
    """eval_NAME_images.npy (each picture once) and then eval_NAME.json, whose presence means done."""
    task_path = os.path.join(args.out_dir, f"eval_{name}.json")
    if os.path.exists(task_path):
        print(f"{name}: {task_path} exists, skipped")
        return
    task, kept = task_of(name, path, samples, skipped, args)
    pictures = list(dict.fromkeys(image_path for image_path, _ in kept))
    images_path = os.path.join(args.out_dir, f"eval_{name}_images.npy")
    slots = {}
    with atomic_write(images_path, mode=None) as tmp:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                          shape=(len(pictures), args.image_size, args.image_size, 3))
        progress = Progress(name, len(pictures))
        jobs = [(p, p, args.image_size) for p in pictures]
        with Pool(max(1, min(args.num_proc, len(jobs)))) as pool:
            for image_path, picture in pool.imap(decode, jobs, chunksize=8):
                if picture is not None:
                    store[len(slots)] = picture
                    slots[image_path] = len(slots)
                progress.update()
        store.flush()
        del store
    skipped["undecodable image"] += sum(image_path not in slots for image_path, _ in kept)
    task["images"] = os.path.basename(images_path)
    task["skipped"] = {reason: n for reason, n in sorted(skipped.items()) if n}
    task["items"] = [dict(item, image=slots[image_path]) for image_path, item in kept if image_path in slots]
    if not task["items"]:
        raise UserError(f"{path}: no usable rows (skipped: {task['skipped']})")
    write_json(task_path, task)
    skips = ", ".join(f"{n:,} {reason}" for reason, n in task["skipped"].items()) or "none"
    print(f"{name}: {task['kind']} task of {len(task['items']):,} items, {len(slots):,} pictures, chance "
          f"{task['chance']:.3f} -> {task_path}; skipped rows: {skips}")


# ----------------------------------------------------------------------------------------------
# The vocabulary

def checkpoint_facts(path):
    """(compact vocabulary or None, image size) of a checkpoint, read without the project's root
    modules (data/ imports none)."""
    import torch
    if not os.path.isfile(path):
        raise MissingFileError(f"--vocab {path}: no such checkpoint (or give full or compact)")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise UserError(f"--vocab {path}: cannot be read as a checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise UserError(f"--vocab {path}: not a checkpoint written by pretrain.py or finetune.py")
    return checkpoint.get("compact_vocab"), checkpoint["model_config"]["image_size"]


def texts_of(kind, samples):
    """Every text a model will read or be scored on, for the vocabulary."""
    for _, (_, sample) in samples:
        if kind == "chat":
            yield from (text for _, text in sample)
        elif kind == "caption":
            yield sample
        else:
            yield sample["prompt"]
            yield from sample["answer"] + sample.get("options", [])
            yield from ("yes", "no")  # what a yes/no task compares


def vocab_already_there(meta_path, vocab, image_size):
    """On a re-run, the vocabulary that the files already in the folder were written with: it must
    spell everything `vocab` does (a re-run with the same files, or some of them, or new files in
    the same words), and the pictures must keep their size; anything else is refused rather than
    mixing two vocabularies in one folder."""
    if not os.path.exists(meta_path):
        return vocab
    with open(meta_path) as f:
        before = json.load(f)
    old = before.get("compact_vocab")
    if before.get("image_size") != [image_size, image_size]:
        problem = f"pictures of {before.get('image_size')}"
    elif old is None and vocab is not None:
        problem = "the full vocabulary"
    elif old is not None and vocab is None:
        problem = "a compact vocabulary, not the full one"
    elif vocab is not None and not set(vocab) <= set(old):
        problem = "a vocabulary that lacks words these files use"
    else:
        return old
    raise UserError(f"{meta_path}: this folder was prepared with {problem}; give another --out_dir, or delete "
                    "the folder to prepare it afresh")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=HERE)
    parser.add_argument("--conversations", action="append", default=[], metavar="FILE")
    parser.add_argument("--captions", action="append", default=[], metavar="PATH")
    parser.add_argument("--eval", action="append", default=[], metavar="FILE")
    parser.add_argument("--image_dir", default="", help="image paths are relative to it (default: the folder "
                        "of the file naming them)")
    parser.add_argument("--vocab", default="compact", help="full, compact, or a checkpoint to extend")
    parser.add_argument("--image_size", type=int, default=0, help="the model's image_size (default: the "
                        "checkpoint's with --vocab=CKPT, else 224)")
    parser.add_argument("--metric", default="vqa", choices=OPEN_METRICS, help="how open answers are scored")
    parser.add_argument("--val_every", type=int, default=20, help="every N-th training row is a validation row")
    parser.add_argument("--shard_rows", type=int, default=5000, help="rows of a file per shard")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="worker processes")
    args = parser.parse_args(argv)
    sources = [("chat", p) for p in args.conversations] + [("caption", p) for p in args.captions] + \
              [("eval", p) for p in args.eval]
    if not sources:
        parser.error("give at least one of --conversations, --captions, --eval")
    if args.image_size < 0 or args.val_every < 2 or args.shard_rows < args.val_every or args.num_proc < 1:
        parser.error("--image_size must be positive, --val_every at least 2, --shard_rows at least --val_every "
                     "and --num_proc at least 1")
    names = [os.path.splitext(os.path.basename(os.path.normpath(p)))[0] for _, p in sources]
    for name in names:
        if names.count(name) > 1 or not name:
            raise UserError(f"two inputs are named {name!r} (a file's name, without its extension, names its "
                            "shards or task): rename one")

    if args.vocab in ("full", "compact"):
        base_vocab, image_size = None, args.image_size or 224
    else:
        base_vocab, image_size = checkpoint_facts(args.vocab)
        if args.image_size and args.image_size != image_size:
            raise UserError(f"--image_size {args.image_size}: {args.vocab} was trained on {image_size}x{image_size} "
                            "pictures; prepare at its size, or leave --image_size out")
    args.image_size = image_size

    parsed = []  # (kind, name, path, samples, skipped): all text is read before the vocabulary is chosen
    for (kind, path), name in zip(sources, names):
        image_dir = args.image_dir or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        if kind == "caption" and os.path.isdir(path):
            rows = read_caption_folder(path)
        elif kind == "caption" and path.endswith(".csv"):
            rows = read_csv_rows(path)
        else:
            rows = read_json_rows(path)
        parse = {"chat": conversation_sample, "caption": caption_sample, "eval": eval_sample}[kind]
        skipped = Counter()
        samples = parse_rows(rows, parse, image_dir, skipped)
        if not samples:
            raise UserError(f"{path}: no usable rows among {len(rows)} (skipped: {dict(skipped)})")
        parsed.append((kind, name, path, samples, skipped))

    texts = [text for kind, _, _, samples, _ in parsed for text in texts_of(kind, samples)]
    if args.vocab == "full":
        vocab = None
    elif args.vocab == "compact":
        vocab = Tokenizer.cl100k_ids_of(texts)
    else:
        vocab = extended_vocab(base_vocab, texts)
    os.makedirs(args.out_dir, exist_ok=True)
    meta_path = os.path.join(args.out_dir, "meta.json")
    vocab = vocab_already_there(meta_path, vocab, image_size)
    added = 0 if base_vocab is None or vocab is None else len(vocab) - len(base_vocab)
    meta = {"format": 1, "tokenizer": "cl100k_base", "compact_vocab": vocab,
            "vocab_size": Tokenizer(vocab).vocab_size, "image_size": [image_size, image_size],
            "vocab_from": args.vocab, "added_to_checkpoint_vocab": added}
    write_json(meta_path, meta)
    source = {"full": "cl100k_base", "compact": "the ids these files use"}.get(args.vocab, f"{args.vocab}'s, "
                                                                                             f"{added:,} ids added")
    print(f"vocabulary: {meta['vocab_size']:,} ids ({source}); pictures {image_size}x{image_size} -> {args.out_dir}")

    for kind, name, path, samples, skipped in parsed:
        if kind == "eval":
            prepare_eval_file(name, path, samples, skipped, args)
        else:
            prepare_training_file(kind, name, path, samples, skipped, args, vocab)


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main()
