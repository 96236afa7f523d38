"""
Lets lmms-eval score our vision-language checkpoints: CheckpointLMM is lmms-eval's model
interface (`lmms`: loglikelihood, generate_until) over our VLM. lmms-eval and its many
dependencies are needed only here, never by the core:

    pip install lmms-eval==0.7.3
    from lmms_eval.evaluator import simple_evaluate
    from harness.lmms_eval_model import CheckpointLMM
    results = simple_evaluate(model=CheckpointLMM.load("out/toy_sft/ckpt.pt"), tasks=["pope"])

A request is built exactly as evaluate.py builds a vision prompt: the picture (prepared by
data/images.py's load_image: RGB, bicubic to the model's image_size) as <|image|> placeholders,
then the question in our chat template, then the answer; generation is greedy and ends at
<|end|>. The model takes one picture per prompt. Tested: the adapter's answers and
log-likelihoods equal evaluate.py's on the same items (tests/test_harness.py). Not tested here:
a run through lmms-eval's own evaluator, which needs its full dependencies.
"""

import numpy as np
import torch
from lmms_eval.api.model import lmms

from common import autocast_context
from data.images import load_image
from inference import greedy_answers, load_model, loglikelihoods


class CheckpointLMM(lmms):

    def __init__(self, model, tokenizer, device, autocast, batch_size):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._device, self.autocast, self.batch_size = device, autocast, batch_size

    @classmethod
    def load(cls, ckpt, device="auto", dtype="bfloat16", batch_size=32):
        device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, _, _ = load_model(ckpt, device)
        return cls(model, tokenizer, device, autocast_context(torch.device(device).type, dtype), batch_size)

    def _picture(self, doc_to_visual, doc_id, task, split):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1:
            raise ValueError(f"{task} item {doc_id}: {len(visuals)} pictures; the model reads exactly one per prompt")
        return load_image(visuals[0], self.model.config.image_size)

    def _prompt(self, question):  # evaluate.py's vision prompt
        tok = self.tokenizer
        return [tok.image_id] * self.model.config.tokens_per_image + tok.encode_prompt(question)

    def _chunks(self, requests):
        """Requests batch_size at a time, with their pictures stacked ([k, S, S, 3], row i = request i)."""
        for start in range(0, len(requests), self.batch_size):
            args = [r.args for r in requests[start:start + self.batch_size]]
            yield args, np.stack([self._picture(*a[2:6]) for a in args])

    def loglikelihood(self, requests):
        """(log-likelihood of the answer and its closing <|end|>, whether greedy decoding gives it)."""
        results = []
        for args, pictures in self._chunks(requests):
            batch = []
            for i, (question, target, _, doc_id, task, split) in enumerate(args):
                answer = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                batch.append((self._prompt(question), self.tokenizer.encode(answer) + [self.tokenizer.end_id], i))
            results += loglikelihoods(self.model, batch, pictures, self.tokenizer.eot_id, self._device, self.autocast,
                                      len(batch))
        return results

    def generate_until(self, requests):
        """Greedy answers, ended by <|end|>, max_new_tokens (default 16) or an "until" string."""
        outputs = []
        for args, pictures in self._chunks(requests):
            same_settings = {}  # requests with the same generation settings are decoded together
            for i, a in enumerate(args):
                same_settings.setdefault(repr(a[1]), []).append(i)
            texts = [None] * len(args)
            for indices in same_settings.values():
                kwargs = args[indices[0]][1]
                if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                    raise ValueError(f"generate_until: only greedy decoding is supported, got {kwargs}")
                prompts = [(self._prompt(args[i][0]), i) for i in indices]
                answers = greedy_answers(self.model, prompts, pictures, self.tokenizer.end_id, self._device,
                                         self.autocast, len(prompts), kwargs.get("max_new_tokens", 16))
                for i, ids in zip(indices, answers):
                    texts[i] = self._cut(self.tokenizer.decode(ids), kwargs.get("until", []))
            outputs += texts
        return outputs

    @staticmethod
    def _cut(text, until):
        for stop in [until] if isinstance(until, str) else until:
            text = text.split(stop)[0]
        return text

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("CheckpointLMM answers single questions; multi-round tasks are not supported")
