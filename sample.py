"""
Ask a trained model about a picture, and watch it answer token by token.

    python sample.py --ckpt=out/toy_sft/ckpt.pt --toy_scene=3 --prompt="what color is the circle?"
    python sample.py --ckpt=out/toy_sft/ckpt.pt --image=photo.jpg     # then type questions, one a line
    python sample.py --ckpt=out/toy/ckpt.pt --prompt="three plus four is"  # a pretrained model, text only

The picture (any file Pillow opens) is prepared by data/images.py's load_image, the rule every
data preparer uses, at the checkpoint's image size; --toy_scene=N takes the N-th held-out
evaluation picture of the toy world instead and prints its caption. The picture's <|image|>
placeholders come first, as in training. What follows depends on the checkpoint:
  - fine-tuned (finetune.py's checkpoints name the one they were "pretrained_from"): each
    question goes into the chat template and the answer ends at <|end|>. Without --prompt,
    questions come from stdin, one a line, as one conversation about the same picture: earlier
    turns stay in the context, the oldest dropped first when the context would overflow;
  - pretrained: the prompt is plain text to continue, up to <|endoftext|>. Without --prompt each
    line is a new prompt; an empty line after a picture lets the model caption it, which is
    what its image rows taught it.
Greedy by default (what evaluate.py does); temperature > 0 samples, top_k > 0 keeps the k
likeliest tokens only, and the same seed gives the same sample.
"""

import os
import sys

import numpy as np
import torch
from PIL import Image

from common import autocast_context, load_checkpoint
from configurator import apply_overrides
from data.images import load_image
from data.errors import report_user_errors
from data.tokenizer import Tokenizer
from model import VLM, ModelConfig

# -----------------------------------------------------------------------------
ckpt = "out/toy_sft/ckpt.pt"
image = ""  # a picture file; "" = none (text only)
toy_scene = -1  # >= 0: the toy world's held-out eval picture number toy_scene, from data_dir
data_dir = "data/toyworld"
prompt = ""  # "" = read questions from stdin, one per line
max_new_tokens = 64
temperature = 0.0  # 0 = greedy
top_k = 0  # > 0: sample from the k likeliest tokens only
seed = 1337
device = "auto"
dtype = "bfloat16"
# -----------------------------------------------------------------------------


def load_model(path, device):
    """The checkpoint's raw module (a compiled one would recompile for every new length), its
    tokenizer, whether it was fine-tuned, and whether its image encoder was ever trained."""
    checkpoint = load_checkpoint(path)
    config = ModelConfig(**{**checkpoint["model_config"], "use_kernels": False})  # eager references
    model = VLM(config).to(device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    fine_tuned = "pretrained_from" in checkpoint
    if fine_tuned:
        saw_images = True  # fine-tuning trains on image conversations
    else:  # a pretraining checkpoint from before its image phase never saw an image
        c = checkpoint["config"]
        saw_images = c["image_ratio"] > 0 and checkpoint["iter_num"] > round(c["vision_start_frac"] * c["max_iters"])
    return model, Tokenizer(checkpoint.get("compact_vocab")), fine_tuned, saw_images


def picture_of(settings, size):
    """The picture the questions are about, uint8 [size, size, 3], or None for text only. A
    toy scene's caption is printed first."""
    s = settings
    if s["image"] and s["toy_scene"] >= 0:
        raise ValueError("give either image or toy_scene, not both")
    if s["image"]:
        if not os.path.exists(s["image"]):
            raise FileNotFoundError(f"image {s['image']} does not exist")
        return load_image(s["image"], size)
    if s["toy_scene"] < 0:
        return None
    path = os.path.join(s["data_dir"], "eval_images.npy")
    if not os.path.exists(path):
        raise FileNotFoundError(f"toy_scene: {path} does not exist (run: python data/toyworld/prepare.py)")
    scenes = np.load(path, mmap_mode="r")
    n = s["toy_scene"]
    if n >= len(scenes):
        raise ValueError(f"toy_scene must lie in 0..{len(scenes) - 1} ({path} holds {len(scenes)} pictures), got {n}")
    captions_path = os.path.join(s["data_dir"], "eval_captions.txt")
    caption = "(unknown: data_dir has no eval_captions.txt)"
    if os.path.exists(captions_path):
        with open(captions_path) as f:
            caption = f.read().splitlines()[n]
    print(f"toy scene {n}, captioned: {caption}")
    # through the same rule as a picture file: a no-op when the world was made at the model's size
    return load_image(Image.fromarray(np.array(scenes[n])), size)


def fit_context(image_ids, turns, question_ids, block_size, max_new_tokens):
    """The prompt: the picture's placeholders, as many of the latest earlier turns as leave room
    for a max_new_tokens answer, and the question. Raises ValueError if the question alone
    does not fit the context."""
    while True:
        ids = image_ids + [t for turn in turns for t in turn] + question_ids
        if not turns or len(ids) + max_new_tokens - 1 <= block_size:
            break
        turns = turns[1:]  # drop the oldest turn
    if len(ids) > block_size:
        raise ValueError(f"the prompt is {len(ids)} tokens ({len(image_ids)} of them the picture's), longer than "
                         f"the model's context of {block_size} tokens (its block_size)")
    return ids


def stream_answer(model, tokenizer, ids, picture, stop_id, settings, generator, autocast, device):
    """Generates after ids, printing the text as it comes; returns the answer's ids (without stop_id)."""
    s = settings
    room = model.config.block_size - len(ids) + 1  # the last new token needs no position of its own
    x = torch.tensor([ids], dtype=torch.long, device=device)
    images = None if picture is None else torch.from_numpy(picture[None]).to(device)
    answer, shown = [], ""
    with autocast:
        for token in model.generate_tokens(x, images, min(s["max_new_tokens"], room), s["temperature"],
                                           s["top_k"] or None, stop_id, generator):
            if int(token) == stop_id:
                break
            answer.append(int(token))
            text = tokenizer.decode(answer)
            if not text.endswith("\ufffd"):  # not in the middle of a character split across tokens
                print(text[len(shown):], end="", flush=True)
                shown = text
    print(tokenizer.decode(answer)[len(shown):], flush=True)
    return answer


def questions():
    """Lines from stdin after a '> ' prompt; piped lines are echoed so the output reads as a session."""
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if not sys.stdin.isatty():
            print(line)
        yield line.strip()


def main(argv):
    settings = dict(ckpt=ckpt, image=image, toy_scene=toy_scene, data_dir=data_dir, prompt=prompt,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                    device=device, dtype=dtype)
    apply_overrides(settings, argv)
    s = settings
    if s["max_new_tokens"] < 1 or s["temperature"] < 0 or s["top_k"] < 0:
        raise ValueError("max_new_tokens must be at least 1, temperature and top_k not negative")
    dev = s["device"] if s["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    autocast = autocast_context(torch.device(dev).type, s["dtype"])
    generator = torch.Generator(dev).manual_seed(s["seed"])
    model, tokenizer, fine_tuned, saw_images = load_model(s["ckpt"], dev)

    if (s["image"] or s["toy_scene"] >= 0) and not saw_images:
        raise ValueError(f"{s['ckpt']} is a text-only checkpoint (from before its image phase): its image "
                         "encoder was never trained, so it cannot be shown a picture; ask without one")
    picture = picture_of(s, model.config.image_size)
    image_ids = [] if picture is None else [tokenizer.image_id] * model.config.tokens_per_image
    stop_id = tokenizer.end_id if fine_tuned else tokenizer.eot_id

    turns, answers = [], []  # turns: the conversation so far, as token ids per question and answer
    for question in [s["prompt"]] if s["prompt"] else questions():
        if not question and (fine_tuned or not image_ids):
            continue  # nothing to answer or continue
        try:
            question_ids = tokenizer.encode_prompt(question) if fine_tuned else tokenizer.encode(question)
            ids = fit_context(image_ids, turns, question_ids, model.config.block_size, s["max_new_tokens"])
        except ValueError as e:  # a word outside a compact vocabulary, or too long
            if s["prompt"]:
                raise
            print(f"error: {e}", file=sys.stderr)  # in a chat, one bad question does not end it
            continue
        answer = stream_answer(model, tokenizer, ids, picture, stop_id, s, generator, autocast, dev)
        answers.append(answer)
        if fine_tuned:  # a pretrained model has no turns: each prompt stands alone
            turns.append(question_ids + answer + [tokenizer.end_id])
    return answers


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main(sys.argv[1:])
