"""Tests of the toy world generator (data/toyworld/prepare.py), at a tiny scale."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data import shards
from data.errors import UserError
from data.tokenizer import SPECIAL_TOKENS, Tokenizer
from data.toyworld import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.02


def generate(out_dir, seed=1337, scale=SCALE):
    prepare.main(["--out_dir", str(out_dir), "--seed", str(seed), "--scale", str(scale)])
    return str(out_dir)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("toyworld"))


@pytest.fixture(scope="module")
def meta(world):
    with open(os.path.join(world, "meta.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok(meta):
    return Tokenizer(meta["compact_vocab"])


def load_eval(world, name):
    with open(os.path.join(world, f"eval_{name}.json")) as f:
        return json.load(f)


def files_of(directory):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*")))


def test_same_seed_gives_identical_files(world, tmp_path):
    again = generate(tmp_path)
    assert files_of(world) == files_of(again)
    for name in files_of(world):
        with open(os.path.join(world, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def test_other_seed_and_scale_differ_but_share_the_vocabulary(world, meta, tmp_path):
    other = generate(tmp_path, seed=7, scale=0.03)
    for name in ["train_text.bin", "train_caption.bin", "train_chat.bin", "eval_images.npy", "eval_story_mc.json"]:
        with open(os.path.join(world, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() != b.read(), name
    with open(os.path.join(other, "meta.json")) as f:
        other_meta = json.load(f)
    assert other_meta["compact_vocab"] == meta["compact_vocab"]
    assert meta["compact_vocab"] == prepare.compact_vocab()  # no dependence on sampled text
    assert other_meta["counts"]["train_caption_samples"] > meta["counts"]["train_caption_samples"]


def test_meta(world, meta):
    vocab = meta["compact_vocab"]
    assert vocab == sorted(set(vocab)) and meta["vocab_size"] == len(vocab) <= 1024
    assert set(SPECIAL_TOKENS.values()) <= set(vocab)
    assert meta["format"] == 1 and meta["tokenizer"] == "cl100k_base"
    assert meta["image_size"] == [32, 32] and meta["seed"] == 1337 and meta["scale"] == SCALE
    assert meta["eval_tasks"] == ["color_qa", "count_mc", "exists_yn", "arith_mc", "facts_mc", "story_mc",
                                  "knowledge_qa"]
    assert meta["without_knowledge_facts"] is False
    for name in meta["files"].values():
        for f in [name] if isinstance(name, str) else name:
            assert os.path.exists(os.path.join(world, f)), f
    assert not glob.glob(os.path.join(world, "*.tmp*"))


def test_shards_open_with_their_kind_and_vocab(world, meta, tok):
    V, counts = meta["vocab_size"], meta["counts"]
    for split in ("train", "val"):
        text = shards.read_shard(os.path.join(world, f"{split}_text.bin"), shards.TEXT, V)
        assert text.num_tokens == counts[f"{split}_text_tokens"] and text.tokens[-1] == tok.eot_id
        cap = shards.read_shard(os.path.join(world, f"{split}_caption.bin"), shards.IMAGE_CAPTION, V)
        assert cap.num_samples == counts[f"{split}_caption_samples"] and cap.image_size == (32, 32)
        chat = shards.read_shard(os.path.join(world, f"{split}_chat.bin"), shards.CONVERSATION, V)
        assert chat.num_samples == counts[f"{split}_chat_samples"] and chat.image_size == (32, 32)
        assert cap.num_samples >= 8 and chat.num_samples >= 8
        knowledge = shards.read_shard(os.path.join(world, f"{split}_chat_knowledge.bin"), shards.CONVERSATION, V)
        assert knowledge.num_samples == counts[f"{split}_knowledge_chat_samples"] >= 8
        assert knowledge.image_size == (32, 32)
    assert counts["train_text_tokens"] >= prepare.TRAIN_TEXT_TOKENS * SCALE


def test_text_decodes_to_documents(world, tok):
    text = shards.read_shard(os.path.join(world, "train_text.bin"))
    docs = tok.decode(text.tokens).split("<|endoftext|>")
    assert docs[-1] == "" and len(docs) > 100
    for doc in docs[:-1]:
        assert doc and doc == doc.strip() and doc.endswith(".") and "  " not in doc
        assert re.fullmatch(r"[a-z .,?:]+", doc), doc


# A caption's object phrases: "a [size] colour shape [at the / in the] position [corner]"
OBJECT = re.compile(r"\ban? (?:(small|large) )?(red|green|blue|yellow|purple|orange) (circle|square|triangle)"
                    r"(?: (?:at|in) the (top left|top right|bottom left|bottom right))?")


def test_captions_describe_their_pictures(world, tok):
    cap = shards.read_shard(os.path.join(world, "train_caption.bin"))
    checked = 0
    for i in range(cap.num_samples):
        ids = cap.sample_tokens(i)
        assert tok.eot_id not in ids and tok.image_id not in ids
        text = tok.decode(ids)
        assert 5 <= len(ids) <= prepare.CAPTION_MAX_TOKENS and text.endswith("."), text
        objects = OBJECT.findall(text)
        assert 1 <= len(objects) <= 3, text
        for size, color, shape, pos in objects:
            if pos:  # the named colour is drawn in the named cell
                assert colour_pixels(np.asarray(cap.images[i]), prepare.POSITIONS.index(pos), color) >= 20, text
                checked += 1
    assert checked > cap.num_samples  # most captions name positions


def test_conversations_mask_exactly_the_answers(world, tok):
    chat = shards.read_shard(os.path.join(world, "train_chat.bin"))
    answers = set(prepare.COLORS + prepare.NUMBERS[:4] + prepare.POSITIONS + prepare.SHAPES + prepare.SIZES
                  + ["yes", "no", "left", "right", "top", "bottom", "nothing"])
    for i in range(chat.num_samples):
        ids = chat.sample_tokens(i).tolist()
        mask = chat.loss_mask[chat.offsets[i]:chat.offsets[i + 1]].tolist()
        assert ids[0] == tok.user_id and ids[-1] == tok.end_id
        expected, in_answer = [], False
        for t in ids:  # 1 from after <|assistant|> up to and including its <|end|>
            if t == tok.assistant_id:
                expected.append(0)
                in_answer = True
            else:
                expected.append(int(in_answer))
                if t == tok.end_id:
                    in_answer = False
        assert mask == expected
        turns = re.findall(r"<\|(user|assistant)\|>(.*?)<\|end\|>", tok.decode(ids))
        assert 2 <= len(turns) <= 6 and len(turns) % 2 == 0
        assert [r for r, _ in turns] == ["user", "assistant"] * (len(turns) // 2)
        for (_, question), (_, answer) in zip(turns[::2], turns[1::2]):
            assert question.endswith(("?", ".")) and question == question.strip()
            assert answer in answers or OBJECT.search(answer), (question, answer)
            if question.startswith("what color is the "):
                assert answer in prepare.COLORS
            if question == "how many shapes are there?":
                assert answer in ("one", "two", "three")
            if question.startswith("is there"):
                assert answer in ("yes", "no")


def colour_pixels(image, cell, color):
    """How many pixels of the picture's grid cell have (about) the palette colour."""
    y, x = cell // 2 * 16, cell % 2 * 16
    region = image[y:y + 16, x:x + 16].reshape(-1, 3).astype(int)
    return int((np.abs(region - prepare.COLOR_RGB[prepare.COLORS.index(color)]).max(axis=1) <= 24).sum())


def test_conversations_are_about_their_pictures(world, tok):
    chat = shards.read_shard(os.path.join(world, "train_chat.bin"))
    checked = 0
    for i in range(chat.num_samples):
        text = tok.decode(chat.sample_tokens(i))
        image = np.asarray(chat.images[i])
        for pos, answer in re.findall(r"what is at the ([a-z ]+)\?<\|end\|><\|assistant\|>([a-z ]+)<", text):
            cell = prepare.POSITIONS.index(pos)
            found = [c for c in prepare.COLORS if colour_pixels(image, cell, c) >= 20]
            if answer == "nothing":
                assert not found, (text, found)
            else:
                assert found == [OBJECT.search(answer).group(2)], (text, found)
            checked += 1
    assert checked >= 5


def test_existence_questions_are_common_balanced_and_true(world, tok):
    """The yes/no skill is learnt late (a finetune of 2 epochs left exists_yn at chance, 4 epochs
    did not), so conversations ask "is there a <colour> <shape>?" often, about as often yes as no,
    and the answer is what the picture shows."""
    chat = shards.read_shard(os.path.join(world, "train_chat.bin"))
    answers = []
    for i in range(chat.num_samples):
        text = tok.decode(chat.sample_tokens(i))
        image = np.asarray(chat.images[i])
        for color, shape, answer in re.findall(
                r"is there an? ([a-z]+) ([a-z]+)\?<\|end\|><\|assistant\|>([a-z]+)<", text):
            cells = [c for c in range(4) if colour_pixels(image, c, color) >= 20]
            if answer == "yes":  # the asked colour is drawn somewhere
                assert cells, (text, color)
            answers.append(answer)
    assert len(answers) >= 0.4 * chat.num_samples
    assert 0.4 <= answers.count("yes") / len(answers) <= 0.6


EXPECTED_TASKS = {  # name: (modality, kind, chance)
    "color_qa": ("vision", "open", 1 / 6), "count_mc": ("vision", "multiple_choice", 1 / 3),
    "exists_yn": ("vision", "yes_no", 0.5), "arith_mc": ("text", "multiple_choice", 0.25),
    "facts_mc": ("text", "multiple_choice", 0.25), "story_mc": ("text", "multiple_choice", 0.25),
    "knowledge_qa": ("knowledge", "open", 1 / 2),
}


def test_eval_sets_are_well_formed(world, meta, tok):
    images = np.load(os.path.join(world, "eval_images.npy"))
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    used = set()
    for name, (modality, kind, chance) in EXPECTED_TASKS.items():
        task = load_eval(world, name)
        assert set(task) == {"name", "modality", "kind", "chance", "description", "items"} | (
            {"delimiter"} if kind == "multiple_choice" else {"metric"} if name == "knowledge_qa" else set())
        assert (task["name"], task["modality"], task["kind"]) == (name, modality, kind)
        assert task["chance"] == pytest.approx(chance) and task["description"]
        items = task["items"]
        assert len(items) >= 20 and len(items) == meta["counts"][f"eval_{name}"]
        assert len({(it["image"], it["prompt"]) for it in items}) == len(items)  # no duplicates
        for it in items:
            assert set(it) == {"image", "prompt", "options", "answer"}
            prompt = it["prompt"]
            assert prompt == prompt.strip() and prompt
            if modality in ("vision", "knowledge"):  # a picture and the chat template
                assert isinstance(it["image"], int) and 0 <= it["image"] < len(images)
                used.add(it["image"])
                tok.encode_prompt(prompt)
            else:
                assert it["image"] is None
            if kind == "multiple_choice":
                opts = it["options"]
                assert len(opts) == (3 if name == "count_mc" else 4) == len(set(opts))
                assert isinstance(it["answer"], int) and 0 <= it["answer"] < len(opts)
                assert chance == pytest.approx(1 / len(opts))
                assert task["delimiter"] == (" " if modality == "text" else "")
                for o in opts:  # lm-eval's contract: options without the delimiter
                    assert o == o.strip() and o
                    # what evaluate.py encodes: a text prompt and its option together, after a chat
                    # prompt the option alone (it follows <|assistant|>)
                    tok.encode(prompt + task["delimiter"] + o if modality == "text" else o)
            elif kind == "yes_no":
                assert it["options"] is None and it["answer"] in ("yes", "no")
            elif name == "knowledge_qa":  # one sentence, checked against the picture below
                assert it["options"] is None and len(it["answer"]) == 1 and tok.encode(it["answer"][0])
            else:
                assert it["options"] is None and it["answer"] and all(a in prepare.COLORS for a in it["answer"])
        if kind == "yes_no":
            yes = sum(it["answer"] == "yes" for it in items)
            assert abs(2 * yes - len(items)) <= 1
        if name == "count_mc":
            assert np.ptp(np.bincount([it["answer"] for it in items], minlength=3)) <= 1
    assert used == set(range(len(images)))


def test_eval_images_are_held_out(world):
    train = set()
    for name in ["train_caption.bin", "val_caption.bin", "train_chat.bin", "val_chat.bin"]:
        shard = shards.read_shard(os.path.join(world, name))
        train.update(img.tobytes() for img in np.asarray(shard.images))
    images = np.load(os.path.join(world, "eval_images.npy"))
    assert not any(img.tobytes() in train for img in images)


def test_eval_scenes_are_held_out_from_training_scenes():
    import random
    rng = random.Random(0)
    scenes, _ = prepare.vision_evals(rng, 30)
    train = prepare.sample_scenes(rng, 3000, set(scenes))
    assert not set(scenes) & set(train)


def test_text_eval_items_never_occur_verbatim_in_training_text(world, tok):
    corpus = tok.decode(shards.read_shard(os.path.join(world, "train_text.bin")).tokens)
    for name in ("arith_mc", "facts_mc", "story_mc"):
        for it in load_eval(world, name)["items"]:
            assert it["prompt"] + " " + it["options"][it["answer"]] not in corpus
    # ...and not in the grammar's whole inventory of fact and sum sentences, at any scale
    text_world = prepare.TextWorld()
    facts = [s for per_fact in text_world.fact_sentences.values() for sentences in per_fact for s in sentences]
    inventory = "\n".join(facts + text_world.arith_sentences)
    for _, _, y, prompt in text_world.fact_eval:
        assert f"{prompt} {y}" not in inventory
    for _, _, _, c, prompt in text_world.arith_eval:
        assert f"{prompt} {prepare.NUMBERS[c]}" not in inventory
    stories = "\n".join(t.format(name=name, pron=pron, cause=cause, effect=effect)
                         for (cause, effect), templates in zip(prepare.CAUSES, text_world.cause_templates)
                         for t in templates for name, pron in prepare.NAMES)
    for i, template in text_world.cause_eval:
        for name, pron in prepare.NAMES:
            cause, effect = prepare.CAUSES[i]
            assert template.format(name=name, pron=pron, cause=cause, effect=effect)[:-1] not in stories


def test_every_fact_and_sum_behind_an_eval_item_is_taught():
    text_world = prepare.TextWorld()
    for relation, x, y, _ in text_world.fact_eval:
        taught = [s for sentences in text_world.fact_sentences[relation] for s in sentences
                  if re.search(rf"\b{x}\b", s) and re.search(rf"\b{y}\b", s)]
        assert len(taught) >= 3, (x, y)
    for op, a, b, c, _ in text_world.arith_eval:
        words = [prepare.NUMBERS[v] for v in (a, b, c)]
        taught = [s for s in text_world.arith_sentences
                  if op in s and all(re.search(rf"\b{w}\b", s) for w in words)]
        assert len(taught) >= 3, (op, a, b)
    for i, template in text_world.cause_eval:
        assert template not in text_world.cause_templates[i] and len(text_world.cause_templates[i]) >= 3
    assert len(text_world.fact_eval) >= 150 and len(text_world.arith_eval) >= 150
    assert len(text_world.cause_eval) * prepare.STORY_EVAL_NAMES >= 200


# ------------------------------------------------------------------ knowledge questions

def thing_colors():
    """Each thing of the corpus's thing_color facts -> its colour."""
    return {x: y for x, y in prepare.RELATIONS["thing_color"]["facts"]}


KNOWLEDGE_TURN = re.compile(r"<\|user\|>is there a shape with the color of ([a-z ]+)\?<\|end\|>"
                            r"<\|assistant\|>it is ([a-z]+)\. (yes|no)<\|end\|>")


def knowledge_turns(world, tok, name):
    """(picture, thing, answer) of every knowledge conversation in a shard."""
    shard = shards.read_shard(os.path.join(world, name))
    for i in range(shard.num_samples):
        (thing, color, answer), = KNOWLEDGE_TURN.findall(tok.decode(shard.sample_tokens(i)))
        yield np.asarray(shard.images[i]), thing, f"it is {color}. {answer}"


def check_knowledge_answer(image, thing, answer):
    """The answer states the thing's colour, then whether a shape in the picture wears it."""
    color, yes_no = re.fullmatch(r"it is ([a-z]+)\. (yes|no)", answer).groups()
    assert color == thing_colors()[thing], (thing, answer)
    worn = any(colour_pixels(image, cell, color) >= 20 for cell in range(4))
    assert yes_no == ("yes" if worn else "no"), (thing, answer)
    return yes_no


def test_knowledge_things_are_split_between_fine_tuning_and_evaluation():
    evals, train = prepare.KNOWLEDGE_EVAL_THINGS, prepare.KNOWLEDGE_TRAIN_THINGS
    colors = thing_colors()
    assert set(evals) == set(train) == set(range(len(prepare.COLORS)))  # every picture colour has both
    for c in evals:
        assert len(evals[c]) == prepare.KNOWLEDGE_EVAL_PER_COLOR and train[c]
        assert not set(evals[c]) & set(train[c])
        assert all(colors[x] == prepare.COLORS[c] for x in evals[c] + train[c])
    assert sorted(prepare.KNOWLEDGE_EVAL_FACTS) == sorted(
        ("thing_color", x, prepare.COLORS[c]) for c, things in evals.items() for x in things)


def test_no_conversation_names_an_evaluation_thing(world, tok):
    """Fine-tuning never pairs an eval thing with its colour: no conversation names one at all."""
    eval_things = [x for things in prepare.KNOWLEDGE_EVAL_THINGS.values() for x in things]
    named = re.compile(r"\b(?:" + "|".join(eval_things) + r")\b")
    checked = 0
    for name in ["train_chat.bin", "val_chat.bin", "train_chat_knowledge.bin", "val_chat_knowledge.bin"]:
        shard = shards.read_shard(os.path.join(world, name))
        for i in range(shard.num_samples):
            text = tok.decode(shard.sample_tokens(i))
            assert not named.search(text), text
            checked += 1
    train_things = {x for things in prepare.KNOWLEDGE_TRAIN_THINGS.values() for x in things}
    assert {thing for _, thing, _ in knowledge_turns(world, tok, "train_chat_knowledge.bin")} <= train_things
    assert checked > 100


def test_knowledge_conversations_answer_with_the_fact_then_the_picture(world, tok):
    answers = [check_knowledge_answer(image, thing, answer)
               for image, thing, answer in knowledge_turns(world, tok, "train_chat_knowledge.bin")]
    assert 0.3 <= answers.count("yes") / len(answers) <= 0.7


def test_knowledge_items_cannot_be_answered_without_the_thing_colour(world):
    task = load_eval(world, "knowledge_qa")
    assert task["metric"] == "final_answer"
    images = np.load(os.path.join(world, "eval_images.npy"))
    eval_things = {x for things in prepare.KNOWLEDGE_EVAL_THINGS.values() for x in things}
    answers = []
    for it in task["items"]:
        thing = re.fullmatch(r"is there a shape with the color of ([a-z ]+)\?", it["prompt"]).group(1)
        assert thing in eval_things
        image = images[it["image"]]
        answers.append(check_knowledge_answer(image, thing, it["answer"][0]))
        # two or three shapes: the picture alone does not say which colour is meant
        assert sum(any(colour_pixels(image, cell, c) >= 20 for c in prepare.COLORS) for cell in range(4)) >= 2
    assert abs(2 * answers.count("yes") - len(answers)) <= 1  # half yes: chance is 1/2
    assert len(task["items"]) == prepare.n_items(SCALE)


def test_the_default_corpus_teaches_every_evaluation_fact_often():
    """The facts knowledge_qa needs are in the text the main job trains on, in both directions
    ("the sun is yellow.", "yellow is the color of the sun.") and often."""
    import random
    text_world = prepare.TextWorld()
    tok = Tokenizer(prepare.compact_vocab())
    docs, _ = prepare.text_tokens(text_world, random.Random("toyworld/1337/train_text"), tok,
                                  prepare.TRAIN_TEXT_TOKENS)
    corpus = "\n".join(docs)
    facts = prepare.RELATIONS["thing_color"]["facts"]
    for relation, x, y in prepare.KNOWLEDGE_EVAL_FACTS:
        sentences = text_world.fact_sentences[relation][facts.index((x, y))]
        assert sum(corpus.count(s) for s in sentences) >= 50, x
        assert corpus.count(f"{y} is the color of {x}.") >= 10, x


def test_the_control_corpus_is_the_full_one_less_exactly_the_evaluation_facts():
    import random
    full, control = prepare.TextWorld(), prepare.TextWorld(left_out=prepare.KNOWLEDGE_EVAL_FACTS)
    facts = prepare.RELATIONS["thing_color"]["facts"]
    left_out = [s for relation, x, y in prepare.KNOWLEDGE_EVAL_FACTS
                for s in full.fact_sentences[relation][facts.index((x, y))]]
    assert control.left_out_sentences == set(left_out)
    assert control.fact_sentences == full.fact_sentences and control.fact_eval == full.fact_eval
    changed = 0
    for i in range(3000):  # the same draws give the same document, less the left-out sentences
        doc = full.document(random.Random(i))
        kept = doc
        for sentence in (s for s in left_out if s in doc):
            kept = re.sub(rf"(?:^| ){re.escape(sentence)}(?= |$)", "", kept).strip()
        assert control.document(random.Random(i)) == kept
        changed += kept != doc
    assert changed > 50


def test_the_control_world_differs_from_the_full_one_only_in_its_text(world, tmp_path):
    control = tmp_path / "control"
    prepare.main(["--out_dir", str(control), "--scale", str(SCALE), "--without_knowledge_facts"])
    with open(control / "meta.json") as f:
        assert json.load(f)["without_knowledge_facts"] is True
    assert files_of(world) == files_of(control)
    for name in files_of(world):
        with open(os.path.join(world, name), "rb") as a, open(control / name, "rb") as b:
            assert (a.read() == b.read()) == (name not in ("train_text.bin", "val_text.bin", "meta.json")), name
    # neither kind of toy world quietly replaces the other
    with pytest.raises(UserError, match="prepared without the knowledge facts; delete it or choose another"):
        prepare.main(["--out_dir", str(control), "--scale", str(SCALE)])
    with pytest.raises(UserError, match="prepared with the knowledge facts"):
        prepare.main(["--out_dir", world, "--scale", str(SCALE), "--without_knowledge_facts"])
    assert os.path.exists(os.path.join(world, "meta.json"))  # refused before anything was touched


def test_the_control_has_its_own_default_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(prepare, "HERE", str(tmp_path))
    prepare.main(["--scale", "0.005", "--without_knowledge_facts"])
    assert os.path.exists(tmp_path / prepare.CONTROL_DIR / "meta.json")
    assert not os.path.exists(tmp_path / "meta.json")


def test_samples_image(world):
    from PIL import Image
    with Image.open(os.path.join(world, "samples.png")) as im:
        assert im.size == (8 * 130 + 2, 8 * 130 + 2)
    with open(os.path.join(world, "samples.txt")) as f:
        assert len(f.read().splitlines()) >= 64


def test_runs_as_a_script_and_as_a_module(tmp_path):
    for args in (["data/toyworld/prepare.py"], ["-m", "data.toyworld.prepare"]):
        out = subprocess.run([sys.executable, *args, "--out_dir", str(tmp_path), "--scale", "0.005"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "vocab: " in out.stdout and os.path.exists(tmp_path / "meta.json")


@pytest.mark.parametrize("size", [16, 18, 32, 48, 64, 96, 128, 224])
def test_every_image_size_keeps_each_shape_inside_its_cell(size):
    # A large red shape of each kind alone in the top left cell, or in the bottom right one, on a
    # black background: 40 pictures each, so the random moves reach their limits. (At 64 px the
    # triangle's wide base once reached past the picture's edge: an IndexError.)
    cell = size // 2
    for position in (0, 3):
        scenes = [(0, ((position, kind, 0, 1),)) for kind in range(3) for _ in range(40)]
        images = prepare.render(scenes, np.random.default_rng(size), size).astype(int)
        shape = images[..., 0] - images[..., 2] > 100  # red on black: noise and tints never get near
        assert shape.any(axis=(1, 2)).all()  # every shape was drawn
        inside = np.zeros((size, size), bool)
        corner = 0 if position == 0 else cell
        inside[corner:corner + cell, corner:corner + cell] = True
        assert not (shape & ~inside).any()


def test_preparing_again_removes_an_earlier_versions_task(tmp_path):
    # evaluate.py scores every eval_*.json in the folder: knowledge_mc, the task knowledge_qa
    # replaced, must go when the world is prepared again in place; the new tasks stay
    generate(tmp_path, scale=0.005)
    stale = tmp_path / "eval_knowledge_mc.json"
    stale.write_text("{}")
    generate(tmp_path, scale=0.005)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.glob("eval_*.json")) == sorted(f"eval_{t}.json" for t in prepare.EVAL_TASKS)
