"""data/benchmarks/prepare.py on fixture parquet files in each Hub dataset's schema, then
evaluate.py on the tasks it writes."""

import io
import json
import os
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import evaluate
from common import save_checkpoint
from data.benchmarks import prepare
from data.images import load_image
from model import VLM, ModelConfig

SIZE = 16
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the Hub's Image feature in parquet
BRIEFLY = "\nAnswer the question using a single word or phrase."


def jpeg(rgb, size=(40, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="JPEG")
    return buffer.getvalue()


RED, GREEN, BLUE, GREY = jpeg((200, 30, 30)), jpeg((30, 200, 30)), jpeg((30, 30, 200)), jpeg((90, 90, 90), (20, 50))
BROKEN = b"\xff\xd8 not really a jpeg"


def write(root, repo, path, schema, rows):
    full = os.path.join(root, repo, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(schema)), full)


def vqa_answers(*words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def make_hub(root):
    """One small file set per benchmark, named and typed as in the Hub repositories."""
    vqav2 = [("question_type", pa.string()), ("multiple_choice_answer", pa.string()),
             ("answers", pa.list_(pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()),
                                             ("answer_id", pa.int64())]))),
             ("image_id", pa.int64()), ("answer_type", pa.string()), ("question_id", pa.int64()),
             ("question", pa.string()), ("image", IMAGE)]

    def vq(qid, image_id, question, image, answers):
        return {"question_type": "what", "multiple_choice_answer": answers[0] if answers else None,
                "answers": vqa_answers(*answers), "image_id": image_id, "answer_type": "other", "question_id": qid,
                "question": question, "image": {"bytes": image, "path": f"{image_id}.jpg"}}

    write(root, "lmms-lab/VQAv2", "data/validation-00000-of-00002.parquet", vqav2, [
        vq(1, 10, "What color is the bus?", RED, ["red"] * 9 + ["dark red"]),
        vq(2, 10, "Is it sunny?", RED, ["yes"] * 10),
        vq(3, 11, None, GREEN, ["grass"] * 10)])  # no question
    write(root, "lmms-lab/VQAv2", "data/validation-00001-of-00002.parquet", vqav2, [
        vq(4, 12, "How many cars?", BLUE, ["2"] * 10),
        vq(5, 13, "What is it?", None, ["dog"] * 10),  # no image bytes
        vq(6, 14, "Where is it?", BROKEN, ["here"] * 10),  # does not decode
        vq(7, 15, "What is shown?", GREY, [])])  # no answers

    write(root, "lmms-lab/GQA", "testdev_balanced_images/testdev-00000-of-00001.parquet",
          [("id", pa.string()), ("image", IMAGE)],
          [{"id": "n1", "image": {"bytes": GREEN, "path": None}}, {"id": "n2", "image": {"bytes": BLUE, "path": None}}])
    write(root, "lmms-lab/GQA", "testdev_balanced_instructions/testdev-00000-of-00001.parquet",
          [("id", pa.string()), ("imageId", pa.string()), ("question", pa.string()), ("answer", pa.string()),
           ("fullAnswer", pa.string()), ("isBalanced", pa.bool_())],
          [{"id": "201", "imageId": "n2", "question": "Is the sky blue?", "answer": "yes",
            "fullAnswer": "Yes, the sky is blue.", "isBalanced": True},
           {"id": "202", "imageId": "n1", "question": "What is on the table?", "answer": "apple",
            "fullAnswer": "An apple.", "isBalanced": True},
           {"id": "203", "imageId": "n9", "question": "Who is it?", "answer": "man", "fullAnswer": "A man.",
            "isBalanced": True}])  # its picture is not in the images config

    strings = pa.list_(pa.string())
    write(root, "lmms-lab/textvqa", "data/validation-00000-of-00001.parquet",
          [("image_id", pa.string()), ("question_id", pa.int32()), ("question", pa.string()),
           ("question_tokens", strings), ("image", IMAGE), ("image_width", pa.int32()), ("image_height", pa.int32()),
           ("flickr_original_url", pa.string()), ("flickr_300k_url", pa.string()), ("answers", strings),
           ("image_classes", strings), ("set_name", pa.string()), ("ocr_tokens", strings)],
          [{"image_id": "a1", "question_id": 34602, "question": "what does the SIGN say?", "question_tokens": [],
            "image": {"bytes": GREY, "path": None}, "image_width": 20, "image_height": 50,
            "flickr_original_url": "", "flickr_300k_url": "", "answers": ["stop"] * 10, "image_classes": [],
            "set_name": "val", "ocr_tokens": ["stop"]}])

    write(root, "lmms-lab/VizWiz-VQA", "data/val-00000-of-00001-59be8a2af5f336e2.parquet",
          [("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()), ("answers", strings),
           ("category", pa.string())],
          [{"question_id": "VizWiz_val_00000000.jpg", "image": {"bytes": RED, "path": None},
            "question": "what is this CAN?", "answers": ["soup"] * 8 + ["unanswerable"] * 2, "category": "other"},
           {"question_id": "VizWiz_val_00000001.jpg", "image": {"bytes": BLUE, "path": None},
            "question": "which color?", "answers": [], "category": "unanswerable"}])  # no answers

    pope = [("question_id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
            ("image_source", pa.string()), ("image", IMAGE), ("category", pa.string())]
    write(root, "lmms-lab/POPE", "data/test-00000-of-00001.parquet", pope, [
        {"question_id": "1", "question": " Is there a dog in the image? ", "answer": "Yes ", "image_source": "s1",
         "image": {"bytes": GREEN, "path": None}, "category": "adversarial"},
        {"question_id": "2", "question": "Is there a cat in the image?", "answer": "no", "image_source": "s1",
         "image": {"bytes": GREEN, "path": None}, "category": "popular"},
        {"question_id": "3", "question": "Is there a car in the image?", "answer": "no", "image_source": "s2",
         "image": {"bytes": RED, "path": None}, "category": "random"},
        {"question_id": "4", "question": "Is there a bus in the image?", "answer": "maybe", "image_source": "s2",
         "image": {"bytes": RED, "path": None}, "category": "random"}])  # not yes or no

    arc = [("id", pa.string()), ("question", pa.string()),
           ("choices", pa.struct([("text", strings), ("label", strings)])), ("answerKey", pa.string())]
    write(root, "allenai/ai2_arc", "ARC-Easy/test-00000-of-00001.parquet", arc, [
        {"id": "e1", "question": "Which is a mammal & lives in water <often>?",
         "choices": {"text": ["shark", "whale", "trout", "squid"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "e2", "question": "How many legs does a spider have?",
         "choices": {"text": ["six", "eight", "ten"], "label": ["1", "2", "3"]}, "answerKey": "2"},
        {"id": "e3", "question": "What melts ice?",
         "choices": {"text": ["heat", "cold"], "label": ["A", "B"]}, "answerKey": "E"}])  # names no choice
    write(root, "allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet", arc, [
        {"id": "c1", "question": "Which gas do plants take in?",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon", "argon"],
                     "label": ["A", "B", "C", "D", "E"]}, "answerKey": "B"}])

    write(root, "Rowan/hellaswag", "data/validation-00000-of-00001.parquet",
          [("ind", pa.int32()), ("activity_label", pa.string()), ("ctx_a", pa.string()), ("ctx_b", pa.string()),
           ("ctx", pa.string()), ("endings", strings), ("source_id", pa.string()), ("split", pa.string()),
           ("split_type", pa.string()), ("label", pa.string())],
          [{"ind": 24, "activity_label": "Home and Garden [title] How to water plants",
            "ctx_a": "[header] Water early.  [step] Fill a can.", "ctx_b": "then", "ctx": "",
            "endings": ["pour it on the soil [substeps] slowly.", "drink it.", "throw it [title] away.", "paint it."],
            "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": "0"},
           {"ind": 25, "activity_label": "Running", "ctx_a": "A man runs.", "ctx_b": "He", "ctx": "",
            "endings": ["stops.", "flies.", "sings.", "swims."], "source_id": "activitynet~2", "split": "val",
            "split_type": "zeroshot", "label": ""}])  # no label

    write(root, "baber/piqa", "piqa_validation.parquet",
          [("goal", pa.string()), ("sol1", pa.string()), ("sol2", pa.string()), ("label", pa.int64())],
          [{"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Kick the jar.", "label": 0},
           {"goal": "Dry a towel.", "sol1": "Soak it.", "sol2": "Hang it in the sun.", "label": 1}])
    return root


def run_prepare(hub, out, *args):
    prepare.main([f"--local_dir={hub}", f"--out_dir={out}", f"--image_size={SIZE}", "--workers=1", *args])
    return {name: json.loads((out / f"eval_{name}.json").read_text()) for name in prepare.TASKS
            if (out / f"eval_{name}.json").exists()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    hub, out = make_hub(root / "hub"), root / "out"
    return hub, out, run_prepare(hub, out, "--workers=2")  # the pool of decoding processes too


def pictures(out, task):
    return np.load(out / task["images"])


def test_every_benchmark_becomes_a_task(prepared):
    _, _, tasks = prepared
    assert sorted(tasks) == sorted(prepare.TASKS)
    assert {n: len(t["items"]) for n, t in tasks.items()} == {
        "vqav2": 3, "gqa": 2, "textvqa": 1, "vizwiz": 1, "pope": 3, "arc_easy": 2, "arc_challenge": 1,
        "hellaswag": 1, "piqa": 2}
    assert tasks["vqav2"]["skipped"] == {"no question": 1, "image without bytes": 1, "image does not decode": 1,
                                         "no answers": 1}
    assert tasks["vqav2"]["source"]["rows"] == 7
    assert tasks["gqa"]["skipped"] == {"imageId names no picture": 1}
    assert tasks["vizwiz"]["skipped"] == {"no answers": 1}
    assert tasks["pope"]["skipped"] == {"answer not yes or no": 1}
    assert tasks["arc_easy"]["skipped"] == {"answerKey names no choice": 1}
    assert tasks["hellaswag"]["skipped"] == {"label names no ending": 1}
    for task in tasks.values():
        if task["modality"] == "vision":
            assert "delimiter" not in task and task["images"] == f"eval_{task['name']}_images.npy"
            assert task.get("metric") == {"vqav2": "vqa", "gqa": "exact_match", "textvqa": "vqa_evalai",
                                          "vizwiz": "vqa_evalai"}.get(task["name"])
        else:
            assert task["delimiter"] == " " and "images" not in task
            assert all(item["image"] is None for item in task["items"])


def test_vision_prompts_and_answers_are_lmms_evals(prepared):
    _, _, tasks = prepared
    vqav2 = tasks["vqav2"]["items"]
    assert [i["prompt"] for i in vqav2] == ["What color is the bus?" + BRIEFLY, "Is it sunny?" + BRIEFLY,
                                           "How many cars?" + BRIEFLY]
    assert vqav2[0]["answer"] == ["red"] * 9 + ["dark red"] and vqav2[0]["id"] == 1
    assert tasks["gqa"]["items"][0] == {"id": "201", "prompt": "Is the sky blue?" + BRIEFLY, "answer": ["yes"],
                                        "image": 0}
    # TextVQA and VizWiz: str.capitalize() (the rest lower case), as their lmms-eval doc_to_text
    assert tasks["textvqa"]["items"][0]["prompt"] == "What does the sign say?" + BRIEFLY
    assert tasks["vizwiz"]["items"][0]["prompt"] == (
        "What is this can?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + BRIEFLY)
    assert tasks["vizwiz"]["items"][0]["answer"] == ["soup"] * 8 + ["unanswerable"] * 2
    pope = tasks["pope"]
    assert pope["kind"] == "yes_no" and pope["chance"] == 0.5
    assert [(i["prompt"], i["answer"], i["category"]) for i in pope["items"]] == [
        ("Is there a dog in the image?" + BRIEFLY, "yes", "adversarial"),
        ("Is there a cat in the image?" + BRIEFLY, "no", "popular"),
        ("Is there a car in the image?" + BRIEFLY, "no", "random")]
    assert all(tasks[n]["chance"] == 0.0 and tasks[n]["kind"] == "open" for n in ("vqav2", "gqa", "textvqa", "vizwiz"))


def test_each_picture_is_stored_once_as_load_image_prepares_it(prepared):
    _, out, tasks = prepared
    vqav2 = pictures(out, tasks["vqav2"])
    # two questions share the red picture; the broken one decoded to nothing and left a spare row
    assert [i["image"] for i in tasks["vqav2"]["items"]] == [0, 0, 1]
    assert vqav2.shape == (3, SIZE, SIZE, 3) and vqav2.dtype == np.uint8
    assert np.array_equal(vqav2[0], load_image(RED, SIZE)) and np.array_equal(vqav2[1], load_image(BLUE, SIZE))
    assert not vqav2[2].any()
    # GQA: each question gets the picture its imageId names in the other config
    gqa = pictures(out, tasks["gqa"])
    assert [i["id"] for i in tasks["gqa"]["items"]] == ["201", "202"]
    assert np.array_equal(gqa[tasks["gqa"]["items"][0]["image"]], load_image(BLUE, SIZE))
    assert np.array_equal(gqa[tasks["gqa"]["items"][1]["image"]], load_image(GREEN, SIZE))
    assert len(pictures(out, tasks["pope"])) == 2  # three questions, two pictures
    assert np.array_equal(pictures(out, tasks["textvqa"])[0], load_image(GREY, SIZE))  # 20x50 squeezed to a square


def test_text_prompts_are_lm_evals_own(prepared):
    """The harness's own templates and HellaSwag preprocessing, applied to the fixture rows."""
    import yaml
    from lm_eval.tasks.hellaswag import utils as hellaswag_utils
    from lm_eval.utils import apply_template
    from datasets import Dataset
    hub, _, tasks = prepared
    tasks_dir = os.path.join(os.path.dirname(hellaswag_utils.__file__), "..")
    for name, yaml_path, parquet in [("arc_easy", "arc/arc_easy.yaml", "allenai/ai2_arc/ARC-Easy"),
                                     ("arc_challenge", "arc/arc_easy.yaml", "allenai/ai2_arc/ARC-Challenge"),
                                     ("piqa", "piqa/piqa.yaml", "baber/piqa")]:
        with open(os.path.join(tasks_dir, yaml_path)) as f:
            template = yaml.safe_load(f)["doc_to_text"]
        folder = os.path.join(hub, parquet)
        rows = pq.read_table(os.path.join(folder, sorted(os.listdir(folder))[0])).to_pylist()
        expected = [apply_template(template, row) for row in rows][:len(tasks[name]["items"])]
        assert [i["prompt"] for i in tasks[name]["items"]] == expected, name
    assert tasks["arc_easy"]["items"][0]["prompt"] == "Question: Which is a mammal & lives in water <often>?\nAnswer:"
    assert [(i["options"], i["answer"]) for i in tasks["arc_easy"]["items"]] == [
        (["shark", "whale", "trout", "squid"], 1), (["six", "eight", "ten"], 1)]
    assert tasks["arc_easy"]["chance"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert tasks["arc_challenge"]["chance"] == pytest.approx(1 / 5)
    assert [(i["options"], i["answer"]) for i in tasks["piqa"]["items"]] == [
        (["Twist the lid.", "Kick the jar."], 0), (["Soak it.", "Hang it in the sun."], 1)]
    assert tasks["piqa"]["chance"] == 0.5

    rows = pq.read_table(os.path.join(hub, "Rowan/hellaswag/data/validation-00000-of-00001.parquet")).to_pylist()
    reference = hellaswag_utils.process_docs(Dataset.from_list(rows[:1]))[0]
    item = tasks["hellaswag"]["items"][0]
    assert item["prompt"] == reference["query"] and item["options"] == reference["choices"]
    assert item["answer"] == reference["gold"] == 0
    assert item["prompt"] == "Home and Garden. How to water plants: Water early.  Fill a can. Then"  # sic: lm-eval's
    assert tasks["hellaswag"]["chance"] == 0.25


def test_vqav2_subset_is_fixed_by_its_seed(tmp_path):
    hub = make_hub(tmp_path / "hub")
    ids = []
    for out, seed in [("a", 1), ("b", 1), ("c", 2)]:
        task = run_prepare(hub, tmp_path / out, "--tasks=vqav2", "--vqav2_subset=2", f"--subset_seed={seed}")["vqav2"]
        assert task["source"]["subset"] == {"questions": 2, "seed": seed}
        # only the pictures its questions need (one that does not decode leaves an empty row)
        undecodable = task["skipped"].get("image does not decode", 0)
        assert len(pictures(tmp_path / out, task)) == len({i["image"] for i in task["items"]}) + undecodable
        ids.append([i["id"] for i in task["items"]])
    assert ids[0] == ids[1] and len(ids[0]) == 2
    assert ids[0] != ids[2]  # 4 candidate questions: seeds 1 and 2 draw different pairs


def test_complete_tasks_are_skipped_when_run_again(prepared, capsys):
    hub, out, _ = prepared
    before = os.path.getmtime(out / "eval_pope.json")
    prepare.main([f"--local_dir={hub}", f"--out_dir={out}", "--tasks=pope,piqa", "--workers=1"])
    assert os.path.getmtime(out / "eval_pope.json") == before
    assert "eval_pope.json exists, skipped" in capsys.readouterr().out


def test_bad_input_names_the_column_and_file(tmp_path):
    hub = tmp_path / "hub"
    write(hub, "lmms-lab/POPE", "data/test-00000-of-00001.parquet",
          [("question_id", pa.string()), ("question", pa.string()), ("answer", pa.string()), ("image", IMAGE)],
          [{"question_id": "1", "question": "Is there a dog?", "answer": "yes", "image": {"bytes": RED, "path": None}}])
    with pytest.raises(ValueError, match=r"test-00000-of-00001\.parquet: no column 'category'"):
        run_prepare(hub, tmp_path / "out", "--tasks=pope")
    with pytest.raises(FileNotFoundError, match="lmms-lab/GQA"):
        run_prepare(hub, tmp_path / "out", "--tasks=gqa")
    with pytest.raises(ValueError, match="--tasks: unknown task coco"):
        run_prepare(hub, tmp_path / "out", "--tasks=pope,coco")
    with pytest.raises(ValueError, match="--revision"):
        run_prepare(hub, tmp_path / "out", "--tasks=pope", "--revision=gqa")


def test_evaluate_scores_the_benchmark_tasks(prepared, tmp_path):
    _, out, _ = prepared
    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, n_head=2, n_kv_head=2, n_embd=16, ffn_hidden=32, tie_embeddings=True,
                         image_size=SIZE, patch_size=8, block_size=256)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(str(ckpt), {"stage": "finetune", "config": {}, "model_config": asdict(config),
                                "model": VLM(config).state_dict()})
    report = evaluate.main([f"--ckpt={ckpt}", f"--data_dir={out}", "--val_text=", "--max_new_tokens=2",
                            "--device=cpu", "--dtype=float32"])
    assert {t["name"]: t["n"] for t in report["tasks"]} == {
        "arc_challenge": 1, "arc_easy": 2, "gqa": 2, "hellaswag": 1, "piqa": 2, "pope": 3, "textvqa": 1,
        "vizwiz": 1, "vqav2": 3}
    table = (tmp_path / "ckpt.pt.eval.md").read_text()
    for name in prepare.TASKS:
        assert f"| {name} |" in table
    assert report["vision_avg"] is not None and report["text_avg"] is not None


def test_download_asks_for_only_the_tasks_files_at_the_pinned_revision(tmp_path, monkeypatch):
    import shutil
    import huggingface_hub
    hub, calls = make_hub(tmp_path / "hub"), []

    def snapshot_download(repo_id, repo_type, revision, allow_patterns, cache_dir):  # the Hub, offline
        calls.append((repo_id, repo_type, revision, allow_patterns))
        snapshot = tmp_path / "cache" / repo_id / "snapshots" / f"commit-of-{revision}"
        shutil.copytree(hub / repo_id, snapshot, dirs_exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    prepare.main([f"--out_dir={tmp_path / 'out'}", f"--image_size={SIZE}", "--workers=1", "--tasks=gqa,piqa",
                  "--revision=piqa=0123abc"])
    assert calls == [
        ("lmms-lab/GQA", "dataset", prepare.TASKS["gqa"]["revision"],
         ["testdev_balanced_instructions/testdev-*.parquet", "testdev_balanced_images/testdev-*.parquet"]),
        ("baber/piqa", "dataset", "0123abc", ["piqa_validation.parquet"])]
    piqa = json.loads((tmp_path / "out" / "eval_piqa.json").read_text())
    assert piqa["source"]["commit"] == "commit-of-0123abc" and piqa["source"]["files"] == ["piqa_validation.parquet"]
