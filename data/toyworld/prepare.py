"""
Generates the "toy world": the embedded default dataset, small enough that the whole pipeline
(pretrain on text -> add images -> instruction-finetune -> evaluate) runs on a 2-core CPU.

    python data/toyworld/prepare.py                  # writes into data/toyworld/
    python -m data.toyworld.prepare --out_dir /tmp/tw --scale 0.02 --seed 7
    python data/toyworld/prepare.py --without_knowledge_facts   # the control, data/toyworld/without_knowledge_facts/

The world: 32x32 RGB pictures of one to three shapes (circle, square, triangle) in six colours
and two sizes, one shape per cell of a 2x2 grid (so "where is it?" always has one answer: top
left, top right, bottom left, bottom right), on a black, white or gray background. Each picture
has a caption and a short LLaVA-style conversation. Beside them, a text corpus from a grammar
about the same concepts: facts (colours of things, sides of shapes, colour mixing, what is a
colour/shape/number/animal, animals' legs and sounds, opposites), counting, small arithmetic and
short stories. Knowledge questions join the two: "is there a shape with the color of the sun?"
needs the picture and a fact from the text.

What it writes (token ids are *compact* ids: index i means cl100k id meta["compact_vocab"][i]):
    train_text.bin, val_text.bin          text shards, documents ended by <|endoftext|>
    train_caption.bin, val_caption.bin    image-caption shards (caption tokens only)
    train_chat.bin, val_chat.bin          conversation shards (one image each, assistant-only mask)
    train_chat_knowledge.bin, val_...     knowledge questions about fine-tuning things, one a conversation
    eval_<task>.json, eval_images.npy     seven held-out evaluation sets (format below)
    eval_captions.txt                     a caption of each eval picture, one a line (sample.py)
    samples.png, samples.txt              64 pictures and their captions, for a person to look at
    meta.json                             written last, atomically: its presence = complete dataset

Evaluation sets, each {"name", "modality", "kind", "chance", "description", "items": [{"image",
"prompt", "options", "answer"}]}, multiple-choice ones with a "delimiter" between prompt and option
(lm-eval's target_delimiter: " " for text, "" after a chat prompt):
    color_qa   vision open          "what color is the circle?" -> ["red"]       chance 1/6
    count_mc   vision multi-choice  "how many shapes are there?" one/two/three     chance 1/3
    exists_yn  vision yes/no        "is there a green triangle?" (50% yes)       chance 1/2
    arith_mc   text multi-choice    "three plus four is" -> "seven" (4 options)    chance 1/4
    facts_mc   text multi-choice    "a banana is" -> "yellow" (4 options)          chance 1/4
    story_mc   text multi-choice    "mia was hungry, so she" -> "ate a sandwich"   chance 1/4
    knowledge_qa knowledge open     "is there a shape with the color of the sun?" -> "it is yellow.
               yes" (scored on the yes or no after the colour; 50% yes)       chance 1/2
Held out: eval pictures are scenes (background + every shape's cell, kind, colour and size) that
no training picture shows; a text eval item's prompt + delimiter + correct option never occurs
verbatim in the training text. The facts and sums behind them are taught, in other sentence
forms: every fact has several templates and each eval item uses a (template, fact) pair the
corpus leaves out, so the model must have learnt the fact from one wording and the wording from
other facts. knowledge_qa asks about the vision tasks' pictures, and its things are never named in
a conversation: their colours are only in the text corpus (--without_knowledge_facts takes them
out of it: the control run).

Everything is lower case, and every word the grammar can emit is listed below, so the compact
vocabulary is the same for every --seed and --scale. Same arguments => byte-identical files.
"""

import argparse
import glob
import json
import os
import random
import re
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.atomic import atomic_write, write_text  # noqa: E402
from data.errors import UserError, report_user_errors  # noqa: E402
from data.shards import (write_conversation_shard, write_image_caption_shard,  # noqa: E402
                         write_text_shard)
from data.tokenizer import Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONTROL_DIR = "without_knowledge_facts"  # --without_knowledge_facts's default folder, inside HERE

# Sample counts at --scale 1.0 (each is multiplied by --scale).
TRAIN_TEXT_TOKENS = 1_500_000
VAL_TEXT_TOKENS = 50_000
TRAIN_CAPTIONS, VAL_CAPTIONS = 20_000, 1_000
TRAIN_CHATS, VAL_CHATS = 8_000, 500
EVAL_ITEMS = 300  # per task; text tasks built from the grammar may hold fewer (all of them)
MIN_EVAL_ITEMS = 24  # even at tiny scales

# ----------------------------------------------------------------------------------------------
# The lexicon of the picture world

SHAPES = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
COLOR_RGB = np.array([[220, 40, 40], [40, 170, 60], [50, 80, 225],
                      [235, 215, 40], [145, 60, 190], [245, 140, 30]], dtype=np.int16)
BACKGROUNDS = ["black", "white", "gray"]
BACKGROUND_RGB = np.array([[20, 20, 20], [240, 240, 240], [128, 128, 128]], dtype=np.int16)
SIZES = ["small", "large"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]  # cells of a 2x2 grid
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
           "eighteen", "nineteen", "twenty"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "shape": "shapes"}


def article(word):
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------------
# Scenes and pictures
#
# A scene is (background, objects), objects a tuple of (cell, shape, color, size) sorted by cell:
# hashable, so it doubles as the key that keeps evaluation scenes out of the training data.

def sample_scene(rng, num_shapes=None):
    num_shapes = num_shapes or rng.randint(1, 3)
    cells = sorted(rng.sample(range(4), num_shapes))
    objects = tuple((c, rng.randrange(3), rng.randrange(6), rng.randrange(2)) for c in cells)
    return (rng.randrange(3), objects)


def sample_scenes(rng, n, exclude):
    """n random scenes, none of them in `exclude` (the evaluation scenes)."""
    scenes = []
    while len(scenes) < n:
        scene = sample_scene(rng)
        if scene not in exclude:
            scenes.append(scene)
    return scenes


def shape_stamp(kind, radius, frac):
    """Pixel offsets (dy, dx) covered by a shape whose centre lies `frac` past a pixel corner.

    Shapes are tested at pixel centres: a circle of the given radius, a square of that half-width,
    an upward triangle of that half-height (its base a little wider, so it reads as a triangle)."""
    reach = int(np.ceil(radius * 1.15)) + 1
    d = np.arange(-reach, reach + 1)
    dy, dx = np.meshgrid(d + 0.5 - frac, d + 0.5 - frac, indexing="ij")
    if kind == 0:
        mask = dx * dx + dy * dy <= radius * radius
    elif kind == 1:
        mask = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    else:
        t = (dy + radius) / (2 * radius)  # 0 at the apex, 1 at the base
        mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * radius * 1.15)
    oy, ox = np.nonzero(mask)
    return oy - reach, ox - reach


def slack_of(radius, frac, base, cell):
    """How far (in pixels, each way) a shape of this half-width may move from its cell's centre:
    half a cell less the half-width, less a pixel of margin, but never so far that a shape of any
    kind leaves its cell (the triangle's base, 1.15 half-widths wide, otherwise reaches past the
    picture's edge at 64 px and more). At 32 px the margin rule is the tighter one."""
    fits = [min(base + offsets.min(), cell - 1 - base - offsets.max())
            for kind in range(3) for offsets in shape_stamp(kind, radius, frac)]
    return min(int(np.floor(cell / 2 - radius - 1)), int(min(fits)))


def render(scenes, np_rng, size=32):
    """Draws scenes into uint8 [N, size, size, 3] pictures, vectorised over the scenes.

    Each shape sits in its grid cell, moved by up to a pixel or three, in its colour plus a small
    random tint; the background gets its own tint and every pixel a little noise, so no two
    pictures of the same scene are identical and a model must learn colour *categories*."""
    n = len(scenes)
    cell = size // 2
    radius = [0.25 * cell, 0.375 * cell]  # small, large half-width
    base, frac = divmod(cell / 2, 1)  # a cell's centre lies frac past pixel corner `base`
    slack = [slack_of(r, frac, int(base), cell) for r in radius]  # how far a shape may move
    # every random draw has a fixed shape, so the stream does not depend on the scenes
    jitter = np_rng.integers(-3, 4, size=(n, 3, 2))
    tint = np_rng.integers(-16, 17, size=(n, 3, 3))
    bg_tint = np_rng.integers(-8, 9, size=(n, 1, 1, 3))
    noise = np_rng.integers(-3, 4, size=(n, size, size, 3), dtype=np.int8)

    bg = np.array([s[0] for s in scenes], np.int64)
    img = np.empty((n, size, size, 3), np.int16)
    img[:] = BACKGROUND_RGB[bg][:, None, None, :] + bg_tint
    # one row per shape: image index, slot, cell, kind, colour, size
    objs = np.array([(i, j) + o for i, (_, objects) in enumerate(scenes) for j, o in enumerate(objects)],
                    np.int64).reshape(-1, 6)
    for kind in range(3):
        for sz in range(2):
            sel = objs[(objs[:, 3] == kind) & (objs[:, 5] == sz)]
            if not len(sel):
                continue
            i, j, c = sel[:, 0], sel[:, 1], sel[:, 2]
            move = np.clip(jitter[i, j], -slack[sz], slack[sz])
            y0 = int(base) + (c // 2) * cell + move[:, 1]
            x0 = int(base) + (c % 2) * cell + move[:, 0]
            oy, ox = shape_stamp(kind, radius[sz], frac)
            rgb = COLOR_RGB[sel[:, 4]] + tint[i, j]
            img[i[:, None], y0[:, None] + oy, x0[:, None] + ox] = rgb[:, None, :]
    img += noise
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Captions and conversations about a scene

CAPTION_TEMPLATES = [
    "{list}.",
    "a picture of {list}.",
    "an image with {list}.",
    "{list} on a {bg} background.",
    "{count} {shapes} on a {bg} background: {list}.",
    "there is {list}.",
    "this image shows {list}.",
]
POSITION_PHRASES = ["at the {pos}", "in the {pos} corner", "in the {pos}"]


def object_phrase(obj, with_size=True, with_position=True, rng=None):
    cell, shape, col, sz = obj
    words = ([SIZES[sz]] if with_size else []) + [COLORS[col], SHAPES[shape]]
    text = f"{article(words[0])} {' '.join(words)}"
    if with_position:
        phrase = rng.choice(POSITION_PHRASES) if rng else POSITION_PHRASES[0]
        text += " " + phrase.format(pos=POSITIONS[cell])
    return text


def join_list(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


CAPTION_MAX_TOKENS = 30  # a training config's caption_len (32) holds it and an <|endoftext|>


def caption(scene, rng):
    """A one-sentence description of the scene. Every word a caption uses is one token, so its
    length in tokens is its number of words and punctuation marks; overlong ones are redrawn."""
    bg, objects = scene
    n = len(objects)
    for _ in range(8):
        order = list(objects)
        if rng.random() < 0.4:
            rng.shuffle(order)
        with_position = rng.random() < 0.9
        parts = [object_phrase(o, rng.random() < 0.85, with_position, rng) for o in order]
        text = rng.choice(CAPTION_TEMPLATES).format(list=join_list(parts), bg=BACKGROUNDS[bg],
                                                    count=NUMBERS[n], shapes="shape" if n == 1 else "shapes")
        if len(re.findall(r"[a-z]+|[^a-z ]", text)) <= CAPTION_MAX_TOKENS:
            return text
    return join_list([object_phrase(o) for o in objects]) + "."  # at most 27 tokens


def refer(obj, objects, leave_out, rng):
    """A short noun phrase that picks out obj among objects without naming `leave_out` (the
    attribute being asked about), or None when no such phrase exists."""
    cell, shape, col, sz = obj
    options = [  # (phrase, attributes it uses, test for which objects it also fits)
        (SHAPES[shape], {"shape"}, lambda o: o[1] == shape),
        (f"{COLORS[col]} {SHAPES[shape]}", {"shape", "color"}, lambda o: o[1] == shape and o[2] == col),
        (f"{SIZES[sz]} {SHAPES[shape]}", {"shape", "size"}, lambda o: o[1] == shape and o[3] == sz),
        (f"{SHAPES[shape]} at the {POSITIONS[cell]}", {"shape", "position"}, lambda o: o[0] == cell),
    ]
    fitting = [p for p, uses, fits in options
               if leave_out not in uses and sum(fits(o) for o in objects) == 1]
    if not fitting:
        return None
    return fitting[0] if rng.random() < 0.7 else rng.choice(fitting)


COLOR_QUESTIONS = ["what color is the {ref}?", "which color does the {ref} have?",
                   "tell me the color of the {ref}."]
COUNT_QUESTIONS = ["how many shapes are there?", "how many shapes can you see?", "count the shapes."]
WHERE_QUESTIONS = ["where is the {ref}?", "where is the {ref} in the picture?"]
LEFT_RIGHT = "is the {ref} on the left or on the right?"
TOP_BOTTOM = "is the {ref} at the top or at the bottom?"
EXISTS_QUESTIONS = ["is there {a} {color} {shape}?", "is there {a} {shape}?", "are there any {color} shapes?"]
SHAPE_QUESTIONS = ["what shape is at the {pos}?", "what is at the {pos}?"]
SIZE_QUESTIONS = ["is the {ref} large or small?"]
COUNT_SOME_QUESTIONS = ["how many {shapes} are there?", "how many {color} shapes are there?"]
DESCRIBE_QUESTIONS = ["describe the picture.", "what do you see?", "write a caption for this image."]
NOTHING = "nothing"


def exists_question(scene, rng, want_yes):
    """A yes/no existence question whose answer is want_yes. Half the negatives are 'adversarial'
    (POPE style): the asked colour or the asked shape is in the picture, just not together."""
    objects = scene[1]
    if want_yes:
        _, shape, col, _ = rng.choice(objects)
    else:
        present = {(o[1], o[2]) for o in objects}
        absent = [(s, c) for s in range(3) for c in range(6) if (s, c) not in present]
        hard = [(s, c) for s, c in absent if any(o[1] == s or o[2] == c for o in objects)]
        shape, col = rng.choice(hard if hard and rng.random() < 0.5 else absent)
    q = EXISTS_QUESTIONS[0].format(a=article(COLORS[col]), color=COLORS[col], shape=SHAPES[shape])
    return q, "yes" if want_yes else "no"


def question(scene, rng, kind):
    """One (question, answer) of the given kind about the scene, or None if it does not apply."""
    bg, objects = scene
    obj = rng.choice(objects)
    if kind == "color":
        ref = refer(obj, objects, "color", rng)
        template = COLOR_QUESTIONS[0] if rng.random() < 0.6 else rng.choice(COLOR_QUESTIONS)
        return ref and (template.format(ref=ref), COLORS[obj[2]])
    if kind == "count":
        template = COUNT_QUESTIONS[0] if rng.random() < 0.6 else rng.choice(COUNT_QUESTIONS)
        return template, NUMBERS[len(objects)]
    if kind == "count_some":
        if rng.random() < 0.5:
            shape = rng.randrange(3)
            return (COUNT_SOME_QUESTIONS[0].format(shapes=PLURAL[SHAPES[shape]]),
                    NUMBERS[sum(o[1] == shape for o in objects)])
        col = rng.randrange(6)
        return (COUNT_SOME_QUESTIONS[1].format(color=COLORS[col]),
                NUMBERS[sum(o[2] == col for o in objects)])
    if kind == "where":
        ref = refer(obj, objects, "position", rng)
        if ref is None:
            return None
        u = rng.random()
        if u < 0.6:
            return rng.choice(WHERE_QUESTIONS).format(ref=ref), POSITIONS[obj[0]]
        if u < 0.8:
            return LEFT_RIGHT.format(ref=ref), "left" if obj[0] % 2 == 0 else "right"
        return TOP_BOTTOM.format(ref=ref), "top" if obj[0] < 2 else "bottom"
    if kind == "exists":
        u = rng.random()
        if u < 0.7:
            return exists_question(scene, rng, rng.random() < 0.5)
        if u < 0.85:
            shape = rng.randrange(3)
            yes = any(o[1] == shape for o in objects)
            return EXISTS_QUESTIONS[1].format(a="a", shape=SHAPES[shape]), "yes" if yes else "no"
        col = rng.randrange(6)
        yes = any(o[2] == col for o in objects)
        return EXISTS_QUESTIONS[2].format(color=COLORS[col]), "yes" if yes else "no"
    if kind == "what_at":
        cell = rng.randrange(4)
        at = [o for o in objects if o[0] == cell]
        if rng.random() < 0.5:
            return SHAPE_QUESTIONS[0].format(pos=POSITIONS[cell]), SHAPES[at[0][1]] if at else NOTHING
        answer = object_phrase(at[0], with_position=False) if at else NOTHING
        return SHAPE_QUESTIONS[1].format(pos=POSITIONS[cell]), answer
    if kind == "size":
        ref = refer(obj, objects, "size", rng)
        return ref and (SIZE_QUESTIONS[0].format(ref=ref), SIZES[obj[3]])
    if kind == "describe":
        return rng.choice(DESCRIBE_QUESTIONS), caption(scene, rng)
    raise ValueError(kind)


QUESTION_KINDS = ["color", "count", "count_some", "where", "exists", "what_at", "size", "describe"]
# Existence questions are the most common kind: a yes/no answer must compare the asked colour and
# shape with every shape in the picture, which a small model learns late (at 20 of 100, fine-
# tuning left exists_yn at chance; docs/toy_notes.md)
QUESTION_WEIGHTS = [20, 14, 8, 16, 50, 9, 8, 5]


def conversation(scene, rng):
    """1-3 question-answer turns about one picture, as [(role, text), ...]."""
    turns, asked = [], set()
    want = rng.randint(1, 3)
    while len(asked) < want:
        kind = rng.choices(QUESTION_KINDS, QUESTION_WEIGHTS)[0]
        qa = question(scene, rng, kind)
        # ask nothing twice, not even in other words ("what color is..." / "which color does...")
        if kind == "describe":
            topic = kind
        elif kind in ("color", "count", "where", "size"):
            topic = qa and (kind, qa[1])
        else:
            topic = qa
        if qa and topic not in asked:
            asked.add(topic)
            turns += [("user", qa[0]), ("assistant", qa[1])]
    return turns


# ----------------------------------------------------------------------------------------------
# The text world: a grammar of facts, arithmetic, counting and stories
#
# A relation is a list of facts (x, y) and sentence templates. Templates under "eval" have " {y}"
# after some text, so "<the text before {y}>" is a prompt and " y" its answer. Each fact leaves
# out HELD_OUT_PER_FACT of them (rotating over the facts, so every template is still taught with
# the other facts); those (template, fact) pairs are the facts_mc items. Within a relation the
# corpus mentions facts with Zipf-like frequencies (fixed ranks), as real text does: frequent
# facts are learnt early, rare ones late, so facts_mc keeps rising with training.

FACT_COLORS = COLORS + ["white", "black", "gray", "pink", "brown"]
RELATIONS = {
    "thing_color": {
        "facts": [("an apple", "red"), ("a tomato", "red"), ("a strawberry", "red"), ("a cherry", "red"),
                  ("a fire truck", "red"), ("a banana", "yellow"), ("a lemon", "yellow"),
                  ("the sun", "yellow"), ("corn", "yellow"), ("grass", "green"), ("a leaf", "green"),
                  ("a pea", "green"), ("a cucumber", "green"), ("a lime", "green"), ("the sky", "blue"),
                  ("the sea", "blue"), ("a blueberry", "blue"), ("a carrot", "orange"),
                  ("a pumpkin", "orange"), ("a tangerine", "orange"), ("a grape", "purple"),
                  ("a plum", "purple"), ("an eggplant", "purple"), ("a violet", "purple"),
                  ("snow", "white"), ("milk", "white"), ("a cloud", "white"), ("coal", "black"),
                  ("ink", "black"), ("smoke", "gray"), ("chocolate", "brown"), ("wood", "brown")],
        "answers": FACT_COLORS,
        "eval": ["{x} is {y}.", "what color is {x}? it is {y}.", "look at {x}. it is {y}.",
                 "{x} has the color {y}.", "{x} is always {y}.", "{x} looks {y}."],
        "train": ["{y} is the color of {x}."],
        "weight": 22,
    },
    "sides": {
        "facts": [("a triangle", "three"), ("a square", "four"), ("a rectangle", "four"),
                  ("a pentagon", "five"), ("a hexagon", "six"), ("an octagon", "eight")],
        "answers": ["three", "four", "five", "six", "seven", "eight"],
        "eval": ["{x} has {y} sides.", "the number of sides of {x} is {y}.",
                 "how many sides does {x} have? it has {y}.", "count the sides of {x} and you get {y}.",
                 "{x} is a shape with {y} sides."],
        "train": ["{y} sides make {x}."],
        "weight": 8,
    },
    "mixing": {
        "facts": [("red and yellow", "orange"), ("yellow and red", "orange"), ("blue and yellow", "green"),
                  ("yellow and blue", "green"), ("red and blue", "purple"), ("blue and red", "purple"),
                  ("red and white", "pink"), ("white and red", "pink"), ("black and white", "gray"),
                  ("white and black", "gray")],
        "answers": FACT_COLORS,
        "eval": ["{x} make {y}.", "if you mix {x}, you get {y}.", "mixing {x} gives {y}.",
                 "what do {x} make? they make {y}.", "mix {x} paint and you get {y}."],
        "train": ["{y} is what you get from {x}."],
        "weight": 8,
    },
    "legs": {
        "facts": [("a cat", "four"), ("a dog", "four"), ("a cow", "four"), ("a horse", "four"),
                  ("a sheep", "four"), ("a lion", "four"), ("a tiger", "four"), ("a pig", "four"),
                  ("a duck", "two"), ("a chicken", "two"), ("an owl", "two"), ("a penguin", "two"),
                  ("a parrot", "two"), ("an ant", "six"), ("a bee", "six"), ("a beetle", "six"),
                  ("a butterfly", "six"), ("a spider", "eight"), ("a scorpion", "eight")],
        "answers": ["two", "four", "six", "eight"],
        "eval": ["{x} has {y} legs.", "how many legs does {x} have? it has {y}.",
                 "count the legs of {x} and you get {y}.", "{x} walks on {y} legs.", "{x} stands on {y} legs."],
        "train": ["{y} legs carry {x}."],
        "weight": 14,
    },
    "sounds": {
        "facts": [("a cat", "meow"), ("a dog", "woof"), ("a cow", "moo"), ("a duck", "quack"),
                  ("a sheep", "baa"), ("a lion", "roar"), ("a pig", "oink"), ("an owl", "hoot"),
                  ("a horse", "neigh"), ("a bird", "tweet"), ("a frog", "ribbit"), ("a mouse", "squeak"),
                  ("a bee", "buzz"), ("a snake", "hiss")],
        "answers": ["meow", "woof", "moo", "quack", "baa", "roar", "oink", "hoot", "neigh", "tweet",
                    "ribbit", "squeak", "buzz", "hiss"],
        "eval": ["{x} says {y}.", "what does {x} say? it says {y}.", "the sound {x} makes is {y}.",
                 "when {x} talks, it says {y}.", "{x} goes {y}."],
        "train": ["{y} is the sound of {x}."],
        "weight": 12,
    },
    "opposites": {
        "facts": [(a, b) for pair in [("big", "small"), ("hot", "cold"), ("up", "down"), ("day", "night"),
                                      ("fast", "slow"), ("happy", "sad"), ("open", "closed"),
                                      ("light", "dark"), ("wet", "dry"), ("old", "new"), ("full", "empty"),
                                      ("soft", "hard"), ("loud", "quiet"), ("long", "short"),
                                      ("high", "low"), ("top", "bottom"), ("left", "right")]
                  for a, b in (pair, pair[::-1])],
        "answers": None,  # filled in below: every word of the pairs
        "eval": ["the opposite of {x} is {y}.", "what is the opposite of {x}? it is {y}.",
                 "{x} is the opposite of {y}.", "if something is not {x}, it is {y}.", "not {x} but {y}."],
        "train": ["{x} and {y} are opposites."],
        "weight": 20,
    },
    "category": {  # taught, not evaluated: a model gets it right from the word alone
        "facts": ([(c, "a color") for c in FACT_COLORS]
                  + [(f"{article(s)} {s}", "a shape") for s in
                     ["circle", "square", "triangle", "rectangle", "pentagon", "hexagon", "octagon"]]
                  + [(n, "a number") for n in NUMBERS]
                  + [(f"{article(a)} {a}", "an animal") for a in
                     ["cat", "dog", "cow", "horse", "duck", "lion", "fish", "bird", "sheep", "rabbit",
                      "tiger", "mouse"]]),
        "answers": ["a color", "a shape", "a number", "an animal"],
        "eval": [],
        "train": ["{x} is {y}.", "what kind of thing is {x}? it is {y}.", "{x}? that is {y}.",
                  "{x} is known as {y}.", "one example of {y} is {x}."],
        "weight": 12,
    },
}
RELATIONS["opposites"]["answers"] = sorted({w for pair in RELATIONS["opposites"]["facts"] for w in pair})
HELD_OUT_PER_FACT = 2
ZIPF_EXPONENT = 1.2


def fact_weights(relation):
    """Zipf-like frequencies of a relation's facts, over a fixed (seed-independent) ranking."""
    n = len(RELATIONS[relation]["facts"])
    ranks = list(range(n))
    random.Random(f"toyworld/ranks/{relation}").shuffle(ranks)
    return [1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in ranks]


ARITH_TEMPLATES = {
    "plus": {"eval": ["{a} plus {b} is {c}.", "{a} plus {b} equals {c}.", "{a} and {b} make {c}.",
                      "if you add {a} and {b}, you get {c}.", "what is {a} plus {b}? it is {c}."],
             "train": ["{c} is {a} plus {b}."]},
    "minus": {"eval": ["{a} minus {b} is {c}.", "{a} minus {b} equals {c}.",
                       "take {b} away from {a} and you get {c}.",
                       "if you take {b} from {a}, you have {c} left.", "what is {a} minus {b}? it is {c}."],
              "train": ["{c} is {a} minus {b}."]},
}
ARITH_MAX = 10  # operands 0..10


def arith_problems():
    """Every (op, a, b, c) the corpus teaches, in a fixed order."""
    problems = [("plus", a, b, a + b) for a in range(ARITH_MAX + 1) for b in range(ARITH_MAX + 1)]
    problems += [("minus", a, b, a - b) for a in range(ARITH_MAX + 1) for b in range(a + 1)]
    return problems


def held_out(index, num_templates, per_fact):
    return {(index + k) % num_templates for k in range(per_fact)}


EXTRA_FACTS = ["a circle is round.", "a ball is round.", "a wheel is round.", "a circle has no corners.",
               "there are many colors.", "numbers help us count.", "shapes can be big or small.",
               "a big shape is large.", "a little shape is small."]
COUNT_INTROS = ["let us count: ", "count with me: ", "counting: ", ""]
COUNT_FACTS = ["after {n} comes {m}.", "before {m} comes {n}.", "{m} is one more than {n}.",
               "{n} is one less than {m}.", "{m} is bigger than {n}.", "{n} is smaller than {m}."]

NAMES = [("mia", "she"), ("sam", "he"), ("tom", "he"), ("ana", "she"), ("leo", "he"), ("zoe", "she"),
         ("ben", "he"), ("eva", "she"), ("max", "he"), ("lily", "she"), ("noah", "he"), ("emma", "she")]
OBJECT_PRONOUN = {"she": "her", "he": "him"}
TOYS = ["ball", "box", "kite", "hat", "cup", "car", "book", "bag", "boat", "balloon", "block",
        "pencil", "sock", "shoe", "chair", "bike"]
STORY_COLORS = COLORS + ["white", "black", "pink", "brown"]
STORY_INTROS = ["{name} had {list}.", "one day, {name} found {list}.",
                "{name} went to the shop and bought {list}.",
                "in the morning, {name} saw {list} in the garden.", "for a birthday, {name} got {list}."]
STORY_FILLERS = ["{pron} played with them all day.", "{pron} was very happy.", "it was a sunny day.",
                 "{friend} came to play.", "then {pron} went home.", "{pron} showed them to {friend}.",
                 "{pron} counted {n} birds in the sky."]
STORY_RECALLS = ["the {toy} was {color}.", "{pron} liked the {color} {toy} best.",
                 "what color was the {toy}? it was {color}."]
SUM_STORIES = ["{name} had {a}. {pron} ate {b}. now {pron} has {c} left.",
               "{name} had {a}. {friend} gave {obj} {b} more. now {name} has {c}.",
               "{name} picked {a} in the morning and {b} in the afternoon. that makes {c}."]
FRUITS = {"apple": "apples", "cookie": "cookies", "egg": "eggs", "candy": "candies",
          "marble": "marbles", "sticker": "stickers", "cherry": "cherries", "plum": "plums"}
SCENE_INTROS = ["in the picture there is {list}.", "look at the picture: {list}.",
                "i drew {list}.", "on the page you can see {list}."]
# Little stories of cause and effect ("mia was hungry, so she ate a sandwich."): commonsense in
# the style of HellaSwag/PIQA. As with facts, each cause leaves out two of the eval templates;
# those (template, cause) pairs, told about random children, are the story_mc items.
CAUSES = [("was hungry", "ate a sandwich"), ("was thirsty", "drank some water"), ("was tired", "went to bed"),
          ("was cold", "put on a warm coat"), ("was hot", "jumped into the pool"), ("was dirty", "took a bath"),
          ("was sad", "cried a little"), ("was happy", "sang a song"), ("was bored", "read a book"),
          ("was sick", "went to the doctor"), ("was late", "ran to school"), ("was lost", "asked for help"),
          ("was scared", "hid under the bed"), ("wanted to draw", "took a pencil"),
          ("heard a joke", "laughed out loud"), ("had a birthday", "got a present"),
          ("found a coin", "put it in a piggy bank"), ("dropped a cup", "swept up the pieces"),
          ("saw the rain", "opened an umbrella"), ("saw that it was dark", "turned on the light"),
          ("felt the wind", "flew a kite"), ("saw the snow", "built a snowman"),
          ("got wet in the rain", "dried off with a towel"), ("broke a toy", "fixed it with glue"),
          ("missed a friend", "wrote a letter"), ("had sticky hands", "washed them with soap"),
          ("finished dinner", "cleared the table"), ("saw a butterfly", "chased it across the garden"),
          ("had a question", "asked the teacher"), ("wanted to swim", "went to the beach")]
CAUSE_TEMPLATES = {"eval": ["{name} {cause}, so {pron} {effect}.", "{name} {cause}. that is why {pron} {effect}.",
                            "because {name} {cause}, {pron} {effect}.", "when {name} {cause}, {pron} {effect}.",
                            "one day {name} {cause}. what did {pron} do? {pron} {effect}."],
                   "train": ["{name} {effect} because {pron} {cause}."]}
STORY_EVAL_NAMES = 4  # story_mc tells each held-out (template, cause) pair about this many children
REPEAT_TEMPLATES = ["{name} said: {seq}. then {friend} said it again: {seq}.", "say it twice: {seq}. {seq}.",
                    "{name} wrote {seq} on the board, and {friend} copied it: {seq}."]
SHAPE_STORY = ["{name} drew {a} {size} {color} {shape}.", "next to it, {pron} drew {a2} {color2} {shape2}.",
               "the {shape} had {n} sides.", "{pron} gave the picture to {friend}.", "the end."]


def count_of(n, singular, plural):
    return f"{NUMBERS[n]} {singular if n == 1 else plural}"


def pick_name(rng, avoid=None):
    while True:
        name, pron = rng.choice(NAMES)
        if name != avoid:
            return name, pron


class TextWorld:
    """Builds the sentence inventories once; samples documents with a given random.Random.

    left_out: facts (relation, x, y) whose sentences the corpus never says (the control run of
    knowledge_qa). Documents are drawn exactly as without it and those sentences then dropped, so
    the corpus is the full one less them, and no other sentence changes."""

    def __init__(self, left_out=()):
        self.fact_sentences = {}  # relation -> per fact, the sentences the corpus may use
        self.fact_eval = []  # (relation, x, y, prompt): the held-out pairs
        for name, rel in RELATIONS.items():
            evals = rel["eval"]
            self.fact_sentences[name] = []
            for i, (x, y) in enumerate(rel["facts"]):
                hold = held_out(i, len(evals), HELD_OUT_PER_FACT) if evals else set()
                sentences = []
                for t, template in enumerate(evals):
                    if t in hold:
                        self.fact_eval.append((name, x, y, template.split(" {y}")[0].format(x=x)))
                    else:
                        sentences.append(template.format(x=x, y=y))
                sentences += [t.format(x=x, y=y) for t in rel["train"]]
                self.fact_sentences[name].append(sentences)
        self.cause_templates, self.cause_eval = [], []  # per cause its corpus templates; held-out pairs
        evals = CAUSE_TEMPLATES["eval"]
        for i, (cause, effect) in enumerate(CAUSES):
            hold = held_out(i, len(evals), HELD_OUT_PER_FACT)
            self.cause_templates.append([t for j, t in enumerate(evals) if j not in hold] + CAUSE_TEMPLATES["train"])
            self.cause_eval += [(i, evals[j]) for j in sorted(hold)]
        ranks = list(range(len(CAUSES)))
        random.Random("toyworld/ranks/causes").shuffle(ranks)
        self.cause_weights = [1.0 / (rank + 1) ** 1.5 for rank in ranks]  # rarer than facts: harder
        self.relations = list(RELATIONS)
        self.relation_weights = [RELATIONS[r]["weight"] for r in self.relations]
        self.fact_weights = {r: fact_weights(r) for r in self.relations}
        self.arith_sentences, self.arith_eval = [], []
        for i, (op, a, b, c) in enumerate(arith_problems()):
            evals = ARITH_TEMPLATES[op]["eval"]
            hold = held_out(i, len(evals), 1)
            words = dict(a=NUMBERS[a], b=NUMBERS[b], c=NUMBERS[c])
            for t, template in enumerate(evals):
                if t in hold:
                    self.arith_eval.append((op, a, b, c, template.split(" {c}")[0].format(**words)))
                else:
                    self.arith_sentences.append(template.format(**words))
            self.arith_sentences += [t.format(**words) for t in ARITH_TEMPLATES[op]["train"]]
        self.left_out_sentences = {sentence for relation, x, y in left_out for sentence in
                                   self.fact_sentences[relation][RELATIONS[relation]["facts"].index((x, y))]}

    # -- documents --------------------------------------------------------------------------
    def facts_doc(self, rng):
        out = []
        for _ in range(rng.randint(3, 8)):
            if rng.random() < 0.05:
                out.append(rng.choice(EXTRA_FACTS))
            else:
                rel = rng.choices(self.relations, self.relation_weights)[0]
                fact = rng.choices(self.fact_sentences[rel], self.fact_weights[rel])[0]
                sentence = rng.choice(fact)
                if sentence not in self.left_out_sentences:  # drawn all the same, so what follows is unchanged
                    out.append(sentence)
        return " ".join(out)

    def arith_doc(self, rng):
        return " ".join(rng.choice(self.arith_sentences) for _ in range(rng.randint(3, 8)))

    def count_doc(self, rng):
        out = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.6:
                step = rng.choice([1, 1, 1, 2])
                length = rng.randint(3, 10)
                if rng.random() < 0.7:
                    start = rng.randint(0, 20 - step * (length - 1))
                    seq = [start + step * k for k in range(length)]
                else:
                    start = rng.randint(step * (length - 1), 20)
                    seq = [start - step * k for k in range(length)]
                intro = rng.choice(COUNT_INTROS)
                if step == 2 and rng.random() < 0.5:
                    intro = "counting by twos: "
                out.append(intro + ", ".join(NUMBERS[k] for k in seq) + ".")
            else:
                n = rng.randint(0, 19)
                out.append(rng.choice(COUNT_FACTS).format(n=NUMBERS[n], m=NUMBERS[n + 1]))
        return " ".join(out)

    def recall_story(self, rng):
        """A story naming 2-3 coloured toys; later sentences recall a toy's colour. Half the
        stories introduce them as "a green kite", half as "a kite ... the kite was green".

        Recalling a colour from the story needs in-context copying (induction heads), which the toy
        model learns only after some 700 steps (measured: at 1,000 steps it still answered "the
        kite was" at chance), so no evaluation leans on it; the corpus keeps teaching it."""
        name, pron = pick_name(rng)
        friend, _ = pick_name(rng, avoid=name)
        k = rng.randint(2, 3)
        toys, colors = rng.sample(TOYS, k), rng.sample(STORY_COLORS, k)
        if rng.random() < 0.5:
            listed = join_list([f"{article(c)} {c} {t}" for t, c in zip(toys, colors)])
            out = [rng.choice(STORY_INTROS).format(name=name, list=listed)]
        else:
            listed = join_list([f"{article(t)} {t}" for t in toys])
            out = [rng.choice(STORY_INTROS).format(name=name, list=listed),
                   join_list([f"the {t} was {c}" for t, c in zip(toys, colors)]) + "."]
        for _ in range(rng.randint(0, 2)):
            out.append(rng.choice(STORY_FILLERS).format(pron=pron, friend=friend, n=rng.choice(NUMBERS[2:11])))
        order = rng.sample(range(k), k)
        for i in order[:rng.randint(k - 1, k)]:  # the eval's form, "the <toy> was <colour>.", most
            recall = STORY_RECALLS[0] if rng.random() < 0.6 else rng.choice(STORY_RECALLS)
            out.append(recall.format(toy=toys[i], color=colors[i], pron=pron))
        if rng.random() < 0.5:
            out.append("the end.")
        return " ".join(out)

    def sum_story(self, rng):
        name, pron = pick_name(rng)
        friend, _ = pick_name(rng, avoid=name)
        sg = rng.choice(sorted(FRUITS))
        pl = FRUITS[sg]
        words = dict(name=name, pron=pron, friend=friend, obj=OBJECT_PRONOUN[pron])
        u = rng.random()
        if u < 0.4:  # eating some
            a = rng.randint(2, 10)
            b = rng.randint(1, a)
            return SUM_STORIES[0].format(a=count_of(a, sg, pl), b=NUMBERS[b], c=count_of(a - b, sg, pl), **words)
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        if u < 0.7:  # a gift
            return SUM_STORIES[1].format(a=count_of(a, sg, pl), b=NUMBERS[b], c=count_of(a + b, sg, pl), **words)
        return SUM_STORIES[2].format(a=count_of(a, sg, pl), b=count_of(b, sg, pl), c=count_of(a + b, sg, pl),
                                     **words)

    def shape_story(self, rng):
        name, pron = pick_name(rng)
        friend, _ = pick_name(rng, avoid=name)
        shape, shape2 = rng.choice(["triangle", "square"]), rng.choice(SHAPES)
        c1, c2, size = rng.choice(COLORS), rng.choice(COLORS), rng.choice(SIZES)
        words = dict(name=name, pron=pron, friend=friend, a=article(size), size=size, color=c1, shape=shape,
                     a2=article(c2), color2=c2, shape2=shape2, n="three" if shape == "triangle" else "four")
        parts = [s.format(**words) for s in SHAPE_STORY]
        return " ".join(parts[:2] + [p for p in parts[2:] if rng.random() < 0.7])

    def scene_doc(self, rng):
        out = []
        for _ in range(rng.randint(1, 3)):
            scene = sample_scene(rng)
            if rng.random() < 0.5:
                out.append(caption(scene, rng))
            else:
                parts = [object_phrase(o, rng.random() < 0.85, True, rng) for o in scene[1]]
                out.append(rng.choice(SCENE_INTROS).format(list=join_list(parts)))
        return " ".join(out)

    def cause_doc(self, rng):
        out = []
        for _ in range(rng.randint(2, 5)):
            i = rng.choices(range(len(CAUSES)), self.cause_weights)[0]
            name, pron = pick_name(rng)
            out.append(rng.choice(self.cause_templates[i]).format(
                name=name, pron=pron, cause=CAUSES[i][0], effect=CAUSES[i][1]))
        return " ".join(out)

    def repeat_doc(self, rng):
        """A random list said twice: the second copy is predictable only by looking back, which
        teaches a small model to copy from its context (induction) sooner than stories alone."""
        name, _ = pick_name(rng)
        friend, _ = pick_name(rng, avoid=name)
        items = []
        for _ in range(rng.randint(4, 10)):
            u = rng.random()
            items.append(f"{rng.choice(STORY_COLORS)} {rng.choice(TOYS)}" if u < 0.5 else
                         rng.choice(NUMBERS) if u < 0.75 else rng.choice(STORY_COLORS))
        return rng.choice(REPEAT_TEMPLATES).format(name=name, friend=friend, seq=", ".join(items))

    def document(self, rng):
        kind = rng.choices(["facts", "arith", "cause", "count", "recall", "repeat", "sum", "shape", "scene"],
                           [19, 20, 5, 6, 17, 10, 8, 5, 10])[0]
        return {"facts": self.facts_doc, "arith": self.arith_doc, "cause": self.cause_doc,
                "count": self.count_doc, "recall": self.recall_story, "repeat": self.repeat_doc,
                "sum": self.sum_story, "shape": self.shape_story, "scene": self.scene_doc}[kind](rng)


# ----------------------------------------------------------------------------------------------
# Knowledge questions: the picture and a fact that only the text teaches
#
# "is there a shape with the color of the sun?" needs the colour of the sun from the text corpus
# ("the sun is yellow.") and the picture. The answer says the colour first, then yes or no:
# "it is yellow. yes", as the corpus says it ("what color is the sun? it is yellow."), so the
# fact is recalled as the text taught it and the picture is then asked about a colour word in
# plain sight. The things of each picture colour are split in two: the fine-tuning
# conversations ask about KNOWLEDGE_TRAIN_THINGS, knowledge_qa only about KNOWLEDGE_EVAL_THINGS,
# which no conversation names. So a model answers knowledge_qa only by combining what it sees
# with what it read; --without_knowledge_facts leaves the eval things' colour sentences out of
# the corpus, the control in which knowledge_qa must fall to chance. Two earlier forms asked for
# the place of the shape, with no colour said first: a 2-layer toy model could not use a fact
# in the middle of its answer and scored chance in most runs (docs/toy_notes.md).

KNOWLEDGE_QUESTION = "is there a shape with the color of {thing}?"
KNOWLEDGE_EVAL_PER_COLOR = 2  # the things of each picture colour that only evaluation asks about
TRAIN_KNOWLEDGE_CHATS, VAL_KNOWLEDGE_CHATS = 2_000, 125  # at --scale 1.0, beside the other conversations


def knowledge_things():
    """(eval, train): for each picture colour (an index into COLORS), the things of that colour
    that knowledge_qa asks about and those that fine-tuning asks about. The eval things are the
    KNOWLEDGE_EVAL_PER_COLOR the corpus mentions most (the highest fact weights), so the text
    teaches their colours often: about 75 to 2,900 sentences each in the default corpus."""
    facts = RELATIONS["thing_color"]["facts"]
    weight = dict(zip(facts, fact_weights("thing_color")))
    evals, train = {}, {}
    for c, color in enumerate(COLORS):
        things = sorted((x for x, y in facts if y == color), key=lambda x: -weight[(x, color)])
        evals[c], train[c] = things[:KNOWLEDGE_EVAL_PER_COLOR], things[KNOWLEDGE_EVAL_PER_COLOR:]
    return evals, train


KNOWLEDGE_EVAL_THINGS, KNOWLEDGE_TRAIN_THINGS = knowledge_things()
# what --without_knowledge_facts leaves out of the corpus: the eval things' colours, nothing else
KNOWLEDGE_EVAL_FACTS = [("thing_color", x, COLORS[c]) for c, things in KNOWLEDGE_EVAL_THINGS.items() for x in things]


def knowledge_question(scene, rng, things, present):
    """(question, answer) about a thing of a colour the picture shows (present) or does not."""
    shown = {o[2] for o in scene[1]}
    color = rng.choice(sorted(shown if present else set(range(len(COLORS))) - shown))
    thing = rng.choice(things[color])
    return KNOWLEDGE_QUESTION.format(thing=thing), f"it is {COLORS[color]}. {'yes' if present else 'no'}"


def knowledge_conversation(scene, rng):
    """One turn about a fine-tuning thing; half the answers are yes."""
    q, a = knowledge_question(scene, rng, KNOWLEDGE_TRAIN_THINGS, present=rng.random() < 0.5)
    return [("user", q), ("assistant", a)]


def knowledge_evals(scenes, rng, n):
    """knowledge_qa's items, about the vision tasks' held-out pictures of two or three shapes (so
    no training picture changes), about eval things: "is there a shape with the color of the
    sun?" -> "it is yellow. yes". Half the answers are yes, so a model that does not know the
    thing's colour, and so answers for a colour it guesses, scores about chance, 1/2."""
    pictures = [index for index, (_, objects) in enumerate(scenes) if len(objects) >= 2]
    rng.shuffle(pictures)
    if len(pictures) < n:
        raise RuntimeError("knowledge_qa: too few evaluation pictures of two or three shapes")
    items = []
    for i, index in enumerate(pictures[:n]):
        q, a = knowledge_question(scenes[index], rng, KNOWLEDGE_EVAL_THINGS, present=i % 2 == 0)
        items.append({"image": index, "prompt": q, "options": None, "answer": [a]})
    rng.shuffle(items)
    return items


# ----------------------------------------------------------------------------------------------
# The compact vocabulary: every word of the grammar, with and without a leading space, and the
# punctuation it uses. Built from the lexicon, not from sampled text, so it never depends on the
# seed or scale; encoding would fail loudly if a sampled text used anything else.

PUNCTUATION = [".", ",", "?", ":"]


def grammar_strings():
    constants = [SHAPES, COLORS, BACKGROUNDS, SIZES, POSITIONS, NUMBERS, PLURAL, CAPTION_TEMPLATES,
                 POSITION_PHRASES, COLOR_QUESTIONS, COUNT_QUESTIONS, WHERE_QUESTIONS, LEFT_RIGHT,
                 TOP_BOTTOM, EXISTS_QUESTIONS, SHAPE_QUESTIONS, SIZE_QUESTIONS, DESCRIBE_QUESTIONS, NOTHING,
                 ["a", "an", "is", "are", "yes", "no", "left", "right", "top", "bottom", "shape", "shapes"],
                 RELATIONS, ARITH_TEMPLATES, EXTRA_FACTS, COUNT_INTROS, ["counting by twos"],
                 COUNT_FACTS, NAMES, OBJECT_PRONOUN, TOYS, STORY_COLORS, STORY_INTROS, STORY_FILLERS,
                 STORY_RECALLS, CAUSES, CAUSE_TEMPLATES, REPEAT_TEMPLATES, SUM_STORIES, FRUITS, SCENE_INTROS,
                 SHAPE_STORY, COUNT_SOME_QUESTIONS, KNOWLEDGE_QUESTION,
                 "the end", "the {toy} was"]
    out = []

    def walk(value):
        if isinstance(value, str):
            out.append(re.sub(r"\{[^}]*\}", " ", value))
        elif isinstance(value, dict):
            for k in value:
                walk(k)
                walk(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
    walk(constants)
    return out


def compact_vocab():
    words = sorted(set(re.findall(r"[a-z]+", " ".join(grammar_strings()))))
    return Tokenizer.cl100k_ids_of(words + [" " + w for w in words] + PUNCTUATION)


# ----------------------------------------------------------------------------------------------
# Evaluation sets

def n_items(scale):
    return max(MIN_EVAL_ITEMS, round(EVAL_ITEMS * scale))


def vision_evals(rng, n):
    """Scenes and items of the three vision tasks; answers balanced so a constant guess scores
    exactly chance."""
    scenes, tasks = [], {"color_qa": [], "count_mc": [], "exists_yn": []}

    def add(scene):
        scenes.append(scene)
        return len(scenes) - 1

    # color_qa and exists_yn show 2-3 shapes (so there is something to confuse the asked one
    # with); count_mc needs one-shape pictures too. Every eval scene is withheld from training,
    # which costs the training data about a fifth of the 432 possible one-shape scenes.
    for i in range(n):  # color_qa: the asked shape is the only one of its kind
        target = i % len(COLORS)
        while True:
            scene = sample_scene(rng, num_shapes=rng.randint(2, 3))
            unique = [o for o in scene[1] if o[2] == target and sum(p[1] == o[1] for p in scene[1]) == 1]
            if unique:
                break
        shape = SHAPES[unique[0][1]]
        tasks["color_qa"].append({"image": add(scene), "prompt": f"what color is the {shape}?",
                                  "options": None, "answer": [COLORS[target]]})
    for i in range(n):  # count_mc
        scene = sample_scene(rng, num_shapes=i % 3 + 1)
        tasks["count_mc"].append({"image": add(scene), "prompt": COUNT_QUESTIONS[0],
                                  "options": ["one", "two", "three"], "answer": i % 3})
    for i in range(n):  # exists_yn, half yes
        scene = sample_scene(rng, num_shapes=rng.randint(2, 3))
        q, a = exists_question(scene, rng, want_yes=i % 2 == 0)
        tasks["exists_yn"].append({"image": add(scene), "prompt": q, "options": None, "answer": a})
    for items in tasks.values():  # shuffle items (and their answers) in place
        rng.shuffle(items)
    return scenes, tasks


def mc_item(prompt, correct, distractors, rng, k=4):
    options = [correct] + rng.sample(sorted(set(distractors) - {correct}), k - 1)
    rng.shuffle(options)
    return {"image": None, "prompt": prompt, "options": options, "answer": options.index(correct)}


def text_evals(world, rng, n):
    facts = []
    for rel, x, y, prompt in world.fact_eval:
        facts.append(mc_item(prompt, y, RELATIONS[rel]["answers"], rng))
    arith = []
    for op, a, b, c, prompt in world.arith_eval:
        near = {c - 3, c - 2, c - 1, c + 1, c + 2, c + 3, a, b, a + b, abs(a - b)}
        arith.append(mc_item(prompt, NUMBERS[c], [NUMBERS[v] for v in near if 0 <= v <= 20], rng))
    story = []
    effects = [effect for _, effect in CAUSES]
    for i, template in world.cause_eval:
        for name, pron in rng.sample(NAMES, STORY_EVAL_NAMES):
            prompt = template.split(" {effect}")[0].format(name=name, pron=pron, cause=CAUSES[i][0])
            story.append(mc_item(prompt, CAUSES[i][1], effects, rng))
    out = {}
    for name, items in [("arith_mc", arith), ("facts_mc", facts), ("story_mc", story)]:
        rng.shuffle(items)
        out[name] = items[:n]
    return out


TASK_INFO = {
    "color_qa": ("vision", "open", 1 / len(COLORS),
                 "What colour is the one shape of its kind in a picture of 2-3 shapes; answered by "
                 "greedy generation after the image and tok.encode_prompt(prompt), correct if the "
                 "normalised answer (VQAv2-style) equals a reference. The six colours are balanced, so "
                 "chance = 1/6."),
    "count_mc": ("vision", "multiple_choice", 1 / 3,
                 "How many shapes (one to three) the picture holds; the option with the highest "
                 "log-likelihood after tok.encode_prompt(prompt) wins. Answers balanced."),
    "exists_yn": ("vision", "yes_no", 0.5,
                  "POPE-style: is there a <colour> <shape> in a picture of 2-3 shapes? Half yes; about "
                  "half of the no's are adversarial "
                  "(the colour or the shape is in the picture, not together). Scored by log-likelihood "
                  "of 'yes' vs 'no' after tok.encode_prompt(prompt)."),
    "arith_mc": ("text", "multiple_choice", 0.25,
                 "Addition and subtraction of 0..10 in words; 4 options, distractors close to the answer. "
                 "Plain LM completion of prompt + ' ' + option, scored as lm-eval does. The sum is taught in other "
                 "sentence forms; this form of it never appears in the training text."),
    "facts_mc": ("text", "multiple_choice", 0.25,
                 "Facts of the world (colours of things, sides of shapes, colour mixing, animals' legs "
                 "and sounds, opposites); 4 options. Plain LM completion. Each fact is taught in other "
                 "sentence forms, some facts often and some rarely (Zipf); this (form, fact) pair never "
                 "appears in the training text."),
    "story_mc": ("text", "multiple_choice", 0.25,
                 "Commonsense story completion in the style of HellaSwag: 'mia was hungry, so she' -> "
                 "'ate a sandwich' among 4 endings. Plain LM completion. Each cause and its effect is "
                 "taught in other sentence forms (some often, some rarely); this form of it never "
                 "appears in the training text. 30 causes x 2 held-out forms, each told about "
                 f"{STORY_EVAL_NAMES} different children."),
    "knowledge_qa": ("knowledge", "open", 1 / 2,
                     "'is there a shape with the color of the sun?' about a picture of two or three shapes -> "
                     "'it is yellow. yes': the thing's colour, which only the text corpus teaches (fine-tuning asks "
                     "the same question about other things), then whether the picture shows that colour. Greedy "
                     "answer; only its conclusion, the part after the last full stop, is scored (metric "
                     "final_answer). Half the answers are yes, so a model that does not know the colour scores "
                     "about chance, 1/2."),
}
EVAL_TASKS = ["color_qa", "count_mc", "exists_yn", "arith_mc", "facts_mc", "story_mc", "knowledge_qa"]


# ----------------------------------------------------------------------------------------------
# Writing

def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1) + "\n")


def write_eval(path, name, items):
    modality, kind, chance, description = TASK_INFO[name]
    task = {"name": name, "modality": modality, "kind": kind, "chance": chance, "description": description}
    if kind == "multiple_choice":
        task["delimiter"] = eval_delimiter(name)
    if name == "knowledge_qa":  # the model says the colour first; its yes or no is what counts
        task["metric"] = "final_answer"
    write_json(path, {**task, "items": items})


def eval_delimiter(name):
    """What separates prompt and option: a space in plain text, nothing after a chat prompt."""
    return " " if TASK_INFO[name][0] == "text" else ""


def write_samples(out_dir, cap_images, captions, chat_images, chats):
    """samples.png: rows 0-5 show 48 captioned training pictures, rows 6-7 16 pictures from the
    conversations, 4x enlarged; samples.txt says what each one is."""
    from PIL import Image
    images = np.concatenate([cap_images[:48], chat_images[:16]])
    size, zoom, gap = images.shape[1], 4, 2
    cell = size * zoom + gap
    grid = np.full((8 * cell + gap, 8 * cell + gap, 3), 255, np.uint8)
    for i in range(len(images)):
        y, x = gap + (i // 8) * cell, gap + (i % 8) * cell
        grid[y:y + size * zoom, x:x + size * zoom] = images[i].repeat(zoom, 0).repeat(zoom, 1)
    with atomic_write(os.path.join(out_dir, "samples.png"), "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
    lines = ["# samples.png, row,column: rows 0-5 are captioned training pictures"]
    lines += [f"{i // 8},{i % 8}: {c}" for i, c in enumerate(captions[:48])]
    lines += ["", "# rows 6-7 are pictures from the training conversations"]
    for i, turns in enumerate(chats[:16], start=48):
        lines.append(f"{i // 8},{i % 8}: " + " | ".join(f"{r}: {t}" for r, t in turns))
    write_text(os.path.join(out_dir, "samples.txt"), "\n".join(lines) + "\n")


def text_tokens(world, rng, tok, target):
    """Documents until `target` tokens, joined with <|endoftext|>."""
    docs, chunks, total = [], [], 0
    while total < target:
        # without the knowledge facts a facts document may lose every sentence: none is left to write
        batch = [doc for doc in (world.document(rng) for _ in range(1000)) if doc]
        for doc, ids in zip(batch, map(tok.encode, batch)):
            if total >= target:
                break
            docs.append(doc)
            chunks.append(ids + [tok.eot_id])
            total += len(ids) + 1
    return docs, np.array([i for c in chunks for i in c], dtype=np.int64)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=None, help=f"default {HERE}")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every sample count")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--without_knowledge_facts", action="store_true",
                        help="the control of knowledge_qa: leave the colours of its things out of the text corpus "
                             f"(default --out_dir {os.path.join(HERE, CONTROL_DIR)})")
    args = parser.parse_args(argv)
    if args.image_size < 16 or args.image_size % 2:
        parser.error("--image_size must be even and at least 16")
    if args.out_dir is None:
        args.out_dir = os.path.join(HERE, CONTROL_DIR) if args.without_knowledge_facts else HERE
    t0 = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    meta_path = os.path.join(args.out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old_control = json.load(f).get("without_knowledge_facts", False)
        if old_control != args.without_knowledge_facts:  # a control must never quietly replace a toy world
            raise UserError(f"--out_dir {args.out_dir} holds a toy world prepared "
                            f"{'without' if old_control else 'with'} the knowledge facts; delete it or choose "
                            "another --out_dir")
        os.remove(meta_path)  # the dataset is incomplete until the new meta.json is written
        # evaluate.py scores every eval_*.json of a folder: one of an earlier version's tasks
        # (knowledge_mc became knowledge_qa) must not linger beside the new ones
        for path in glob.glob(os.path.join(args.out_dir, "eval_*.json")):
            if os.path.basename(path)[len("eval_"):-len(".json")] not in EVAL_TASKS:
                os.remove(path)
                print(f"removed {path}: an earlier toy world's task")

    def rng(stream):  # independent, reproducible random streams (string seeds hash with sha512)
        return random.Random(f"toyworld/{args.seed}/{stream}")

    def np_rng(stream):
        return np.random.default_rng([args.seed, stream])

    def count(n):
        return max(8, round(n * args.scale))

    vocab = compact_vocab()
    tok = Tokenizer(vocab)
    V = tok.vocab_size
    world = TextWorld(left_out=KNOWLEDGE_EVAL_FACTS if args.without_knowledge_facts else ())
    counts, files = {}, {}

    def path(name):
        files[name.rsplit(".", 1)[0]] = name
        return os.path.join(args.out_dir, name)

    # evaluation scenes first, so that training scenes can avoid them
    n_eval = n_items(args.scale)
    eval_scenes, vision_tasks = vision_evals(rng("eval_vision"), n_eval)
    held = set(eval_scenes)
    eval_images = render(eval_scenes, np_rng(1), args.image_size)

    # text
    train_docs, train_text = text_tokens(world, rng("train_text"), tok, TRAIN_TEXT_TOKENS * args.scale)
    _, val_text = text_tokens(world, rng("val_text"), tok, VAL_TEXT_TOKENS * args.scale)
    write_text_shard(path("train_text.bin"), train_text, V)
    write_text_shard(path("val_text.bin"), val_text, V)
    counts.update(train_text_docs=len(train_docs), train_text_tokens=len(train_text),
                  val_text_tokens=len(val_text))

    # image-caption pairs and conversations
    for split, n_cap, n_chat, stream in [("train", TRAIN_CAPTIONS, TRAIN_CHATS, 10),
                                         ("val", VAL_CAPTIONS, VAL_CHATS, 20)]:
        r = rng(f"{split}_caption")
        scenes = sample_scenes(r, count(n_cap), held)
        images = render(scenes, np_rng(stream), args.image_size)
        captions = [caption(s, r) for s in scenes]
        cap_ids = [tok.encode(c) for c in captions]
        write_image_caption_shard(path(f"{split}_caption.bin"), images, cap_ids, V)
        r = rng(f"{split}_chat")
        chat_scenes = sample_scenes(r, count(n_chat), held)
        chat_images = render(chat_scenes, np_rng(stream + 1), args.image_size)
        chats = [conversation(s, r) for s in chat_scenes]
        encoded = [tok.encode_conversation(c) for c in chats]
        write_conversation_shard(path(f"{split}_chat.bin"), chat_images, [e[0] for e in encoded],
                                 [e[1] for e in encoded], V)
        counts.update({f"{split}_caption_samples": len(scenes),
                       f"{split}_caption_tokens": sum(map(len, cap_ids)),
                       f"{split}_chat_samples": len(chat_scenes),
                       f"{split}_chat_tokens": sum(len(e[0]) for e in encoded),
                       f"{split}_chat_trained_tokens": sum(sum(e[1]) for e in encoded)})
        if split == "train":
            write_samples(args.out_dir, images, captions, chat_images, chats)
            files["samples"] = ["samples.png", "samples.txt"]

    # knowledge conversations: their own shards and random streams, so every file above is as it
    # was before they existed (finetune.py reads every train_chat*.bin)
    for split, n_chat, stream in [("train", TRAIN_KNOWLEDGE_CHATS, 12), ("val", VAL_KNOWLEDGE_CHATS, 22)]:
        r = rng(f"{split}_knowledge_chat")
        chat_scenes = sample_scenes(r, count(n_chat), held)
        chat_images = render(chat_scenes, np_rng(stream), args.image_size)
        encoded = [tok.encode_conversation(knowledge_conversation(s, r)) for s in chat_scenes]
        write_conversation_shard(path(f"{split}_chat_knowledge.bin"), chat_images, [e[0] for e in encoded],
                                 [e[1] for e in encoded], V)
        counts.update({f"{split}_knowledge_chat_samples": len(chat_scenes),
                       f"{split}_knowledge_chat_tokens": sum(len(e[0]) for e in encoded)})

    # evaluation sets
    tasks = dict(vision_tasks, **text_evals(world, rng("eval_text"), n_eval),
                 knowledge_qa=knowledge_evals(eval_scenes, rng("eval_knowledge"), n_eval))
    corpus = "\n".join(train_docs)
    for name in ("arith_mc", "facts_mc", "story_mc"):  # held out, verbatim (by construction)
        leaks = [it["prompt"] for it in tasks[name]
                 if it["prompt"] + eval_delimiter(name) + it["options"][it["answer"]] in corpus]
        if leaks:
            raise RuntimeError(f"{name}: {len(leaks)} eval items occur verbatim in the training text, "
                               f"e.g. {leaks[0]!r}: fix the grammar")
    for name in EVAL_TASKS:  # every eval text must be in the vocabulary (encode raises otherwise)
        for it in tasks[name]:  # encode what evaluate.py will encode
            answers = it["answer"] if isinstance(it["answer"], list) else ["yes", "no"]
            if TASK_INFO[name][0] == "text":
                texts = [it["prompt"]] + [it["prompt"] + eval_delimiter(name) + o for o in it["options"]]
                [tok.encode(text) for text in texts]
            else:
                [tok.encode(text) for text in [it["prompt"]] + (it["options"] or answers)]
        write_eval(path(f"eval_{name}.json"), name, tasks[name])
        counts[f"eval_{name}"] = len(tasks[name])
    with atomic_write(path("eval_images.npy"), "wb") as f:
        np.save(f, eval_images)
    counts["eval_images"] = len(eval_images)
    # Their captions are for a person trying a model on a held-out picture; no model trains on
    # them. Their own random stream leaves every other file as it was.
    r = rng("eval_captions")
    captions_path = path("eval_captions.txt")
    with atomic_write(captions_path) as f:
        f.writelines(caption(s, r) + "\n" for s in eval_scenes)

    meta = {"format": 1, "tokenizer": "cl100k_base", "compact_vocab": vocab, "vocab_size": V,
            "image_size": [args.image_size, args.image_size], "seed": args.seed, "scale": args.scale,
            "without_knowledge_facts": args.without_knowledge_facts,
            "counts": counts, "eval_tasks": EVAL_TASKS, "files": files,
            "world": {"shapes": SHAPES, "colors": COLORS, "sizes": SIZES, "positions": POSITIONS,
                      "backgrounds": BACKGROUNDS, "max_shapes": 3,
                      "knowledge_eval_things": {COLORS[c]: t for c, t in KNOWLEDGE_EVAL_THINGS.items()},
                      "knowledge_train_things": {COLORS[c]: t for c, t in KNOWLEDGE_TRAIN_THINGS.items()}}}
    files["meta"] = "meta.json"
    meta["files"] = dict(sorted(files.items()))
    write_json(meta_path, meta)

    seconds = time.time() - t0
    print(f"toy world (seed {args.seed}, scale {args.scale}, {args.image_size}px"
          + (", without the knowledge facts" if args.without_knowledge_facts else "") + f") -> {args.out_dir}")
    for name in sorted(set(f for v in files.values() for f in ([v] if isinstance(v, str) else v))):
        size = os.path.getsize(os.path.join(args.out_dir, name))
        print(f"  {name:24s} {size / 1e6:8.2f} MB")
    print(f"  text: {counts['train_text_tokens']:,} train / {counts['val_text_tokens']:,} val tokens "
          f"({counts['train_text_docs']:,} train documents)")
    print(f"  captions: {counts['train_caption_samples']:,} train / {counts['val_caption_samples']:,} val "
          f"({counts['train_caption_tokens']:,} train tokens)")
    print(f"  chats: {counts['train_chat_samples']:,} train / {counts['val_chat_samples']:,} val "
          f"({counts['train_chat_tokens']:,} train tokens, {counts['train_chat_trained_tokens']:,} trained), "
          f"and {counts['train_knowledge_chat_samples']:,} / {counts['val_knowledge_chat_samples']:,} "
          "knowledge questions")
    print("  eval: " + ", ".join(f"{t} {counts['eval_' + t]}" for t in EVAL_TASKS)
          + f"; {len(eval_images)} eval images")
    print(f"  vocab: {V} tokens (compact cl100k ids); {seconds:.1f} s")
    return meta


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main()
