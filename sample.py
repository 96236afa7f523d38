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
likeliest tokens only, and the same seed gives the same sample. A missing or unreadable picture,
a question too long for the context or using a word outside a compact vocabulary, or a picture
for a checkpoint that never saw one ends the run with one `error:` line (in a conversation from
stdin, a bad question only skips that question). The preparation, the prompt and the
generation are chat.py's, which serve.py (the same in a browser) shares.
"""

import sys

import torch

import chat
from common import autocast_context, resolve_device
from configurator import apply_overrides
from data.errors import UserError, report_user_errors
from inference import load_model

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
    chat.check_sampling(s["max_new_tokens"], s["temperature"], s["top_k"])
    dev = resolve_device(s["device"])
    autocast = autocast_context(torch.device(dev).type, s["dtype"])
    generator = torch.Generator(dev).manual_seed(s["seed"])
    model, tokenizer, fine_tuned, saw_images = load_model(s["ckpt"], dev)

    if s["image"] or s["toy_scene"] >= 0:
        chat.check_can_see(s["ckpt"], saw_images)
    picture, caption = chat.load_picture(s["image"], s["toy_scene"], s["data_dir"], model.config.image_size)
    if caption is not None:
        print(f"toy scene {s['toy_scene']}, captioned: {caption}")
    image_ids = [] if picture is None else [tokenizer.image_id] * model.config.tokens_per_image
    stop_id = tokenizer.end_id if fine_tuned else tokenizer.eot_id

    turns, answers = [], []  # turns: the conversation so far, as token ids per question and answer
    for question in [s["prompt"]] if s["prompt"] else questions():
        if not question and (fine_tuned or not image_ids):
            continue  # nothing to answer or continue
        try:
            question_ids = chat.encode_question(tokenizer, fine_tuned, question)
            ids = chat.fit_context(image_ids, turns, question_ids, model.config.block_size, s["max_new_tokens"])
        except UserError as e:  # a word outside a compact vocabulary, or too long
            if s["prompt"]:
                raise
            print(f"error: {e}", file=sys.stderr)  # in a chat, one bad question does not end it
            continue
        answer = []
        for token, text in chat.answer_pieces(model, tokenizer, ids, picture, stop_id, s["max_new_tokens"],
                                              s["temperature"], s["top_k"], generator, autocast):
            if token is not None:
                answer.append(token)
            print(text, end="", flush=True)
        print(flush=True)
        answers.append(answer)
        if fine_tuned:  # a pretrained model has no turns: each prompt stands alone
            turns.append(question_ids + answer + [tokenizer.end_id])
    return answers


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main(sys.argv[1:])
