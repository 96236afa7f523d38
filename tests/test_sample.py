"""sample.py on a tiny fine-tuned toy checkpoint: the same answers as evaluate.py, pictures from
files equal to pictures from memory, conversations, and one clear error per bad input."""

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import chat
import evaluate
import inference
import sample
from common import autocast_context
from data.errors import UserError
from tests.tiny_data import ROOT

TINY = ["--n_layer=1", "--n_head=2", "--n_kv_head=2", "--n_embd=32", "--ffn_hidden=64", "--vit_width=16",
        "--vit_heads=2"]


def run(*cmd):
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, f"{cmd[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny toy world; a pretraining run that keeps a text-only checkpoint halfway (before
    its image phase); a few fine-tuning steps from its end."""
    root = tmp_path_factory.mktemp("sample")
    data = root / "data"
    run("data/toyworld/prepare.py", f"--out_dir={data}", "--scale=0.02")
    run("pretrain.py", "config/toy.py", *TINY, f"--data_dir={data}", f"--out_dir={root / 'pt'}", "--seq_len=128",
        "--batch_size=4", "--max_iters=8", "--image_iters=4", "--warmup_iters=2", "--eval_batches=2",
        "--save_fracs=(0.5,)")
    run("finetune.py", "config/toy_sft.py", f"--data_dir={data}", f"--init_from={root / 'pt' / 'ckpt.pt'}",
        f"--out_dir={root / 'sft'}", "--batch_size=8", "--text_rows=2", "--seq_len=96", "--eval_batches=2",
        "--stop_at_iter=3")
    return {"data": str(data), "pretrained": str(root / "pt" / "ckpt.pt"),
            "text_only": str(root / "pt" / "ckpt_frac0.50.pt"), "sft": str(root / "sft" / "ckpt.pt")}


def ask(ckpt, *args):
    return sample.main([f"--ckpt={ckpt}", *args])


def test_answers_equal_evaluate_greedy_generation(toy, capsys):
    with open(os.path.join(toy["data"], "eval_color_qa.json")) as f:
        items = json.load(f)["items"][:6]
    images = np.load(os.path.join(toy["data"], "eval_images.npy"))
    model, tokenizer, _, _ = inference.load_model(toy["sft"], "cpu")
    P = model.config.tokens_per_image
    prompts = [([tokenizer.image_id] * P + tokenizer.encode_prompt(it["prompt"]), it["image"]) for it in items]
    expected = inference.greedy_answers(model, prompts, images, tokenizer.end_id, "cpu",
                                       autocast_context("cpu", "bfloat16"), 64, 8)
    assert any(expected)  # the tiny model says something, so the comparison is not of empty answers
    for item, answer in zip(items, expected):
        got = ask(toy["sft"], f"--data_dir={toy['data']}", f"--toy_scene={item['image']}",
                  f"--prompt={item['prompt']}", "--max_new_tokens=8")
        assert got == [answer]
        out = capsys.readouterr().out
        assert out.endswith(tokenizer.decode(answer) + "\n")  # streamed, then the line ends


def test_toy_scene_prints_its_caption(toy, capsys):
    with open(os.path.join(toy["data"], "eval_captions.txt")) as f:
        captions = f.read().splitlines()
    assert len(captions) == len(np.load(os.path.join(toy["data"], "eval_images.npy")))
    ask(toy["sft"], f"--data_dir={toy['data']}", "--toy_scene=5", "--prompt=what do you see?", "--max_new_tokens=2")
    assert f"toy scene 5, captioned: {captions[5]}" in capsys.readouterr().out


def test_picture_from_a_png_file_gives_the_same_tokens_as_from_memory(toy, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(np.load(os.path.join(toy["data"], "eval_images.npy"))[7]).save(path)  # PNG: lossless
    from_file = ask(toy["sft"], f"--image={path}", "--prompt=how many shapes are there?", "--max_new_tokens=8")
    from_memory = ask(toy["sft"], f"--data_dir={toy['data']}", "--toy_scene=7",
                      "--prompt=how many shapes are there?", "--max_new_tokens=8")
    assert from_file == from_memory and from_file[0]
    # A tiny model's answer hardly depends on the picture, so compare what it was shown as well.
    shown_file, _ = chat.load_picture(str(path), -1, toy["data"], 32)
    shown_upload, _ = chat.load_picture(path.read_bytes(), -1, toy["data"], 32)  # serve.py's uploads
    shown_memory, _ = chat.load_picture("", 7, toy["data"], 32)
    assert shown_file.dtype == np.uint8 and np.array_equal(shown_file, shown_memory)
    assert np.array_equal(shown_upload, shown_memory)
    assert not np.array_equal(shown_memory, chat.load_picture("", 8, toy["data"], 32)[0])


def test_stdin_questions_are_one_conversation(toy, monkeypatch, capsys):
    lines = "what color is the circle?\n\nWhat is THIS?\nhow many shapes are there?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    answers = ask(toy["sft"], f"--data_dir={toy['data']}", "--toy_scene=2", "--max_new_tokens=6")
    assert len(answers) == 2  # the empty line is skipped; so is the question the tokenizer cannot encode
    out, err = capsys.readouterr()
    assert "> what color is the circle?\n" in out and "> how many shapes are there?\n" in out
    assert err.startswith("error: text 'What is THIS?' uses cl100k id") and "compact vocabulary" in err
    # the second answer is the greedy continuation of picture, first turn, second question
    model, tok, _, _ = inference.load_model(toy["sft"], "cpu")
    picture = np.load(os.path.join(toy["data"], "eval_images.npy"))[2:3]
    first = tok.encode_prompt("what color is the circle?") + answers[0] + [tok.end_id]
    ids = [tok.image_id] * model.config.tokens_per_image + first + tok.encode_prompt("how many shapes are there?")
    with autocast_context("cpu", "bfloat16"):
        new = model.generate(torch.tensor([ids]), torch.from_numpy(picture), 6, stop_id=tok.end_id)[0].tolist()
    assert answers[1] == (new[:new.index(tok.end_id)] if tok.end_id in new else new)


def test_the_oldest_turns_leave_a_full_context_first():
    image, turns, question = [9] * 4, [[1] * 5, [2] * 5, [3] * 5], [7] * 3
    # 4 + 15 + 3 = 22 tokens and 4 new ones need 25 positions: with 20 the first turn goes
    assert chat.fit_context(image, turns, question, 20, 4) == image + [2] * 5 + [3] * 5 + question
    assert chat.fit_context(image, turns, question, 25, 4) == image + [1] * 5 + [2] * 5 + [3] * 5 + question
    assert chat.fit_context(image, turns, question, 7, 4) == image + question  # all history gone
    with pytest.raises(UserError, match=r"prompt is 7 tokens \(4 of them the picture's\).*context of 6 tokens"):
        chat.fit_context(image, turns, question, 6, 4)


def test_pretrained_model_continues_raw_text(toy, monkeypatch):
    model, tok, _, _ = inference.load_model(toy["pretrained"], "cpu")
    ids = tok.encode("three plus four is")
    with autocast_context("cpu", "bfloat16"):
        new = model.generate(torch.tensor([ids]), None, 8, stop_id=tok.eot_id)[0].tolist()
    expected = new[:new.index(tok.eot_id)] if tok.eot_id in new else new
    assert ask(toy["pretrained"], "--prompt=three plus four is", "--max_new_tokens=8") == [expected]
    # shown a picture and an empty line, it continues from the picture alone: a caption
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    caption = ask(toy["pretrained"], f"--data_dir={toy['data']}", "--toy_scene=4", "--max_new_tokens=8")
    picture = torch.from_numpy(np.load(os.path.join(toy["data"], "eval_images.npy"))[4:5])
    with autocast_context("cpu", "bfloat16"):
        new = model.generate(torch.tensor([[tok.image_id] * model.config.tokens_per_image]), picture, 8,
                             stop_id=tok.eot_id)[0].tolist()
    assert caption == [new[:new.index(tok.eot_id)] if tok.eot_id in new else new]
    # sampling: the same seed gives the same tokens, another seed other ones
    sampled = [ask(toy["pretrained"], "--prompt=three plus four is", "--temperature=2.0", "--top_k=50",
                   "--max_new_tokens=16", f"--seed={s}") for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


BAD_INPUTS = [  # (the case, sample.py's arguments beyond --ckpt, what its one error line says)
    ("a missing picture file", ["--image={tmp}/missing.png", "--prompt=hi"], r"image \S*/missing.png does not exist"),
    ("a file that is no picture", ["--image={tmp}/broken.png", "--prompt=hi"], r"broken.png: not a readable image"),
    ("a prompt longer than the context", ["--prompt=" + " ".join(["red"] * 200)],
     r"prompt is 2\d\d tokens .* longer than the model's context of 128 tokens \(its block_size\)"),
    ("a word outside the compact vocabulary", ["--prompt=What is THIS?"],
     r"text 'What is THIS\?' uses cl100k id \d+, which is not in this dataset's compact vocabulary"),
    ("a toy scene and a picture file", ["--toy_scene=1", "--image={tmp}/broken.png", "--prompt=hi"],
     r"give either image or toy_scene, not both"),
    ("a toy scene out of range", ["--toy_scene=99999", "--prompt=hi"],
     r"toy_scene must lie in 0\.\.71 \(\S*eval_images.npy holds 72 pictures\), got 99999"),
    ("a picture for a text-only checkpoint", ["--ckpt={text_only}", "--toy_scene=0", "--prompt=hi"],
     r"ckpt_frac0.50.pt is a text-only checkpoint .* never trained, so it cannot be shown a picture"),
    ("no room to answer", ["--max_new_tokens=0", "--prompt=hi"], r"max_new_tokens must be at least 1 \(got 0\)"),
    ("a missing checkpoint", ["--ckpt={tmp}/none.pt", "--prompt=hi"], r"checkpoint \S*/none.pt does not exist"),
]


def test_bad_inputs_end_in_one_error_line(toy, tmp_path):
    """Each user mistake ends sample.py with status 1 and one `error:` line, no traceback."""
    (tmp_path / "broken.png").write_bytes(b"not a png")
    runs = []
    for case, args, _ in BAD_INPUTS:  # all at once: most of each run is Python importing torch
        args = [a.format(tmp=tmp_path, text_only=toy["text_only"]) for a in args]
        cmd = [sys.executable, "sample.py", f"--ckpt={toy['sft']}", f"--data_dir={toy['data']}", *args]
        runs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1")))
    for (case, _, message), process in zip(BAD_INPUTS, runs):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 1, f"{case}: exit status {process.returncode}, stderr:\n{err}"
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: stderr is not one error line:\n{err}"
        assert re.search(message, lines[0]), f"{case}: {lines[0]!r} does not say {message!r}"


def test_a_text_only_checkpoint_still_answers_text(toy):
    assert len(ask(toy["text_only"], "--prompt=three plus", "--max_new_tokens=2")) == 1
