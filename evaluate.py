"""
Evaluates a checkpoint on one suite of vision-language and text-only tasks, in one table.

    python evaluate.py --ckpt=out/toy_sft/ckpt.pt
    python evaluate.py --ckpt=out/toy_sft/ckpt.pt --tasks=color_qa,arith_mc

A task is a file data_dir/eval_<name>.json (the toy world writes seven; see its prepare.py):
{"name", "modality": "vision" | "text" | "knowledge", "kind", "chance", "items": [{"image",
"prompt", "options", "answer"}]}; a knowledge task asks about a picture too, with an answer that
needs a fact learnt from text ("where is the shape with the color of the sun?"). A vision or
knowledge task's "image" is a row of the uint8 [N, H, W, 3] array in data_dir/<its "images"
field> (default eval_images.npy; data/benchmarks/prepare.py writes one file per benchmark).
Three kinds are scored, each the way the harness that publishes it scores it (tests compare
with lm-eval's and lmms-eval's own code):
  - multiple_choice (lm-eval): "options" without the task's "delimiter" (lm-eval's
    target_delimiter; default " ", or "" after a chat prompt); prompt and delimiter + option
    are encoded together and split as lm-eval does; "acc" picks the highest log-likelihood,
    "acc_norm" the highest per character of the option;
  - open: greedy generation; the task's "metric" is "vqa" (VQAv2, the default: the official VQA
    answer normalisation and soft accuracy), "vqa_evalai" (TextVQA, VizWiz: the same after
    EvalAI's tokenising step) or "exact_match" (GQA: case and punctuation ignored), as lmms-eval
    has them, or "final_answer" (exact_match on what follows the answer's last full stop);
  - yes_no (POPE): log-likelihood of "yes" against "no"; lmms-eval's accuracy, precision,
    recall, F1 and yes_ratio (the share of "yes" in the ground truth), per item "category" too.
Vision and knowledge prompts use the chat template after the image (the model is evaluated after
instruction tuning, as in the study); text prompts are plain language-model completions.
Each task's "stable score" is accuracy minus chance, in points; the table ends with averages of
those scores: over the vision tasks, the text tasks, the knowledge tasks, the vision and knowledge
tasks together, and "overall" over the vision and text tasks (the knowledge tasks left out, so
overall means what it meant before they existed), and the text validation loss in bits per byte.
Beside chance, each task reports its majority-answer baseline (the answer most often right in its
own items, always given), and items with an "answer_type" get a breakdown by it.
Results go next to the checkpoint: <ckpt>.eval.json and <ckpt>.eval.md, and every item's
prediction and score in <ckpt>.eval.<task>.jsonl, one JSON object a line (its index and "id",
the prediction or chosen option, the answer, the score, its "answer_type" or "category").
Every task is read and checked against the model (its kind, metric, options, answers, pictures
and vocabulary) before any is scored: a bad one stops the run with one line naming the file.
"""

import json
import math
import os
import re
import statistics
import string
import sys
from collections import Counter

import numpy as np
import torch

from common import autocast_context, check_positive, resolve_device
from data.atomic import write_text
from configurator import apply_overrides
from data.errors import MissingFileError, UserError, report_user_errors
from data.loader import MixedLoader
from data.shards import find_shards
from inference import Progress, greedy_answers, load_model, loglikelihoods

# -----------------------------------------------------------------------------
ckpt = "out/finetune/ckpt.pt"
data_dir = "data/toyworld"
tasks = ""  # comma-separated task names; "" = every eval_*.json in data_dir
max_items = 0  # > 0: only the first items of each task (a quick look)
batch_size = 64  # sequences scored at once
max_new_tokens = 12  # for open-ended answers (the toy's longest, "a fire truck is red. bottom right", takes 9)
val_text = "val_text*.bin"  # for bits per byte; "" skips it
bpb_batches = 8
device = "auto"
dtype = "bfloat16"
# -----------------------------------------------------------------------------

# ------------------------------------------------------------------ scoring (pure functions)
# Open answers: the official VQA evaluator's answer processing (vqaEval.py of the VQA challenge,
# which EvalAI runs and lmms-eval carries as EvalAIAnswerProcessor), rule for rule and quirks
# included, so that our soft accuracy is the published metric. Tests compare it with lmms-eval's.
VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!"]
VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit (the lookbehind is a
#                                                 typo in the original, kept: it never matches)
VQA_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")
VQA_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
VQA_NUMBER_WORDS["none"] = "0"
VQA_ARTICLES = {"a", "an", "the"}
# The official contraction table maps each of these forms with one apostrophe left out (any one,
# for forms with several) back to the form itself, e.g. "dont" -> "don't", "couldnt've" and
# "couldn'tve" -> "couldn't've". Words are lower case by then, so "I'm" and "I've" never apply.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
    haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've
    might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
    shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
    something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've
    'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd
    who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
    you'd you'd've you'll you're you've""".split()
VQA_CONTRACTIONS = {form[:i] + form[i + 1:]: form for form in _CONTRACTED for i, c in enumerate(form) if c == "'"}
VQA_CONTRACTIONS["somebody'd"] = "somebodyd"  # an entry of the official table that runs backwards


def vqa_normalize(text, evalai_tokenize=False):
    """An answer as the VQA evaluator compares it. evalai_tokenize adds the first step of EvalAI's
    processor (lower case, drop "," and "?", split off "'s"), which lmms-eval applies to TextVQA
    and VizWiz answers but not to VQAv2's."""
    if evalai_tokenize:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Punctuation: deleted where it touches a space (or the answer has a digit,digit), else a space.
    out = text
    for p in VQA_PUNCTUATION:
        if p + " " in text or " " + p in text or VQA_DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official code passes re.UNICODE (32) where sub() takes its count: at most 32 periods go.
    out = VQA_PERIOD.sub("", out, count=re.UNICODE)
    words = [VQA_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_soft_accuracy(prediction, references, evalai_tokenize=False):
    """The VQA accuracy: for each reference left out in turn, min(1, other references equal to the
    prediction / 3), averaged (1, 2, 3 of 10 annotators agreeing give 0.3, 0.6, 0.9). With fewer
    than 3 references (our toy tasks, not a VQA benchmark) it is exact match with any of them."""
    pred = vqa_normalize(prediction, evalai_tokenize)
    refs = [vqa_normalize(r, evalai_tokenize) for r in references]
    if len(refs) < 3:
        return float(pred in refs)
    return float(statistics.mean(min(1, sum(r == pred for j, r in enumerate(refs) if j != i) / 3)
                                 for i in range(len(refs))))


def exact_match(prediction, references):
    """GQA as lmms-eval scores it: equal after lower-casing and deleting ASCII punctuation."""
    strip = str.maketrans("", "", string.punctuation)
    return float(any(prediction.lower().translate(strip) == r.lower().translate(strip) for r in references))


def final_answer(prediction, references):
    """A reasoned answer's conclusion: exact_match on what follows the last full stop, so that
    "it is yellow. yes" is scored on its "yes" (the toy's knowledge_qa)."""
    def conclusion(text):
        return text.rsplit(".", 1)[-1].strip()
    return exact_match(conclusion(prediction), [conclusion(r) for r in references])


# An open task's "metric" field picks its rule (default "vqa").
OPEN_METRICS = {
    "vqa": vqa_soft_accuracy,  # VQAv2
    "vqa_evalai": lambda pred, refs: vqa_soft_accuracy(pred, refs, evalai_tokenize=True),  # TextVQA, VizWiz
    "exact_match": exact_match,  # GQA
    "final_answer": final_answer,
}


def pope_metrics(predictions, answers):
    """POPE's numbers as lmms-eval defines them, from answer strings: accuracy; precision and
    recall of "yes" (a prediction that is neither "yes" nor "no" is wrong for accuracy and left
    out of both); F1; yes_ratio, the share of "yes" in the GROUND TRUTH. said_yes, the share of
    "yes" among the predictions (what POPE's paper calls the yes ratio), is ours: it shows a
    model that answers yes to everything."""
    tp = sum(p == "yes" and a == "yes" for p, a in zip(predictions, answers))
    fp = sum(p == "yes" and a == "no" for p, a in zip(predictions, answers))
    fn = sum(p == "no" and a == "yes" for p, a in zip(predictions, answers))
    precision = tp / (tp + fp) if tp + fp > 0 else 0
    recall = tp / (tp + fn) if tp + fn > 0 else 0
    f1 = 2 * (precision * recall) / (precision + recall) if precision + recall > 0 else 0
    n_yes, n_no = answers.count("yes"), answers.count("no")
    return {"accuracy": sum(float(p == a) for p, a in zip(predictions, answers)) / len(answers),
            "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "yes_ratio": n_yes / (n_yes + n_no) if n_yes + n_no > 0 else 0.0,
            "said_yes": predictions.count("yes") / len(predictions)}


def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as lm-eval builds them for a causal model: trailing
    whitespace of the context moves to the continuation, the two are encoded together and split
    after the context's own tokens (a token may span the boundary); an empty context becomes
    <|endoftext|>, so the first token has something to condition on."""
    if context == "":
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids):]


def pick_option(loglikelihoods, options):
    """lm-eval's multiple-choice picks: (argmax of log-likelihood ("acc"), argmax of log-likelihood
    per character of the option without its delimiter ("acc_norm"))."""
    lls = np.array(loglikelihoods)
    return int(np.argmax(lls)), int(np.argmax(lls / np.array([float(len(o)) for o in options])))


def stable_score(accuracy, chance):
    """The study's summary: accuracy above chance, in points."""
    return 100.0 * (accuracy - chance)


def majority_baseline(task, items):
    """(answer, accuracy) of always giving the answer most often right in these items, the floor a
    model that ignores the picture and the question reaches on this set (above chance where
    answers are unbalanced): for open answers the commonest reference (scored by the task's
    metric), for yes/no the commoner of the two, for multiple choice the option position most
    often right (the commonest answer when every item offers the same options)."""
    kind = task["kind"]
    if kind == "open":
        answer = Counter(r.strip().lower() for item in items for r in set(item["answer"])).most_common(1)[0][0]
        metric = OPEN_METRICS[task.get("metric", "vqa")]
        return answer, float(np.mean([metric(answer, item["answer"]) for item in items]))
    position, n = Counter(item["answer"] for item in items).most_common(1)[0]
    if kind == "multiple_choice" and all(item["options"] == items[0]["options"] for item in items):
        position = items[0]["options"][position]
    elif kind == "multiple_choice":
        position = f"option {position + 1}"
    return position, n / len(items)


def evaluate_task(task, model, tokenizer, image_store, device, autocast, batch_size, max_new):
    """Scores one task; returns a dict of its metrics, with every item's prediction and score
    under "predictions"."""
    items = task["items"]
    vision = task["modality"] in PICTURE_MODALITIES
    P = model.config.tokens_per_image
    image_of = (lambda item: item["image"]) if vision else (lambda item: None)
    kind = task["kind"]
    result = {"name": task["name"], "modality": task["modality"], "kind": kind, "n": len(items),
              "chance": task["chance"]}

    def request(item, answer):
        """(context ids, continuation ids, image) for an answer, scored the way lm-eval scores it. A
        vision prompt ends in the chat template's <|assistant|>, so nothing spans the boundary, and
        the answer is closed by <|end|>, which is part of what is scored."""
        if vision:
            return prompt_ids(item), tokenizer.encode(answer) + [tokenizer.end_id], item["image"]
        return (*encode_pair(tokenizer, item["prompt"], answer), None)

    def prompt_ids(item):  # what an answer is generated from
        if vision:
            return [tokenizer.image_id] * P + tokenizer.encode_prompt(item["prompt"])
        return tokenizer.encode(item["prompt"]) or [tokenizer.eot_id]

    if kind in ("multiple_choice", "yes_no"):
        # multiple_choice: options carry no delimiter; the task's "delimiter" (lm-eval's
        # target_delimiter) goes between prompt and option. yes_no: the answers "yes" and "no".
        delimiter = task.get("delimiter", "" if vision else " ") if kind == "multiple_choice" else ""
        options_of = (lambda item: item["options"]) if kind == "multiple_choice" else (lambda item: ["yes", "no"])
        requests = [request(item, delimiter + option) for item in items for option in options_of(item)]
        lls = [ll for ll, _ in loglikelihoods(model, requests, image_store, tokenizer.eot_id, device, autocast,
                                              batch_size, Progress(task["name"], len(requests)))]
        picks, start = [], 0
        for item in items:
            n = len(options_of(item))
            picks.append(pick_option(lls[start:start + n], options_of(item)))
            start += n
        if kind == "multiple_choice":
            answers = [item["answer"] for item in items]
            scores = [float(raw == a) for (raw, _), a in zip(picks, answers)]
            result["acc_norm"] = float(np.mean([normed == a for (_, normed), a in zip(picks, answers)]))
            predictions = [{"option": raw, "prediction": item["options"][raw], "option_norm": normed,
                            "answer": item["options"][item["answer"]]} for (raw, normed), item in zip(picks, items)]
        else:
            # lmms-eval generates an answer and compares its text with "yes"/"no"; we compare the
            # likelihoods of the two, so every prediction is one of them. The ways differ only where
            # the greedy answer is neither word, or not the likelier of the two.
            said = ["yes" if raw == 0 else "no" for raw, _ in picks]
            truth = [item["answer"] for item in items]
            scores = [float(p == a) for p, a in zip(said, truth)]
            result.update(pope_metrics(said, truth))
            for c in sorted({item["category"] for item in items if "category" in item}):  # POPE's three
                which = [i for i, item in enumerate(items) if item.get("category") == c]
                result.setdefault("categories", {})[c] = {
                    "n": len(which), **pope_metrics([said[i] for i in which], [truth[i] for i in which])}
            predictions = [{"prediction": p, "answer": a} for p, a in zip(said, truth)]
    else:
        metric = task.get("metric", "vqa")
        prompts = [(prompt_ids(item), image_of(item)) for item in items]
        answers = greedy_answers(model, prompts, image_store, tokenizer.end_id, device, autocast, batch_size,
                                 max_new, Progress(task["name"], len(prompts)))
        texts = [tokenizer.decode(a) for a in answers]
        result["metric"] = metric
        scores = [OPEN_METRICS[metric](t, item["answer"]) for t, item in zip(texts, items)]
        result["examples"] = [{"prompt": item["prompt"], "answer": t, "references": item["answer"]}
                              for t, item in list(zip(texts, items))[:5]]
        predictions = [{"prediction": t, "answer": item["answer"]} for t, item in zip(texts, items)]
    result["accuracy"] = float(np.mean(scores))
    result["stable"] = stable_score(result["accuracy"], result["chance"])
    result["majority_answer"], result["majority"] = majority_baseline(task, items)
    types = sorted({item["answer_type"] for item in items if "answer_type" in item})
    for t in types:  # a breakdown when the items say what kind of answer each wants (VQA's answer_type)
        which = [i for i, item in enumerate(items) if item.get("answer_type") == t]
        answer, majority = majority_baseline(task, [items[i] for i in which])
        result.setdefault("answer_types", {})[t] = {
            "n": len(which), "accuracy": float(np.mean([scores[i] for i in which])), "majority_answer": answer,
            "majority": majority}
    result["predictions"] = [
        {"index": i, **({"id": item["id"]} if "id" in item else {}), **prediction, "score": score,
         **{key: item[key] for key in ("answer_type", "category") if key in item}}
        for i, (item, prediction, score) in enumerate(zip(items, predictions, scores))]
    return result


@torch.no_grad()
def bits_per_byte(model, tokenizer, files, seq_len, batches, device, autocast, batch_size):
    """Text validation loss in bits per UTF-8 byte of the predicted text, which, unlike loss
    per token, compares models with different tokenizers. Special-token targets are left out."""
    loader = MixedLoader(text_files=files, tokenizer=tokenizer, batch_size=batch_size, seq_len=seq_len,
                            device=device)
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), device=device)
    special = {tokenizer.eot_id, tokenizer.image_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id}
    nats = n_bytes = 0.0
    for _ in range(batches):
        x, y, _ = loader.next_batch(0.0)
        for s in special:
            y = torch.where(y == s, -1, y)
        with autocast:
            _, token_losses = model(x, y)
        nats += token_losses.float().sum().item()
        n_bytes += token_bytes[y.clamp(min=0)][y != -1].sum().item()
    return nats / math.log(2) / n_bytes


def summarize(results):
    """The averages of the stable scores. overall_avg is over the vision and text tasks only, as
    before knowledge tasks existed, so that it compares with earlier runs; vision_knowledge_avg
    is over every task that shows a picture."""
    def average(rows):
        return float(np.mean([r["stable"] for r in rows])) if rows else None
    vision = [r for r in results if r["modality"] == "vision"]
    text = [r for r in results if r["modality"] == "text"]
    knowledge = [r for r in results if r["modality"] == "knowledge"]
    return {"vision_avg": average(vision), "text_avg": average(text), "knowledge_avg": average(knowledge),
            "vision_knowledge_avg": average(vision + knowledge), "overall_avg": average(vision + text)}


def markdown_table(results, summary, bpb):
    lines = ["| task | modality | kind | n | accuracy | chance | stable score |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        extra = f" (F1 {100 * r['f1']:.1f})" if "f1" in r else (f" (norm {100 * r['acc_norm']:.1f})" if "acc_norm" in r else "")
        lines.append(f"| {r['name']} | {r['modality']} | {r['kind']} | {r['n']} | {100 * r['accuracy']:.1f}{extra} "
                     f"| {100 * r['chance']:.1f} | {r['stable']:+.1f} |")
    for key, label in (("vision_avg", "vision average"), ("text_avg", "text average"),
                       ("knowledge_avg", "knowledge average"), ("vision_knowledge_avg", "vision + knowledge average"),
                       ("overall_avg", "overall (vision + text)")):
        # without knowledge tasks the vision + knowledge average is the vision one: said once
        if summary[key] is not None and not (key == "vision_knowledge_avg" and summary["knowledge_avg"] is None):
            lines.append(f"| **{label}** | | | | | | **{summary[key]:+.1f}** |")
    lines.append("\nMultiple choice: accuracy by log-likelihood (lm-eval's acc), norm = by log-likelihood per "
                 "character of the option (acc_norm). Open answers: VQA soft accuracy (vqa, vqa_evalai) or exact "
                 "match after the VQA/lmms-eval normalisation (final_answer: of what follows the answer's last "
                 "full stop).")
    pope = [r for r in results if r["kind"] == "yes_no"]
    if pope:
        lines += ["\nYes/no (POPE) tasks, as lmms-eval defines the numbers: precision and recall of \"yes\", F1 "
                  "their harmonic mean, yes ratio = share of \"yes\" in the ground truth; said yes = share of "
                  "\"yes\" in the model's answers.\n",
                  "| task | category | n | accuracy | precision | recall | F1 | yes ratio | said yes |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in pope:
            for category, m in [("all", r), *r.get("categories", {}).items()]:
                lines.append(f"| {r['name']} | {category} | {m['n']} | " + " | ".join(
                    f"{100 * m[k]:.1f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "said_yes"))
                    + " |")
    lines += ["\nBaseline: the majority answer, always given (the commonest reference, the commoner of yes and no, "
              "or the option position most often right), scored on the same items.\n",
              "| task | majority answer | majority | chance | model |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['majority_answer']} | {100 * r['majority']:.1f} | {100 * r['chance']:.1f} "
              f"| {100 * r['accuracy']:.1f} |" for r in results]
    typed = [r for r in results if "answer_types" in r]
    if typed:
        lines += ["\nBy answer type (the items' \"answer_type\"; the majority answer within each type):\n",
                  "| task | answer type | n | majority answer | majority | model |", "|---|---|---:|---|---:|---:|"]
        lines += [f"| {r['name']} | {t} | {m['n']} | {m['majority_answer']} | {100 * m['majority']:.1f} "
                  f"| {100 * m['accuracy']:.1f} |" for r in typed for t, m in r["answer_types"].items()]
    if bpb is not None:
        lines.append(f"\nText validation loss: {bpb:.4f} bits per byte.")
    return "\n".join(lines)


KINDS = ("multiple_choice", "open", "yes_no")
MODALITIES = ("vision", "text", "knowledge")
PICTURE_MODALITIES = ("vision", "knowledge")  # asked about a picture, after the chat template


def load_task(path, max_items, tokenizer, model_config, image_stores):
    """A task file, checked against the model before anything is scored: (task, its pictures or
    None). Every problem is a UserError naming the file (and the item), so a bad task costs one
    line at start-up, not a traceback or a NaN after the tasks before it ran."""
    try:
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid JSON task file ({e})") from None
    if not isinstance(task, dict):
        raise UserError(f"{path}: a task is a JSON object with modality, kind, chance and items; got a JSON "
                        f"{type(task).__name__}")
    task.setdefault("name", os.path.basename(path)[len("eval_"):-len(".json")])
    if task.get("modality") not in MODALITIES:
        raise UserError(f"{path}: modality {task.get('modality')!r} (expected 'vision', 'text' or 'knowledge')")
    if task.get("kind") not in KINDS:
        raise UserError(f"{path}: unknown kind {task.get('kind')!r} (expected one of {', '.join(KINDS)})")
    if task["kind"] == "open" and task.get("metric", "vqa") not in OPEN_METRICS:
        raise UserError(f"{path}: unknown metric {task['metric']!r} (expected one of {', '.join(OPEN_METRICS)})")
    chance = task.get("chance")
    if not isinstance(chance, (int, float)) or not 0 <= chance < 1:
        raise UserError(f"{path}: chance {chance!r} (expected a number in [0, 1))")
    items = task.get("items")
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: no items to score")
    task["items"] = items = items[:max_items] if max_items > 0 else items
    vision = task["modality"] in PICTURE_MODALITIES
    image_store = None
    if vision:  # memory-mapped: only the pictures a batch uses are read
        image_path = os.path.join(os.path.dirname(path), task.get("images", "eval_images.npy"))
        if image_path not in image_stores:
            image_stores[image_path] = load_pictures(image_path, model_config.image_size)
        image_store = image_stores[image_path]
    delimiter = task.get("delimiter", "" if vision else " ") if task["kind"] == "multiple_choice" else ""
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise UserError(f"{where}: an item is an object with a text \"prompt\"")
        if vision and not (isinstance(item.get("image"), int) and 0 <= item["image"] < len(image_store)):
            raise UserError(f"{where}: image {item.get('image')!r} is not a row of its {len(image_store)} pictures")
        answer, options = item.get("answer"), item.get("options")
        if task["kind"] == "multiple_choice":
            if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
                raise UserError(f"{where}: options {options!r} (expected a list of non-empty texts)")
            if not (isinstance(answer, int) and 0 <= answer < len(options)):
                raise UserError(f"{where}: answer {answer!r} is not the index of one of its {len(options)} options")
        elif task["kind"] == "yes_no" and answer not in ("yes", "no"):
            raise UserError(f"{where}: answer {answer!r} (expected 'yes' or 'no')")
        elif task["kind"] == "open" and not (isinstance(answer, list) and answer
                                             and all(isinstance(a, str) for a in answer)):
            raise UserError(f"{where}: answer {answer!r} (expected a list of reference answers)")
        continuations = {"multiple_choice": options, "yes_no": ["yes", "no"], "open": []}[task["kind"]]
        try:  # every text the scoring encodes, so that a word outside the vocabulary stops us here
            tokenizer.encode(item["prompt"])
            for option in continuations:
                tokenizer.encode(delimiter + option if vision else item["prompt"] + delimiter + option)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
    return task, image_store


def load_pictures(path, image_size):
    """A task's pictures, memory-mapped, checked to be uint8 [N, image_size, image_size, 3]."""
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such picture file")
    try:
        pictures = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a .npy array of pictures ({e})") from None
    if pictures.dtype != np.uint8 or pictures.ndim != 4 or pictures.shape[3] != 3:
        raise UserError(f"{path}: holds {pictures.dtype} {list(pictures.shape)}, expected uint8 [N, H, W, 3] RGB "
                        "pictures (prepare them with data/images.py's load_image)")
    if pictures.shape[1:3] != (image_size, image_size):
        raise UserError(f"{path}: pictures are {pictures.shape[1]}x{pictures.shape[2]}, the model expects "
                        f"{image_size}x{image_size} (prepare the task with --image_size={image_size})")
    return pictures


def main(argv):
    settings = dict(ckpt=ckpt, data_dir=data_dir, tasks=tasks, max_items=max_items, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, val_text=val_text, bpb_batches=bpb_batches, device=device,
                    dtype=dtype)
    apply_overrides(settings, argv)
    check_positive(settings, ["batch_size", "max_new_tokens", "bpb_batches"])
    if settings["max_items"] < 0:
        raise UserError(f"max_items must be 0 (every item) or positive, got {settings['max_items']}")
    s = settings
    dev = resolve_device(s["device"])
    autocast = autocast_context(torch.device(dev).type, s["dtype"])
    model, tokenizer, _, _ = load_model(s["ckpt"], dev)
    if not os.path.isdir(s["data_dir"]):
        raise MissingFileError(f"data_dir {s['data_dir']}: no such folder")
    names = s["tasks"].split(",") if s["tasks"] else sorted(
        f[len("eval_"):-len(".json")] for f in os.listdir(s["data_dir"]) if f.startswith("eval_") and f.endswith(".json"))
    if not names:
        raise MissingFileError(f"no eval_*.json tasks in {s['data_dir']}")
    paths = [os.path.join(s["data_dir"], f"eval_{name}.json") for name in names]
    for name, path in zip(names, paths):
        if not os.path.exists(path):
            raise MissingFileError(f"task {name!r}: {path} does not exist")
    image_stores = {}  # picture file -> its memory map, opened once and shared by the tasks naming it
    loaded = [load_task(path, s["max_items"], tokenizer, model.config, image_stores) for path in paths]
    val_files = find_shards(s["data_dir"], s["val_text"], hint='val_text="" skips the text validation loss') \
        if s["val_text"] else None
    results = [evaluate_task(task, model, tokenizer, image_store, dev, autocast, s["batch_size"], s["max_new_tokens"])
               for task, image_store in loaded]
    for r in results:  # every item's prediction, one JSON object a line, for analysis beyond the table
        r["predictions_file"] = f"{s['ckpt']}.eval.{r['name']}.jsonl"
        write_text(r["predictions_file"], "".join(json.dumps(p) + "\n" for p in r.pop("predictions")))
    summary = summarize(results)
    bpb = None
    if val_files:
        bpb = bits_per_byte(model, tokenizer, val_files, model.config.block_size, s["bpb_batches"], dev, autocast, 8)
    table = markdown_table(results, summary, bpb)
    print(table)
    report = {"ckpt": s["ckpt"], "tasks": results, **summary, "val_text_bpb": bpb}
    write_text(f"{s['ckpt']}.eval.json", json.dumps(report, indent=1))
    write_text(f"{s['ckpt']}.eval.md", table + "\n")
    return report


if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    main(sys.argv[1:])
