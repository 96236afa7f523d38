"""
The training schedules, as functions of a script's settings: the one place that says when
images start, what the learning rate and the image and conversation ratios are at each step,
which batch layouts the compiler will meet, and how many steps fine-tuning takes. pretrain.py,
finetune.py, chat.py and sweep.py all ask here, so a new schedule is written once.

The pretraining protocol (the study's): the text run is max_iters steps of warmup + cosine
decay. Images start at step S = image_start_step(settings) = round(vision_start_frac *
max_iters); the image phase lasts image_iters steps and replays the rest of the text schedule,
from S to max_iters, stretched to fit. At vision_start_frac = 1.0 the text schedule has
finished, so the image phase re-warms to rewarm_lr and decays again.
"""

import math

from data.loader import rows_for_slot

IMAGE_RATIO_RAMPS = ("linear", "cosine")  # how image_ratio_at climbs over image_ratio_ramp_iters


def fraction_step(s, frac):
    """The step at `frac` of the text schedule (s: pretrain.py's settings): where a run with
    vision_start_frac = frac starts its images, and where save_fracs keeps that checkpoint."""
    return round(frac * s["max_iters"])


def image_start_step(s):
    """The first step of a pretraining run that sees images."""
    return fraction_step(s, s["vision_start_frac"])


def total_steps(s):
    """The last step of a pretraining run, plus one: the text steps before images, then the image phase."""
    return image_start_step(s) + s["image_iters"]


def text_checkpoint_name(frac):
    """The file name of the text-only checkpoint that save_fracs keeps at `frac` (and sweep.py
    branches from). Two fractions alike to two decimals share a name."""
    return f"ckpt_frac{frac:.2f}.pt"


def cosine_schedule(it, warmup_iters, total_iters, peak_lr, min_lr):
    """Linear warmup to peak_lr, then a cosine decay that reaches min_lr at total_iters and
    stays there. `it` may be fractional (an image phase replays the schedule stretched)."""
    if it < warmup_iters:
        return peak_lr * min(1.0, (it + 1) / warmup_iters)
    progress = min(1.0, (it - warmup_iters) / max(1, total_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


def learning_rate_at(s, it):
    """The learning rate of pretraining step `it`."""
    start = image_start_step(s)
    if it < start:
        return cosine_schedule(it, s["warmup_iters"], s["max_iters"], s["learning_rate"], s["min_lr"])
    k = it - start  # step within the image phase
    if start < s["max_iters"]:
        # Continue the text schedule from where images start, stretched so that it ends
        # (at min_lr) exactly when the image phase does.
        stretched = start + (s["max_iters"] - start) * k / s["image_iters"]
        return cosine_schedule(stretched, s["warmup_iters"], s["max_iters"], s["learning_rate"], s["min_lr"])
    # The text schedule is over: warm up again and decay a second time.
    return cosine_schedule(k, s["rewarm_iters"], s["image_iters"], s["rewarm_lr"], s["min_lr"])


def image_phase_progress(s, it):
    """How far the image phase's mixture has come at pretraining step `it`: 0 before the image
    phase, then 1, reached over image_ratio_ramp_iters steps along image_ratio_ramp when that
    is positive (the study's idea of a dynamic ratio)."""
    start = image_start_step(s)
    if it < start:
        return 0.0
    ramp = s["image_ratio_ramp_iters"]
    if ramp <= 0:
        return 1.0
    progress = min(1.0, (it - start + 1) / ramp)
    if s["image_ratio_ramp"] == "cosine":  # slow, fast, slow: half a cosine wave from 0 to 1
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return progress


def image_ratio_at(s, it):
    """The share of image-caption rows in pretraining step `it`: image_ratio, from the image start, ramped."""
    return s["image_ratio"] * image_phase_progress(s, it)


def instruct_ratio_at(s, it):
    """The share of conversation rows in pretraining step `it`: instruct_ratio, on the image ratio's ramp
    (the conversations bring images too, so they start with them)."""
    return s["instruct_ratio"] * image_phase_progress(s, it)


def batch_layouts(s):
    """Every (image-caption rows, conversation rows) that a micro-batch can hold over the whole
    run, in order: each is a batch layout, and compiled graphs are specialised to their layout
    (one compile each). Found by walking the loader's own credit counters (data/loader.py)
    over every micro-batch slot of the schedule, so any ratio schedule is counted right."""
    layouts, credits = {(0, 0)}, (0.0, 0.0)
    for it in range(image_start_step(s), total_steps(s)):
        ratios = (image_ratio_at(s, it), instruct_ratio_at(s, it))
        for _ in range(s["grad_accum"]):  # a step's slots, over all ranks
            counts, credits = rows_for_slot(credits, ratios, s["batch_size"])
            layouts.add(tuple(counts))
    return sorted(layouts)


def finetune_steps(s, rows):
    """Fine-tuning's step count: the conversation rows that `epochs` passes take (epochs x
    conversations, one a row; fewer when packed, ConversationLoader.rows_to_cover), at
    (batch_size - text_rows) rows per micro-batch and grad_accum micro-batches a step (s:
    finetune.py's settings)."""
    return math.ceil(rows / ((s["batch_size"] - s["text_rows"]) * s["grad_accum"]))
