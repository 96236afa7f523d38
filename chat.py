"""
Asking a checkpoint about a picture: what sample.py (in a terminal) and serve.py (in a browser)
share, so that both prepare a picture, build a prompt and generate an answer by one rule.

  - load_picture: a picture file, an uploaded file's bytes or a toy scene, through
    data/images.py's load_image at the checkpoint's image size;
  - encode_question and fit_context: the prompt, the picture's <|image|> placeholders first as
    in training, then as many of the latest earlier turns as fit, then the question;
  - answer_pieces: the answer's tokens with their text as soon as it can be shown.
Every mistake a user can make (a missing or unreadable picture, a question too long or using a
word outside a compact vocabulary, a picture for a checkpoint that never saw one) raises a
UserError saying what is wrong, which sample.py prints as one `error:` line and serve.py shows
in the page.
"""

import math
import os

import numpy as np
import torch
from PIL import Image

from data.errors import MissingFileError, UserError
from data.images import load_image


def check_sampling(max_new_tokens, temperature, top_k):
    """The generation settings, checked: types first, since serve.py gets them from a page."""
    if not (isinstance(max_new_tokens, int) and isinstance(top_k, int) and isinstance(temperature, (int, float))
            and not any(isinstance(v, bool) for v in (max_new_tokens, temperature, top_k))):
        raise UserError("max_new_tokens and top_k must be whole numbers, temperature a number")
    if max_new_tokens < 1 or not 0 <= temperature < math.inf or top_k < 0:
        raise UserError(f"max_new_tokens must be at least 1 (got {max_new_tokens}), temperature and top_k not "
                        f"negative (got {temperature} and {top_k})")


def check_can_see(ckpt, saw_images):
    """Refuses a picture for a checkpoint whose image encoder was never trained."""
    if not saw_images:
        raise UserError(f"{ckpt} is a text-only checkpoint (from before its image phase): its image encoder was "
                        "never trained, so it cannot be shown a picture; ask without one")


def toy_scene_captions(data_dir):
    """The caption of each of the toy world's held-out evaluation pictures in data_dir ([] when
    it has none)."""
    path = os.path.join(data_dir, "eval_images.npy")
    if not os.path.exists(path):
        return []
    n = len(np.load(path, mmap_mode="r"))
    captions_path = os.path.join(data_dir, "eval_captions.txt")
    if not os.path.exists(captions_path):
        return ["(unknown: data_dir has no eval_captions.txt)"] * n
    with open(captions_path) as f:
        return f.read().splitlines()[:n]


def toy_scene(data_dir, n):
    """The toy world's held-out evaluation picture number n, uint8 at the world's own size, and
    its caption."""
    path = os.path.join(data_dir, "eval_images.npy")
    if not os.path.exists(path):
        raise MissingFileError(f"toy_scene: {path} does not exist (run: python data/toyworld/prepare.py)")
    scenes = np.load(path, mmap_mode="r")
    if not 0 <= n < len(scenes):
        raise UserError(f"toy_scene must lie in 0..{len(scenes) - 1} ({path} holds {len(scenes)} pictures), got {n}")
    return np.array(scenes[n]), toy_scene_captions(data_dir)[n]


def load_picture(image, toy_scene_number, data_dir, size, image_name=""):
    """The picture the questions are about, uint8 [size, size, 3], and its caption when it is a
    toy scene; (None, None) for text only. image is a file's path or an uploaded file's bytes
    (image_name names them in a message), "" or b"" for none; toy_scene_number < 0 for none."""
    if image and toy_scene_number >= 0:
        raise UserError("give either image or toy_scene, not both")
    if isinstance(image, bytes) and image:
        try:
            return load_image(image, size), None
        except UserError:  # its message would name "<bytes>"; Pillow's reason says no more than this
            raise UserError(f"{image_name or 'the uploaded file'} is not a picture (Pillow cannot read it)") from None
    if image:
        if not os.path.exists(image):
            raise MissingFileError(f"image {image} does not exist")
        return load_image(image, size), None
    if toy_scene_number < 0:
        return None, None
    scene, caption = toy_scene(data_dir, toy_scene_number)
    # through the same rule as a picture file: a no-op when the world was made at the model's size
    return load_image(Image.fromarray(scene), size), caption


def encode_question(tokenizer, fine_tuned, question):
    """A fine-tuned checkpoint's question in the chat template, or a pretrained one's plain text."""
    try:
        return tokenizer.encode_prompt(question) if fine_tuned else tokenizer.encode(question)
    except ValueError as e:  # a word outside the checkpoint's compact vocabulary
        raise UserError(str(e)) from None


def fit_context(image_ids, turns, question_ids, block_size, max_new_tokens):
    """The prompt: the picture's placeholders, as many of the latest earlier turns as leave room
    for a max_new_tokens answer, and the question. Raises a UserError if the question alone
    does not fit the context."""
    while True:
        ids = image_ids + [t for turn in turns for t in turn] + question_ids
        if not turns or len(ids) + max_new_tokens - 1 <= block_size:
            break
        turns = turns[1:]  # drop the oldest turn
    if len(ids) > block_size:
        raise UserError(f"the prompt is {len(ids)} tokens ({len(image_ids)} of them the picture's), longer than "
                        f"the model's context of {block_size} tokens (its block_size)")
    return ids


def answer_pieces(model, tokenizer, ids, picture, stop_id, max_new_tokens, temperature, top_k, generator,
                  autocast):
    """Generates after ids, yielding (token id, new text) per token up to stop_id (not
    included); the text is "" while a character split across tokens is incomplete. A last
    (None, text) carries what is left of such a character when the answer ends inside it."""
    device = next(model.parameters()).device
    room = model.config.block_size - len(ids) + 1  # the last new token needs no position of its own
    x = torch.tensor([ids], dtype=torch.long, device=device)
    images = None if picture is None else torch.from_numpy(picture[None]).to(device)
    answer, shown = [], ""
    with autocast:
        for token in model.generate_tokens(x, images, min(max_new_tokens, room), temperature, top_k or None,
                                           stop_id, generator):
            if int(token) == stop_id:
                break
            answer.append(int(token))
            text = tokenizer.decode(answer)
            if text.endswith("\ufffd"):  # in the middle of a character split across tokens
                yield answer[-1], ""
            else:
                yield answer[-1], text[len(shown):]
                shown = text
    rest = tokenizer.decode(answer)[len(shown):]
    if rest:
        yield None, rest
