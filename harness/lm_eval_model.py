"""
Scores a checkpoint with EleutherAI's lm-evaluation-harness (lm-eval), so text-task numbers are
the harness's own: its prompts, few-shot examples, request construction and metrics.

    pip install -r harness/requirements.txt
    python -m harness.lm_eval_model --ckpt=out/toy_sft/ckpt.pt --tasks=arc_easy,hellaswag,piqa
    python -m harness.lm_eval_model --ckpt=... --tasks=my_task --include_path=my_yaml_folder

(from the repository root). CheckpointLM is lm-eval's `LM` interface over our decoder (text
only: no images). lm-eval's TemplateLM turns each (context, continuation) into token ids (the
rule evaluate.encode_pair follows) and calls _loglikelihood_tokens, which is
evaluate.loglikelihoods, so a task scored here and the same items scored by evaluate.py get the
same numbers (tested). Nothing in training imports this file; lm-eval is needed only here and
in the tests. lm-eval downloads its tasks' datasets from the Hugging Face Hub.
"""

import json
import sys

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table

from common import autocast_context
from configurator import apply_overrides
from data.atomic import write_text
from inference import greedy_answers, load_model, loglikelihoods

# -----------------------------------------------------------------------------
ckpt = "out/finetune/ckpt.pt"
tasks = "arc_easy"  # comma-separated lm-eval task names
include_path = ""  # a folder of extra task YAMLs (your own tasks)
num_fewshot = -1  # -1: each task's default
limit = 0  # > 0: only the first items of each task (a quick look; not a comparable score)
batch_size = 32
device = "auto"
dtype = "bfloat16"
# -----------------------------------------------------------------------------


class CheckpointLM(TemplateLM):
    """One of our models as lm-eval's LM: loglikelihood (via TemplateLM), loglikelihood_rolling
    and generate_until (greedy only)."""

    def __init__(self, model, tokenizer, device, autocast, batch_size):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._device, self.autocast, self.batch_size = device, autocast, batch_size

    @property
    def eot_token_id(self):  # also what an empty context is conditioned on
        return self.tokenizer.eot_id

    @property
    def max_length(self):
        return self.model.config.block_size

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tokenizer.encode(string)

    def _scores(self, pairs):
        """[(context ids, continuation ids)] -> [(logprob, is_greedy)]"""
        return loglikelihoods(self.model, [(ctx, cont, None) for ctx, cont in pairs], None, self.eot_token_id,
                              self._device, self.autocast, self.batch_size)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        return self._scores([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Log-likelihood of whole texts (perplexity tasks), in windows of max_length tokens that
        each predict new tokens only, as lm-eval's own models do."""
        totals = []
        for (text,) in (r.args for r in requests):
            windows = get_rolling_token_windows(self.tok_encode(text), self.eot_token_id, self.max_length, 1)
            totals.append(sum(ll for ll, _ in self._scores([make_disjoint_window(w) for w in windows])))
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Greedy continuations, cut at the first of the request's "until" strings."""
        outputs = []
        for context, kwargs in (r.args for r in requests):
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0.0:
                raise ValueError(f"generate_until: only greedy decoding is supported, got {kwargs}")
            max_new = kwargs.get("max_gen_toks", 256)
            ids = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - max_new):]
            new_ids = greedy_answers(self.model, [(ids, None)], None, self.eot_token_id, self._device, self.autocast,
                                     1, max_new)[0]
            text = self.tokenizer.decode(new_ids)
            until = kwargs.get("until", [])
            for stop in [until] if isinstance(until, str) else until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def main(argv):
    settings = dict(ckpt=ckpt, tasks=tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                    batch_size=batch_size, device=device, dtype=dtype)
    apply_overrides(settings, argv)
    s = settings
    dev = s["device"] if s["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _, _ = load_model(s["ckpt"], dev)
    lm = CheckpointLM(model, tokenizer, dev, autocast_context(torch.device(dev).type, s["dtype"]), s["batch_size"])
    results = simple_evaluate(model=lm, tasks=s["tasks"].split(","),
                              num_fewshot=None if s["num_fewshot"] < 0 else s["num_fewshot"],
                              limit=s["limit"] or None,
                              task_manager=TaskManager(include_path=s["include_path"] or None))
    print(make_table(results))
    write_text(f"{s['ckpt']}.lm_eval.json", json.dumps(results["results"], indent=1, default=str))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
