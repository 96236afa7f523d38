"""
How fast the pretraining loader serves batches from memory-mapped shards, on this machine.

    python -m data.bench_loader                 # the 1B shapes: rows of 2048 tokens, 224x224 images
    python -m data.bench_loader --seq_len=256 --image_size=32 --batch_size=16   # the toy world

It writes synthetic shards in the real formats to a temporary folder, touches them once so
they sit in the page cache (as shards being trained on do), then times next_batch() for text
rows only, image-caption rows only and the 10% mix. A 1B model on one GPU consumes about
50k tokens/s; the loader should serve at least 100x that, so it is never the bottleneck.

    python -m data.bench_loader --photos=a.jpg,b.jpg    # also: what JPEG in the shards would cost

With --photos it also measures the alternative to raw uint8 images in the shards: each photo
cut into pictures (crops at several scales, resized by data/images.py's rule), encoded as JPEG,
then the bytes per picture and how many pictures one core decodes per second.
"""

import argparse
import io
import os
import tempfile
import time

import numpy as np

from PIL import Image

from data.errors import report_user_errors
from data import shards
from data.images import load_image
from data.loader import MixedLoader
from data.tokenizer import FULL_VOCAB_SIZE, Tokenizer

VOCAB = FULL_VOCAB_SIZE


def write_shards(folder, text_tokens, n_images, image_size, caption_len):
    rng = np.random.default_rng(0)
    text = os.path.join(folder, "text.bin")
    shards.write_text_shard(text, rng.integers(0, 100000, text_tokens), VOCAB)
    captions = os.path.join(folder, "captions.bin")
    images = rng.integers(0, 256, (n_images, image_size, image_size, 3), dtype=np.uint8)
    tokens = [rng.integers(0, 100000, rng.integers(caption_len // 2, caption_len)) for _ in range(n_images)]
    shards.write_image_caption_shard(captions, images, tokens, VOCAB)
    return [text], [captions]


def time_batches(loader, ratio, seconds):
    """(batches, images, seconds) over about `seconds` of next_batch() calls."""
    batches = images = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, batch_images = loader.next_batch(ratio)
        batches += 1
        images += batch_images.shape[0]
    return batches, images, time.perf_counter() - start


def jpeg_figures(photo_paths, size, quality, seconds):
    """(mean JPEG bytes per picture, pictures decoded per second on one core)."""
    encoded = []
    for path in photo_paths:
        photo = Image.open(path).convert("RGB")
        w, h = photo.size
        for scale in (1.0, 0.7, 0.5, 0.35):  # natural pictures at several zooms, 9 places each
            cw, ch = int(w * scale), int(h * scale)
            for fx in (0.0, 0.5, 1.0):
                for fy in (0.0, 0.5, 1.0):
                    x, y = int(fx * (w - cw)), int(fy * (h - ch))
                    buf = io.BytesIO()
                    Image.fromarray(load_image(photo.crop((x, y, x + cw, y + ch)), size)).save(buf, "JPEG", quality=quality)
                    encoded.append(buf.getvalue())
    decoded, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.asarray(Image.open(io.BytesIO(encoded[decoded % len(encoded)])).convert("RGB"))
        decoded += 1
    return sum(map(len, encoded)) / len(encoded), decoded / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--patch_size", type=int, default=14)
    parser.add_argument("--caption_len", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--photos", default="", help="comma-separated photo files for the JPEG figures")
    parser.add_argument("--jpeg_quality", type=int, default=90)
    args = parser.parse_args()
    tokens_per_image = (args.image_size // args.patch_size) ** 2
    with tempfile.TemporaryDirectory() as folder:
        text, captions = write_shards(folder, 20_000_000, 2000, args.image_size, args.caption_len)
        loader = MixedLoader(text_files=text, caption_files=captions, tokenizer=Tokenizer(),
                                batch_size=args.batch_size, seq_len=args.seq_len, tokens_per_image=tokens_per_image,
                                caption_len=args.caption_len)
        for f in text + captions:  # into the page cache
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        print(f"batch {args.batch_size} x {args.seq_len} tokens; {args.image_size}x{args.image_size} images, "
              f"{loader.samples_per_row} per image-caption row; one process, one core")
        for label, ratio in (("text rows only", 0.0), ("image-caption rows only", 1.0), ("10% image rows", 0.1)):
            loader.reset()
            loader.next_batch(ratio)  # warm-up
            batches, images, dt = time_batches(loader, ratio, args.seconds)
            tokens = batches * args.batch_size * args.seq_len
            print(f"{label:>24}: {tokens / dt / 1e6:8.2f}M tokens/s, {images / dt:10,.0f} images/s, "
                  f"{1e3 * dt / batches:.3f} ms per batch")
    if args.photos:
        raw = args.image_size * args.image_size * 3
        jpeg_bytes, per_s = jpeg_figures(args.photos.split(","), args.image_size, args.jpeg_quality, args.seconds)
        print(f"{args.image_size}x{args.image_size} pictures: raw uint8 {raw / 1e3:.1f} KB ({raw / 1e3:.0f} GB per "
              f"million); JPEG quality {args.jpeg_quality} {jpeg_bytes / 1e3:.1f} KB ({jpeg_bytes / 1e3:.0f} GB per "
              f"million), decoded at {per_s:,.0f} pictures/s on one core")


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main()
