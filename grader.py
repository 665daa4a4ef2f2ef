"""Final-answer grader for VinePPO: the reward is 1.0 when the final answer is right, else 0.0.

extract_answer finds the final answer. is_equiv normalizes two answers (_RULES, one LaTeX habit per rule)
and accepts: the same string or number (0.75 = \\frac{3}{4}); tuples and intervals element-wise, with their
brackets; sets, bare lists and "a \\pm b" in any order; matrices cell by cell; relations up to a positive
factor (x > 1 = 1 < x); anything else sympy finds equal, at random points if it has variables.

Unlike the authors' grader (McGill-NLP/VinePPO), GSM8K answers are compared as numbers, not strings
(2,125 = 2125), and MATH answers get no 1e-3 tolerance and no x100 or /100 percent rescaling (0 != 0.0009,
25 != 0.25). Only a decimal with 6+ places may differ from an exact value, by less than its last place
(0.0833333333333333 = 1/12, but 0.333 != 1/3).

sympy can hang (9^{9^{9}}), so it runs in a helper process (`python grader.py --serve`) that is replaced
when it overruns, by a second one kept started and standing by: every call returns within 2 s, from any
thread, and never raises; an overrun is wrong, and the call after it finds a helper ready.
"""
import atexit, json, os, random, re, select, subprocess, sys, threading, time
from fractions import Fraction
from functools import lru_cache


# ---- extraction ----
_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+"  # "-3", "2,125", "0.5", "3/4", ".5"

def _braced(s, i):  # the {...} group that opens at s[i]: its content, and the index just after it
    if s[i : i + 1] != "{":
        raise ValueError("no group")
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j], j + 1
    raise ValueError("unbalanced braces")  # e.g. a box cut off by the token limit

def _last_boxed(text):  # "... \boxed{\frac{1}{2}}." -> "\frac{1}{2}"; "\boxed 5$" -> "5"
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    m = re.compile(r"\\(?:boxed|fbox)(?:\s*(\{)|\s+([^\s$]+))?").match(text, start)
    if m[1]:
        return _braced(text, m.start(1))[0]
    return m[2]  # None for an empty box: "\boxed$"

def extract_answer(text, task):
    """The final answer in a response (task "gsm8k" or "math"), or None; never raises."""
    try:
        if task == "gsm8k" and "####" in text:  # the GSM8K format: "...\n#### 18"
            tail = text.rsplit("####", 1)[1].strip().split("\n")[0]
            numbers = re.findall(_NUMBER, tail)
            return numbers[0] if numbers else tail or None
        if "\\boxed" in text or "\\fbox" in text:  # the last box; None if the length limit cut it off
            return _last_boxed(text)
        if task == "gsm8k":  # the number after "the answer is", else the last number
            numbers = re.findall(rf"answer is\s*:?\s*\$?\s*({_NUMBER})", text, re.I) or re.findall(_NUMBER, text)
            return numbers[-1] if numbers else None
        said = re.findall(r"final answer is\s*\$([^$]+)\$", text, re.I)  # "The final answer is $\frac{3}{4}$."
        return said[-1] if said else None
    except Exception:  # None, unbalanced braces and any other malformed text: no answer
        return None


# ---- normalization: each rule is (pattern, replacement), applied in this order ----
_LHS = r"^ ?(?:[a-zA-Z](?:_\{?\w+\}?)?|\([a-zA-Z, ]+\)) ?=(?!=) ?"  # "x = ", "F_n = ", "(p,q) = "
_RULES = [(re.compile(p), r) for p, r in [
    (r"\s+", " "),                                         # spaces: "a \n b" -> "a b"
    (r"(\d)(?:\{,\}|,\\!|\\,) ?(?=\d{3}(?!\d))", r"\1"),  # LaTeX thousands: "10{,}000", "32,\!349" -> "10000"
    (r"\\(?:left|right|big|Big|displaystyle)(?![a-zA-Z])|(?<!\\)\\[!,;: ]", ""),  # sizes, spacing: "\left(x\," -> "(x"
    (r"\\[dtc]frac", r"\\frac"),                           # fraction styles: "\dfrac{1}{2}" -> "\frac{1}{2}"
    (r"\\(?:text|textbf|textit|textnormal|mathrm|mathbf|mbox|operatorname)\{([^{}]*)\}", r"\1"),  # "\text{cm}" -> "cm"
    (r"\^\{?\\circ\}?|\\circ|\\degree|°", ""),            # degrees: "90^\circ" -> "90"
    (r"\\?[%$]", ""),                                      # percent, dollars: "28\%", "\$10" -> "28", "10"
    (r"\s*,?\s*\band\b\s*", ","),                          # "and" lists: "6 and 8", "1, 2, and 3" -> "6,8", "1, 2,3"
    (r"(?<=[\d})\]])\s+[a-zA-Z][a-zA-Z. ]+(?:\^\d)?$", ""),  # units: "15 cm^2", "4:30 p.m." -> "15", "4:30"
    (r"^ ?-?\d{1,3}(?:,\d{3})+(?:\.\d+)? ?$", lambda m: m[0].replace(",", "")),  # thousands: "7,425,000" -> "7425000"
    (r"^ ?[a-zA-Z] ?\\in ", ""),                           # membership: "x \in [0,1)" -> "[0,1)"
    (_LHS, ""),                                            # named answer: "x = 3", "(p,q)=(3,2)" -> "3", "(3,2)"
    (r"\\le(?:q|qslant)?(?![a-zA-Z])|≤", "<="),           # relations: "x \leq 5" -> "x <= 5"
    (r"\\ge(?:q|qslant)?(?![a-zA-Z])|≥", ">="),           #   "x \geq 5" -> "x >= 5"
    (r"\\neq?(?![a-zA-Z])|≠", "!="),                      #   "x \ne 5" -> "x != 5"
    (r"\\(frac|sqrt) ?(\w)", r"\\\1{\2}"),                 # bare arguments: "\sqrt3" -> "\sqrt{3}"
    (r"\\frac(\{[^{}]*\}) ?(\w)", r"\\frac\1{\2}"),        #   "\frac12" -> "\frac{1}2" -> "\frac{1}{2}"
    (r"(?<![a-zA-Z]) | (?![a-zA-Z])", ""),                 # spaces, except between letters: "( 1, 2 )" -> "(1,2)"
    (r"\.$", ""),                                           # end of sentence: "5." -> "5"
    (r"^([^<>=]+)<(=?)([a-zA-Z])<(=?)([^<>=]+)$",          # double inequality: "-2<=x<7" -> "[-2,7)"
     lambda m: ("[" if m[2] else "(") + m[1] + "," + m[5] + ("]" if m[4] else ")")),
    (r"^(-?)(\d+)\\frac(\{\d+\}\{\d+\})$", r"\1(\2+\\frac\3)"),  # mixed number: "2\frac{1}{2}" -> "(2+\frac{1}{2})"
    (r"^\(([A-Za-z])\)$", r"\1"),                          # choice letter: "(C)" -> "C"
]]

@lru_cache(maxsize=1 << 16)
def _normalize(s):
    for pattern, repl in _RULES:
        s = pattern.sub(repl, s)
    return s.strip()


# ---- structure: compound answers are compared item by item (this and below run in the helper) ----
_MATRIX = re.compile(r"[(\[]?\\begin\{([pbvB]?matrix|array)\}(\{[^{}]*\})?(.*)\\end\{\1\}[)\]]?")

def _split_top(s, sep):
    """s split at the regex sep outside brackets, with sep's groups kept: "(1,2),3" -> ["(1,2)", "3"]."""
    sep = re.compile(sep)
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if depth == 0 and i >= start and (m := sep.match(s, i)):
            parts += [s[start:i], *m.groups()]
            start = m.end()
        depth += (c in "([{") - (c in ")]}")
    return parts + [s[start:]]

def _closes_at_end(s):  # "(1,2)", "[0,1)": yes; "(a+5)(b+2)": no
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return 0 < i == len(s) - 1
    return False

def _structure(s):  # (kind, items) of a compound answer; (None, [s]) for a single value
    if m := _MATRIX.fullmatch(s):  # a matrix is a tuple of row tuples, whatever its brackets
        return "matrix", ["(" + row.replace("&", ",") + ")" for row in m[3].split("\\\\") if row]
    unions = _split_top(s, r"\\cup")
    if len(unions) > 1:
        return "set", unions  # a union of intervals, in any order
    braces = s.startswith("\\{") and s.endswith("\\}")  # "\{1,2\}" is a set, even of one item
    if not braces and _closes_at_end(s):
        items = _split_top(s[1:-1], ",")
        if s[0] == "{":  # "{1,3}" is a set; "{x}" is just grouping
            return ("set", items) if len(items) > 1 else _structure(s[1:-1])
        if len(items) > 1:
            return s[0] + s[-1], items  # tuple or interval: "[0,9)" is not "(0,9)"
    items = []
    for x in _split_top(s[2:-2] if braces else s, ","):  # "1\pm\sqrt{2}" -> "1+\sqrt{2}", "1-\sqrt{2}"
        items += [x.replace("\\pm", "+", 1), x.replace("\\pm", "-", 1)] if "\\pm" in x else [x]
    return ("set", items) if braces or len(items) > 1 else (None, [s])

def _equiv(a, b):  # is_equiv for two normalized answers, with sympy: the helper process runs this
    if a == b:
        return True
    (kind, xs), (kind_b, ys) = _structure(a), _structure(b)
    if kind != kind_b or len(xs) != len(ys) or len(xs) > 50:
        return False
    if kind is None:
        return _scalar_equiv(a, b)
    if kind != "set":  # tuples, intervals, matrices: item by item
        return all(_equiv(x, y) for x, y in zip(xs, ys))
    for x in xs:  # a set: each item matches a different item, in any order
        match = next((y for y in ys if _equiv(x, y)), None)
        if match is None:
            return False
        ys.remove(match)
    return True

def _scalar_equiv(a, b):
    a, b = re.sub(_LHS, "", a), re.sub(_LHS, "", b)  # list items: "x=1,y=2"
    rel = r"(<=|>=|!=|<|>|=)"  # top level only: the "=" of "\sum_{k=0}" is not a relation
    ra, rb = _split_top(a, rel), _split_top(b, rel)
    if len(ra) != len(rb) or len(ra) > 3:
        return a == b
    if len(ra) == 1:  # two values
        x, y = _to_sympy(a), _to_sympy(b)
        return x is not None and y is not None and _same_values(x, y, _tolerance(a, b))
    (x, op), (y, op_b) = _zero_side(*ra), _zero_side(*rb)
    if op != op_b or x is None or y is None or x.free_symbols != y.free_symbols:
        return False
    ratios = [u / v for u, v in zip(_values(x), _values(y))]  # the same relation up to a constant factor,
    positive = op in ("=", "!=") or bool(ratios[0] > 0)  # which must be positive for an inequality
    return ratios[0] != 0 and positive and all(abs(r - ratios[0]) < 1e-20 for r in ratios)

def _zero_side(lhs, op, rhs):  # "x > 1" -> (x - 1, ">"), "1 < x" -> (x - 1, ">"): never "<"
    if "<" in op:
        return _to_sympy(f"({rhs})-({lhs})"), op.replace("<", ">")
    return _to_sympy(f"({lhs})-({rhs})"), op


# ---- values: LaTeX -> sympy for the common constructs, then numbers ----
_CMDS = {"\\pi": "pi", "\\infty": "oo", "\\cdot": "*", "\\times": "*", "\\div": "/", "\\ln": "log", "\\arcsin": "asin",
         "\\arccos": "acos", "\\arctan": "atan", **{f"\\{f}": f for f in "sin cos tan sec csc cot log exp".split()}}
_TOKEN = re.compile(r"\\[a-zA-Z]+|\\?.")  # a command or one character: "\frac", "\{", "x"
_SUM = re.compile(r"_\{(\w)=([^{}]+)\}\^(\{[^{}]+\}|\w)(.+)")  # "_{k=0}^{n-1} body"
# not parsed, compared as strings: base-n numbers (204_5), times (4:30), words, and what sympy cannot
# evaluate quickly: towers (9^{9^9}), huge exponents (2^{18374514}) and factorials (99999!)
_NO_PARSE = re.compile(r"\d_|[:|'\"]|(?<![\\a-zA-Z])[a-zA-Z]{3,}|\^\{[^{}]*\^|\^\(?\{?\d{5,}|\d{5,}!|\d{40,}")

def _latex_to_py(s):
    """'\\frac{x+1}{2}\\pi' -> '((x+1)/(2)) pi '; raises ValueError on LaTeX it does not know."""
    out, i = [], 0
    while i < len(s):
        tok = _TOKEN.match(s, i)[0]
        i += len(tok)
        if tok in ("\\frac", "\\binom"):
            a, i = _braced(s, i)
            b, i = _braced(s, i)
            a, b = _latex_to_py(a), _latex_to_py(b)
            out.append(f"(({a})/({b}))" if tok == "\\frac" else f"binomial({a},{b})")
        elif tok == "\\sqrt":
            root = "2"
            if s.startswith("[", i):  # "\sqrt[3]{x}"
                end = s.index("]", i)
                root, i = s[i + 1 : end], end + 1
            a, i = _braced(s, i)
            out.append(f"(({_latex_to_py(a)})**(1/({_latex_to_py(root)})))")
        elif tok == "\\sum":  # "\sum_{k=0}^{n-1} body" -> "Sum(body,(k,0,n-1))": the body runs to the end
            if not (m := _SUM.match(s, i)):
                raise ValueError("unknown \\sum")
            lo, hi, body = _latex_to_py(m[2]), _latex_to_py(m[3].strip("{}")), _latex_to_py(m[4])
            return "".join(out) + f"Sum({body},({m[1]},{lo},{hi}))"
        elif tok == "{":
            a, i = _braced(s, i - 1)
            out.append(f"({_latex_to_py(a)})")
        elif tok == "_":  # a subscript is part of the name: "F_{n-1}" -> "F_nm1"
            a, i = _braced(s, i) if s.startswith("{", i) else (s[i : i + 1], i + 1)
            out.append("_" + re.sub(r"\W", "", a.replace("-", "m").replace("+", "p")) + " ")
        elif tok in _CMDS:
            out.append(f" {_CMDS[tok]} ")
        elif tok.startswith("\\") or tok == "}":
            raise ValueError(f"unknown LaTeX {tok}")
        else:
            out.append({"^": "**", "[": "(", "]": ")"}.get(tok, tok))
    return "".join(out)

@lru_cache(maxsize=None)
def _sympy_names():  # the only names that parsed text can reach: no builtins
    import sympy
    names = ("Symbol Integer Float Rational Function factorial binomial Sum "
             "asin acos atan sin cos tan sec csc cot log exp pi oo").split()
    return {**{n: getattr(sympy, n) for n in names}, "e": sympy.E, "i": sympy.I, "__builtins__": {}}

def _to_sympy(s):
    """A normalized LaTeX value as a sympy expression; None for text, huge numbers or unknown LaTeX."""
    from sympy.parsing import sympy_parser as sp
    if len(s) > 300 or _NO_PARSE.search(s):
        return None
    try:
        py = _latex_to_py(s)
        py = re.sub(r"(\d*)\.(\d+)", lambda m: f"({int(m[1] + m[2])}/10**{len(m[2])})", py)  # 0.1 = 1/10 exactly
        if not re.fullmatch(r"[\w\s+\-*/().,!]*", py) or "__" in py:  # only arithmetic reaches parse_expr's eval
            return None
        rules = sp.standard_transformations + (sp.implicit_multiplication_application, sp.convert_xor)  # "2x", "x^2"
        return sp.parse_expr(py, local_dict={}, global_dict=_sympy_names(), transformations=rules)
    except Exception:
        return None

def _tolerance(a, b):  # only a decimal with 6+ places may be a rounded exact value, off by less than its last place
    places = max((len(d) for d in re.findall(r"\.(\d+)", a + " " + b)), default=0)
    return Fraction(1, 10**places) if places >= 6 else 0

def _values(e, n=3):  # e at n fixed random points, to 40 digits; a constant is evaluated once
    rational, rng = _sympy_names()["Rational"], random.Random(0)
    syms = sorted(e.free_symbols, key=str)
    points = [{s: rational(rng.randint(10, 99), rng.randint(10, 99)) for s in syms} for _ in range(n if syms else 1)]
    return [e.evalf(40, subs=p) for p in points]

def _same_values(x, y, tol):
    if x == y:
        return True
    if x.free_symbols != y.free_symbols:  # "y^2+2y+1" is not "x^2+2x+1"
        return False
    diffs = [(abs(u - v), max(abs(u), abs(v))) for u, v in zip(_values(x), _values(y))]
    return all(d.is_finite and bool(d <= 1e-25 * scale or d < tol) for d, scale in diffs)  # -oo is not oo


# ---- the helper process: sympy under a hard time limit that works from any thread ----
_TIME_LIMIT = 1.5  # seconds for one is_equiv call, the helper's start-up included
_lock, _helper, _spare = threading.Lock(), None, None  # the helper in use, and a started one standing by

def _start_helper():  # a new `python grader.py --serve` process; it prints "ready" once sympy is imported
    helper = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    helper.ready = False
    helper.readable = select.poll()  # poll, unlike select, takes any fd number
    helper.readable.register(helper.stdout, select.POLLIN)
    return helper

def _next_helper():  # the standby takes over (its sympy was imported long ago) and a new one stands by:
    global _helper, _spare  # so a call right after an overrun gets an answer, not a start-up's uncached False
    _helper, _spare = (_spare if _spare is not None and _spare.poll() is None else _start_helper()), _start_helper()

def start():
    """Start the helper processes now (vineppo calls this before loading models), so the first calls find them ready."""
    with _lock:
        if _helper is None:
            _next_helper()

def _read_line(helper, deadline):  # the helper's next line; None at the deadline, "" if it died
    if not helper.readable.poll(max(0.0, deadline - time.monotonic()) * 1000):
        return None
    return helper.stdout.readline().decode().strip()  # it writes one whole line per request

def _ask_helper(a, b, deadline):
    """_equiv(a, b) computed by the helper process; None when it had no time to start (not cached)."""
    global _helper
    if not _lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        return None  # another thread holds the helper on a slow case
    try:
        if _helper is None or _helper.poll() is not None:
            _next_helper()
        if not _helper.ready:
            _helper.ready = _read_line(_helper, deadline) == "ready"
        if not _helper.ready:
            return None  # still importing sympy
        _helper.stdin.write(json.dumps([a, b]).encode() + b"\n")
        _helper.stdin.flush()
        answer = _read_line(_helper, deadline)
        if answer is None:  # it overran: the standby takes over now
            _stop(_helper)
            _next_helper()
        return answer == "1"
    except OSError:  # it died between calls
        _helper = None
        return None
    finally:
        _lock.release()

def _forget_helper():  # in a forked child: its own helpers, and a lock that no vanished thread holds
    global _lock, _helper, _spare
    _lock, _helper, _spare = threading.Lock(), None, None

def _stop(helper):
    helper.kill()
    helper.wait()
    helper.stdin.close()
    helper.stdout.close()

def _kill_helper():  # at exit, so that no helper is left running a hanging comparison
    for helper in (_helper, _spare):
        if helper is not None:
            _stop(helper)

os.register_at_fork(after_in_child=_forget_helper)
atexit.register(_kill_helper)

def _serve():  # python grader.py --serve: reads [a, b] JSON lines, answers 1 or 0 for _equiv(a, b)
    _equiv("x+1>=2", "1<=x")  # import and warm up sympy before saying we are ready
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            ok = bool(_equiv(*json.loads(line)))
        except Exception:
            ok = False
        print(int(ok), flush=True)


# ---- the API ----
_cache = {}  # (normalized pred, normalized gold) -> bool: vine sampling grades the same answers again and again
_PLAIN = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:/\d+)?")  # "-3", "18.0", ".5", "3/4"

def is_equiv(pred, gold):
    """Do two already-extracted answers denote the same mathematical answer? Never raises."""
    try:
        if len(pred) > 1000 or len(gold) > 1000:  # no final answer is that long
            return pred.strip() == gold.strip()
        deadline = time.monotonic() + _TIME_LIMIT
        a, b = _normalize(pred), _normalize(gold)
        if not a or not b:
            return False
        if a == b:  # fast path 1: the same string
            return True
        if _PLAIN.fullmatch(a) and _PLAIN.fullmatch(b) and len(a + b) < 200:  # fast path 2: plain numbers, exactly
            diff = abs(Fraction(a) - Fraction(b))
            return diff == 0 or diff < _tolerance(a, b)
        if (a, b) not in _cache:
            if len(_cache) > 100_000:
                _cache.clear()
            answer = _ask_helper(a, b, deadline)
            if answer is None:  # the helper was busy or still starting: no answer to remember
                return False
            _cache[a, b] = answer
        return _cache[a, b]
    except Exception:  # None, and anything unexpected: not equivalent
        return False

def grade(response, gold, task):
    """1.0 if the final answer in response is equivalent to gold, else 0.0 (also when none is found)."""
    pred = extract_answer(response, task)
    return 1.0 if pred is not None and is_equiv(pred, gold) else 0.0

def _bench(path):  # python grader.py --bench ../shared/data/grader_cases.jsonl
    is_equiv("x", "y")  # start the helper outside the timing
    first, again = [], []
    for case in map(json.loads, open(path)):
        _cache.clear()
        _normalize.cache_clear()
        for times in (first, again):  # with empty caches, then the same call again
            start = time.perf_counter()
            if case["extracted"]:
                is_equiv(case["pred"], case["gold"])
            else:
                grade(case["pred"], case["gold"], case["kind"])
            times.append(time.perf_counter() - start)
    for label, times in (("first call", first), ("repeated call", again)):
        times.sort()
        print(f"{label:>13}: median {times[len(times) // 2] * 1e3:.3f} ms, "
              f"p99 {times[int(len(times) * 0.99)] * 1e3:.3f} ms over {len(times)} cases")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        _serve()
    elif len(sys.argv) == 3 and sys.argv[1] == "--bench":
        _bench(sys.argv[2])
    else:
        print("usage: python grader.py --bench grader_cases.jsonl")
