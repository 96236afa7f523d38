"""A small VQA data set of a user's own, in every format data/own/prepare.py accepts, with awkward
rows: pictures of one coloured shape (the toy world's renderer) and questions in words the toy
world's vocabulary lacks ("colour", "contain", "teal")."""

import csv
import json
import os
import random

import numpy as np
from PIL import Image

from data.toyworld import prepare as toyworld

N_PICTURES = 40


def scene_facts(i):
    """(scene, colour, shape) of picture i: one large shape at a cell that varies."""
    rng = random.Random(i)
    color, shape, cell = rng.randrange(6), rng.randrange(3), rng.randrange(4)
    return (0, ((cell, shape, color, 1),)), toyworld.COLORS[color], toyworld.SHAPES[shape]


def write_lines(path, rows):
    with open(path, "w") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def make_own_dataset(root, size=32):
    """Writes the data set under root; returns {what: path}, and the number of usable rows each
    training file holds (the rest are the awkward rows)."""
    os.makedirs(os.path.join(root, "pics"))
    scenes = [scene_facts(i) for i in range(N_PICTURES)]
    images = toyworld.render([s for s, _, _ in scenes], np.random.default_rng(0), size)
    for i, image in enumerate(images):  # some as JPEG, some as PNG, some larger than the model's size
        picture = Image.fromarray(image)
        if i % 3 == 0:
            picture = picture.resize((2 * size, size))
        picture.save(os.path.join(root, "pics", f"{i}.{'png' if i % 2 else 'jpg'}"))
    with open(os.path.join(root, "pics", "broken.jpg"), "wb") as f:
        f.write(b"not a picture")

    def picture(i):
        return f"pics/{i}.{'png' if i % 2 else 'jpg'}"

    # LLaVA conversations about pictures 0..29, then one awkward row of each kind
    chats = [{"id": str(i), "image": picture(i), "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape it contains?"},
        {"from": "gpt", "value": color},
        {"from": "human", "value": "Which shape is teal or " + color + "?"},
        {"from": "gpt", "value": shape}]} for i, (_, color, shape) in enumerate(scenes[:30])]
    good = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a shape"}]
    chats += [
        {"id": "no image", "conversations": good},
        {"id": "missing file", "image": "pics/absent.jpg", "conversations": good},
        {"id": "broken file", "image": "pics/broken.jpg", "conversations": good},
        {"id": "empty turn", "image": picture(0), "conversations": [good[0], {"from": "gpt", "value": " "}]},
        {"id": "unknown role", "image": picture(0), "conversations": [{"from": "system", "value": "hi"}, *good]},
        {"id": "two images", "image": [picture(0), picture(1)], "conversations": good},
        "not an object"]
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump(chats, f)

    # captions: JSONL, CSV and a folder, each with awkward rows
    def caption(i):
        return f"a {scenes[i][1]} {scenes[i][2]} in a teal frame"
    write_lines(os.path.join(root, "captions.jsonl"),
                [{"image": picture(i), "caption": caption(i)} for i in range(12)]
                + [{"image": picture(0)}, {"image": "pics/broken.jpg", "caption": "broken"}, "{not json"])
    with open(os.path.join(root, "more_captions.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([(picture(i), caption(i)) for i in range(12, 24)] + [(picture(0), ""), ("", "no picture")])
    folder = os.path.join(root, "caption_pairs")
    os.makedirs(folder)
    for i in range(24, 36):
        Image.fromarray(images[i]).save(os.path.join(folder, f"{i:04d}.png"))
        with open(os.path.join(folder, f"{i:04d}.txt"), "w") as f:
            f.write(caption(i))
    with open(os.path.join(folder, "orphan.txt"), "w") as f:
        f.write("a caption without its picture")

    # evaluation sets about pictures 30..39, which no conversation shows
    held_out = range(30, N_PICTURES)
    write_lines(os.path.join(root, "test_open.jsonl"),
                [{"id": f"q{i}", "image": picture(i), "question": "What colour is the shape it contains?",
                  "answer": scenes[i][1], "answer_type": "colour"} for i in held_out]
                + [{"id": f"s{i}", "image": picture(i), "question": "Which shape is teal or red?",
                    "answers": [scenes[i][2]] * 3, "answer_type": "shape"} for i in held_out]
                + [{"image": picture(30), "answer": "red"}, {"image": "pics/absent.png", "question": "q?",
                                                             "answer": "red"}])
    write_lines(os.path.join(root, "test_mc.jsonl"),
                [{"image": picture(i), "question": "What colour is the shape it contains?", "answer": scenes[i][1],
                  "options": toyworld.COLORS} for i in held_out]
                + [{"image": picture(30), "question": "What colour?", "answer": "teal", "options": ["red", "blue"]}])
    write_lines(os.path.join(root, "test_yn.jsonl"),
                [{"image": picture(i), "question": f"Does it contain a {c} shape?",
                  "answer": "yes" if c == scenes[i][1] else "no"} for i in held_out for c in ("red", "teal")]
                + [{"image": "pics/broken.jpg", "question": "Does it contain a red shape?", "answer": "no"}])
    return {"chat": os.path.join(root, "train.json"), "captions_jsonl": os.path.join(root, "captions.jsonl"),
            "captions_csv": os.path.join(root, "more_captions.csv"), "captions_folder": folder,
            "eval_open": os.path.join(root, "test_open.jsonl"), "eval_mc": os.path.join(root, "test_mc.jsonl"),
            "eval_yn": os.path.join(root, "test_yn.jsonl")}
