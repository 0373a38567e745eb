"""Does the synthetic task generator deliver what it promises?

1. Length: for every task variant and target length, the context's token count under the
   embedded SmolLM2 tokenizer, as relative error to the target (max and mean |error|), and
   the generation time per sample.
2. Extractability: the embedded SmolLM2-135M-Instruct answers each variant at short context
   lengths with a plain extractive prompt and greedy decoding; EM, F1 and contains-answer with 95% bootstrap
   CIs. A sanity check that the tasks are neither trivial nor impossible for the edge model,
   not the quality harness's numbers (that harness owns prompting and the grid).

    nice python3 bench/tasks_check.py [--n-length 20] [--n-answer 30] [--answer-tokens 300 1000]
                                      [--json bench/results/tasks_check.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ray_scout import provenance
from ray_scout.core.evaluation import metrics, tasks
from ray_scout.core.llm.models import load_model

VARIANTS = [("single_needle", {}), ("multi_needle", {}), ("multi_hop", {"hops": 2}),
            ("multi_hop", {"hops": 3})]
PROMPT = ("Context: {context}\nQuestion: {question}\n"
          "Reply with only the answer, a word or number copied from the context.")


def _label(task: str, options: dict) -> str:
    return task + "".join(f",{k}={v}" for k, v in options.items())


def length_check(tokenizer, n: int, lengths: list[int]) -> list[dict]:
    rows = []
    for task, options in VARIANTS:
        for target in lengths:
            start = time.perf_counter()
            samples = tasks.generate(task, n, context_tokens=target, seed=0,
                                     count_tokens=tokenizer, **options)
            elapsed_s = time.perf_counter() - start
            errors = [len(tokenizer(s.context, add_special_tokens=False)["input_ids"]) / target - 1
                      for s in samples]
            rows.append(dict(variant=_label(task, options), target_tokens=target, n=n,
                             max_abs_error=max(map(abs, errors)),
                             mean_abs_error=sum(map(abs, errors)) / n,
                             generate_s_per_sample=elapsed_s / n))
            print(rows[-1], flush=True)
    return rows


def answer(model, sample: tasks.Sample) -> str:
    tokenizer = model.tokenizer
    messages = [{"role": "user",
                 "content": PROMPT.format(context=sample.context, question=sample.question)}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.model.generate(**encoded, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:],
                            skip_special_tokens=True).strip()


def answer_check(model, n: int, lengths: list[int]) -> list[dict]:
    rows = []
    for task, options in VARIANTS:
        for target in lengths:
            samples = tasks.generate(task, n, context_tokens=target, seed=1,
                                     count_tokens=model.tokenizer, **options)
            predictions = [answer(model, sample) for sample in samples]
            em = [metrics.exact_match(p, s.answers) for p, s in zip(predictions, samples)]
            f1 = [metrics.f1(p, s.answers) for p, s in zip(predictions, samples)]
            found = [metrics.contains_answer(p, s.answers) for p, s in zip(predictions, samples)]
            em_ci, f1_ci = metrics.bootstrap_ci(em), metrics.bootstrap_ci(f1)
            found_ci = metrics.bootstrap_ci(found)
            rows.append(dict(variant=_label(task, options), target_tokens=target, n=n,
                             em=em_ci.mean, em_low=em_ci.low, em_high=em_ci.high,
                             f1=f1_ci.mean, f1_low=f1_ci.low, f1_high=f1_ci.high,
                             contains=found_ci.mean, contains_low=found_ci.low,
                             contains_high=found_ci.high,
                             examples=[[p, s.answers[0]] for p, s in
                                       zip(predictions[:3], samples[:3])]))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-length", type=int, default=20)
    parser.add_argument("--length-tokens", type=int, nargs="+", default=[300, 1000, 4000])
    parser.add_argument("--n-answer", type=int, default=30)
    parser.add_argument("--answer-tokens", type=int, nargs="*", default=[300, 1000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("embedded")
    result = dict(**provenance.record(), torch=torch.__version__,
                  lengths=length_check(model.tokenizer, args.n_length, args.length_tokens),
                  answers=answer_check(model, args.n_answer, args.answer_tokens))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
