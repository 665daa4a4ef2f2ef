"""Final-answer grader for VinePPO: the reward is 1.0 when the final answer is right, else 0.0.

extract_answer finds the final answer: the last box, a GSM8K "####" line or a final-answer sentence.
is_equiv normalizes two answers (_RULES, one LaTeX habit per rule) and accepts: the same string or number
(0.75 = \\frac{3}{4}); tuples and intervals element-wise, with their brackets; sets, bare lists and
"a \\pm b" in any order; matrices cell by cell (a vmatrix is a determinant, no matrix); relations up to a
positive factor (x > 1 = 1 < x); and values whose difference is zero (x(x+1) = x^2+x, \\sin^2 x+\\cos^2 x = 1).

The grader is the reward an RL policy optimises, so every answer is treated as adversarial input:
- Model text is never evaluated. _Parser reads LaTeX token by token and builds the sympy expression by
  calling sympy's constructors; no name, attribute or call that the text spells out can be reached.
- No wrong answer may score 1: two values are equal only when their difference is proven zero (exactly
  for rational functions and algebraic numbers, else by sympy's simplify). Numbers only refute: the
  difference is evaluated at points drawn from a hash of the pair (no answer can be built to vanish
  there), and a value that is not 0 settles it fast. Only an answer that is itself a decimal with 6+
  places may differ from an exact value, by half its last place (0.0833333333333333 = 1/12, 0.333 !=
  1/3); booleans, 0^0 and \\infty^0 are no numbers; "2,1255" is not a number; two letters are a word ("no"
  is not "on"). Only known units are dropped ("12 \\text{ wrong}" is not 12; a gold's trailing note may be
  left out: 17 = "17\\text{ any text}"), and two units differ (5 cm != 5 m). A "####" line or final-answer
  sentence holds one value ("#### 12 or 13", "#### not 18" are wrong; "#### 9 + 9 = 18" is 18), and its
  minus signs count, Unicode ones too.
- Bounded time and memory: numbers beyond 2^1000 are compared as text; sympy runs in a helper process
  (`python grader.py --serve`) capped at 512 MB and killed after 1.5 s, then replaced by a second one kept
  started and standing by. Every call returns within 2 s, from any thread, and never raises.

Unlike the authors' grader (McGill-NLP/VinePPO), GSM8K answers are compared as numbers, not strings
(2,125 = 2125), and MATH answers get no 1e-3 tolerance and no x100 or /100 percent rescaling (0 != 0.0009,
25 != 0.25).
"""
import atexit, hashlib, json, os, random, re, select, subprocess, sys, threading, time
from fractions import Fraction
from functools import lru_cache


# ---- extraction ----
# A number, whole: "-3", "2,125", "0.5", "3/4", ".5"; never a piece of a malformed one ("2,1255" holds none)
_NUMBER = r"(?<![\d.,])-?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?(?:/\d+)?(?!\d|[.,/]\d)"

def _braced(s, i):  # the {...} group that opens at s[i]: its content, and the index just after it
    if s[i : i + 1] != "{":
        raise ValueError("no group")
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j], j + 1
    raise ValueError("unbalanced braces")  # e.g. a box cut off by the token limit

def _last_boxed(text):  # "... \boxed{\frac{1}{2}}." -> "\frac{1}{2}"; "\boxed 5$" -> "5"; "\boxed 5 or 6" -> "5 or 6"
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    m = re.compile(r"\\(?:boxed|fbox)(?:\s*(\{)|\s+([^$\n]+))?").match(text, start)
    if m[1]:
        return _braced(text, m.start(1))[0]
    return m[2] and re.split(r"\\[])]", m[2])[0]  # to the end of its formula or line; None for "\boxed$"

# words that join, qualify or deny answers: "12 or 13", "not 18", "5 or more", "12 \text{ unless thirteen}"
_HEDGES = (r"\b(?i:or|and|nor|not|no|never|but|than|to|plus|minus|times|either|neither|except|unless|versus|vs|"
           r"less|more|least|most|about|if|maybe|perhaps|possibly|probably|alternatively|otherwise|else|instead|"
           r"rather|wrong|incorrect|false|approximately|roughly|around|nearly|almost|between|over|under)\b")
_DASHES = re.compile("[\u2010-\u2015\u2212\ufe63\uff0d]")  # hyphens, dashes, minus signs: all are "-"
# after "answer is": a $...$, $$...$$, \[...\] or \(...\) formula, else the rest of the sentence
_SAID = re.compile(r"(?:\$\$(.+?)\$\$|\$((?:\\.|[^$\\])+)\$|\\[\[(](.+?)\\[\])])\s*(?:\.(?:\s|$)|\n|$)"
                   r"|([^\n]*?)(?:\.(?:\s|$)|\n|$)", re.S)  # (no "\s*" before a sentence's end: it backtracks)

def _one_value(s):
    """The number in a GSM8K answer line, which must hold exactly one value: "$18.00 a day" -> "18.00", "9 + 9 = 18"
    -> "18" (after an equation's last "="); "12 or 13", "not 18", "18 1/2" come back whole, for is_equiv to refuse."""
    s = s.rsplit("=", 1)[-1].strip()
    m = re.fullmatch(rf"((?:[a-zA-Z']+ +)*)[$*\\]*({_NUMBER})[*%]*((?:,? +[a-zA-Z']+)*)[.*]*", s)  # words number words
    return m[2] if m and not re.search(_HEDGES, m[1] + " " + m[3]) else s or None

def extract_answer(text, task):
    """The final answer in a response (task "gsm8k" or "math"), or None; never raises."""
    try:
        text = _DASHES.sub("-", text)  # "#### \u22125" is -5
        if task == "gsm8k" and "####" in text:  # the GSM8K format: "...\n#### 18"
            return _one_value(text.rsplit("####", 1)[1].strip().split("\n")[0])
        if "\\boxed" in text or "\\fbox" in text:  # the last box; None if the length limit cut it off
            return _last_boxed(text)
        said = [m.end() for m in re.finditer(("" if task == "gsm8k" else "final ") + r"answer is\s*:?\s*", text, re.I)]
        if said:  # "The answer is 18." (gsm8k); "Final Answer: The final answer is $\frac{3}{4}$." (also math)
            m = _SAID.match(text, said[-1])
            value = next(g for g in m.groups() if g is not None).strip()
            return _one_value(value) if task == "gsm8k" else value or None
        if task == "gsm8k":  # else the last number
            numbers = re.findall(_NUMBER, text)
            return numbers[-1] if numbers else None
        return None
    except Exception:  # None, unbalanced braces and any other malformed text: no answer
        return None


# ---- normalization: each rule is (pattern, replacement), applied in this order ----
# units, dropped after a value on either side: only these words, so "12 \text{ wrong}" is not "12"
_UNIT = "(?i:(?:sq\\.?|square|cubic|cu\\.?) )?(?i:" + "|".join(
    "(?:centi|milli|kilo)?(?:meter|metre)s? m cm mm km in inch(?:es)? ft foot feet yards? mi miles? acres? l ml "
    "(?:milli)?lit(?:er|re)s? gal(?:lon)?s? quarts? pints? cups? g gm mg kg (?:kilo)?grams? lbs? pounds? oz ounces? "
    "tons? s secs? seconds? mins? minutes? h hrs? hours? days? weeks? months? years? mph dollars? cents? usd euros? "
    "degrees? radians? percent pct units? ways? points? students? teachers? people digits? integers? values? pieces? "
    "boxes? edges? meals? multiples?".split()) + ")"  # and the counting words of MATH answers
_LHS = r"^ ?(?:[a-zA-Z](?:_\{?\w+\}?)?|\([a-zA-Z, ]+\)) ?=(?!=) ?"  # "x = ", "F_n = ", "(p,q) = "
_RULES = [(re.compile(p), r) for p, r in [
    (_DASHES.pattern, "-"),                                # minus signs: "\u22125" -> "-5"
    (r"(\d)(?:\{,\}|,\\!|\\,)\s*(?=\d{3}(?!\d))", r"\1"),  # LaTeX thousands: "10{,}000", "32,\!349" -> "10000", "32349"
    (r"\\(?:left|right|big|Big|displaystyle)(?![a-zA-Z])|(?<!\\)\\!", ""),  # sizes: "\left(x" -> "(x"
    (r"(?<!\\)\\[,;: ]|\\q?quad(?![a-zA-Z])|~", " "),     # spacing is a space: "1\,2" -> "1 2", not "12"
    (r"\\(?:text|textbf|textit|textnormal|mathrm|mathbf|mbox|operatorname) ?\{([^{}]*)\}", r" \1 "),  # "5\text{cm}"
    (r"\s+", " "),                                         # spaces: "a \n b" -> "a b"
    (r"\\[dtc]frac", r"\\frac"),                           # fraction styles: "\dfrac{1}{2}" -> "\frac{1}{2}"
    (r"(\d)_\{(\d+)\}", r"\1_\2"),                         # base-n numbers: "2516_{8}" -> "2516_8"
    (r"\^\{?\\circ\}?|\\circ|\\degree|°", ""),            # degrees: "90^\circ" -> "90"
    (r"\\?[%$]", ""),                                      # percent, dollars: "28\%", "\$10" -> "28", "10"
    (r"(?:(?<=[\d})\]])|(?<=\\pi)) U(?: ?(?:per|/) ?U)? ?(?:\^ ?\{?[23]\}?)?\.? ?$".replace("U", _UNIT),
     ""),                                                  # units: "15 cm^{2}", "3 \text{ ways}" -> "15", "3"
    (r"^ ?-?\d{1,3}(?:,\d{3})+(?:\.\d+)?\.? ?$", lambda m: m[0].replace(",", "")),  # thousands: "7,425" -> "7425"
    (r"\s*,?\s*\b(?:and|or)\b\s*", ","),                   # lists, after thousands ("12 or 345" is no 12,345)
    (r"^ ?[a-zA-Z] ?\\in(?![a-zA-Z]) ?", ""),             # membership: "x \in [0,1)" -> "[0,1)"
    (_LHS, ""),                                            # named answer: "x = 3", "(p,q)=(3,2)" -> "3", "(3,2)"
    (r"\\le(?:q|qslant)?(?![a-zA-Z])|≤", "<="),           # relations: "x \leq 5" -> "x <= 5"
    (r"\\ge(?:q|qslant)?(?![a-zA-Z])|≥", ">="),           #   "x \geq 5" -> "x >= 5"
    (r"\\neq?(?![a-zA-Z])|≠", "!="),                      #   "x \ne 5" -> "x != 5"
    (r"\\(frac|sqrt) ?(\w)", r"\\\1{\2}"),                 # bare arguments: "\sqrt3" -> "\sqrt{3}"
    (r"\\frac ?(\{[^{}]*\}) ?(\w)", r"\\frac\1{\2}"),      #   "\frac12", "\frac {40}7" -> "\frac{1}{2}", "\frac{40}{7}"
    (r"(?<=[a-zA-Z]) (?![a-zA-Z])|(?<=\d) (?!\d)|(?<![a-zA-Z\d]) ", ""),  # spaces, but "a b", "1 2": "( 1 )" -> "(1)"
    (r"\.$", ""),                                           # end of sentence: "5." -> "5"
    (r"^([^<>=]+)<(=?)([a-zA-Z])<(=?)([^<>=]+)$",          # double inequality: "-2<=x<7" -> "[-2,7)"
     lambda m: ("[" if m[2] else "(") + m[1] + "," + m[5] + ("]" if m[4] else ")")),
    (r"^(-?)(\d+)(\\frac\{\d+\}\{\d+\}| \d+/\d+)$", r"\1(\2+\3)"),  # mixed numbers: "2 1/2" -> "(2+ 1/2)"
    (r"^\(([A-Za-z])\)$", r"\1"),                          # choice letter: "(C)" -> "C"
]]

@lru_cache(maxsize=1 << 16)
def _normalize(s):
    for pattern, repl in _RULES:
        s = pattern.sub(repl, s)
    return s.strip()


# ---- structure: compound answers are compared item by item (this and below run in the helper) ----
_MATRIX = re.compile(r"[(\[]?\\begin\{([pbB]?matrix|array)\}(\{[^{}]*\})?(.*)\\end\{\1\}[)\]]?")

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
    import sympy
    a, b = re.sub(_LHS, "", a), re.sub(_LHS, "", b)  # list items: "x=1,y=2"
    rel = r"(<=|>=|!=|<|>|=)"  # top level only: the "=" of "\sum_{k=0}" is not a relation
    ra, rb = _split_top(a, rel), _split_top(b, rel)
    if len(ra) != len(rb) or len(ra) > 3:
        return a == b
    key = a + "\n" + b  # what the evaluation points are drawn from
    if len(ra) == 1:  # two values
        x, y = _to_sympy(a), _to_sympy(b)
        if x is None or y is None:
            return False
        if places := _rounding(a, b):  # "0.0833333" = 1/12: off by at most half its last place
            d = x - y
            return not d.free_symbols and bool(abs(d.evalf(30)) <= sympy.Rational(1, 2 * 10**places))
        return _is_zero(x - y, key)  # "y^2+2y+1" is not "x^2+2x+1", but "\sin^2 x+\cos^2 x" is 1
    (x, op), (y, op_b) = _zero_side(*ra), _zero_side(*rb)
    if op != op_b or x is None or y is None or not x.free_symbols:  # "2>1" is not "3>1": no relation of constants
        return a == b
    c = _ratio(x, y, key)  # the same relation up to a constant factor, which must be positive for an inequality
    return c is not None and (op in ("=", "!=") or c.is_positive is True)

def _ratio(x, y, key):
    """The constant c != 0 with y = c x, or None: "2x+3y-6" and "4x+6y-12" have c = 2."""
    import sympy
    c = sympy.cancel(y / x)
    if c.free_symbols:  # not a constant as written: its value at a point is the only candidate
        c = c.xreplace(_points(key, sorted(c.free_symbols, key=str), 1)[0])
    if c == 0 or c.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        return None
    return c if _is_zero(y - c * x, key) else None

def _zero_side(lhs, op, rhs):  # "x > 1" -> (x - 1, ">"), "1 < x" -> (x - 1, ">"): never "<"
    if "<" in op:
        return _to_sympy(f"({rhs})-({lhs})"), op.replace("<", ">")
    return _to_sympy(f"({lhs})-({rhs})"), op


# ---- values: LaTeX -> a sympy expression, built by calling sympy's constructors ----
# Model text is never evaluated: the parser below reads tokens and calls only the functions in _FUNCS
# and sympy's arithmetic, so no name, attribute or call that the text spells out can be reached.
_DIGITS = r"\d+(?:\.\d+)?|\.\d+"  # "2", "2.5", ".5"
_LEX = re.compile(_DIGITS + r"|\\[a-zA-Z]+|\\.|\S")  # tokens: "2.5", "\frac", "\{", "x", "^"
_CONSTANTS = {"\\pi": "pi", "\\infty": "oo", "e": "E", "i": "I"}
_FUNCS = {"\\ln": "log", "\\arcsin": "asin", "\\arccos": "acos", "\\arctan": "atan",
          **{f"\\{f}": f for f in "sin cos tan sec csc cot log exp".split()}}
_TIMES, _OVER, _BRACKETS = ("*", "\\cdot", "\\times"), ("/", "\\div"), {"(": ")", "[": "]", "{": "}"}
_MAX_BITS = 1000  # no number in an answer is larger than 2^1000 (~10^301): beyond it, compare the text
# not parsed, compared as strings: base-n numbers (204_5), times (4:30), words ("no" is not "on"), and what sympy cannot
# evaluate quickly: towers (9^{9^9}), huge exponents (2^{18374514}) and factorials (99999!)
_NO_PARSE = re.compile(r"\d_|[:|'\"]|(?<![\\a-zA-Z])[a-zA-Z]{2,}|\^\{[^{}]*\^|\^\(?\{?\d{5,}|\d{5,}!|\d{40,}")


class _NotAValue(Exception):
    """The text is not an expression the parser knows, or its numbers are too large: compare it as text."""


class _Parser:
    """Recursive descent over a normalized answer: '2x^2+\\frac{1}{2}' -> 2*x**2 + 1/2.

    Grammar (lowest precedence first): sum = product (('+' | '-') product)*; product = signed
    (('*' | '/' | nothing) signed)*, nothing being implicit multiplication ('2x', 'x(x+1)');
    signed = ('-' | '+')* power; power = postfix ('^' exponent)?; postfix = primary '!'*.
    """

    def __init__(self, text):
        import sympy
        self.sp, self.tokens, self.i = sympy, _LEX.findall(text), 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected=None):
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _NotAValue(f"expected {expected or 'more'}, got {token}")
        self.i += 1
        return token

    def parse(self):
        value = self.sum()
        if self.peek() is not None:
            raise _NotAValue(f"unexpected {self.peek()}")
        return value

    def sum(self):
        value = self.product()
        while self.peek() in ("+", "-"):
            value = value + self.product() if self.take() == "+" else value - self.product()
        return value

    def starts_primary(self, token):  # of an implicit product: "2x", "x(x+1)"; never a number: "1 2" is not 2
        return token is not None and (token.isalpha() or token in _BRACKETS
                                      or token in _CONSTANTS or token in _FUNCS
                                      or token in ("\\frac", "\\binom", "\\sqrt", "\\sum"))

    def product(self):
        value = self.signed()
        while True:
            if self.peek() in _TIMES:
                self.take()
                value = value * self.signed()
            elif self.peek() in _OVER:
                self.take()
                value = value / self.signed()
            elif self.starts_primary(self.peek()):  # implicit multiplication: "2x", "x(x+1)", "2\pi"
                value = value * self.power()
            else:
                return value

    def signed(self):
        if self.peek() in ("-", "+"):
            return -self.signed() if self.take() == "-" else self.signed()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() != "^":
            return base
        self.take()
        return self.pow(base, self.exponent())

    def exponent(self):  # "x^{n+1}", "x^2", "x^-1", "2^3^2" = 2^(3^2)
        if self.peek() == "{":
            return self.group()
        if self.peek() in ("-", "+"):
            return -self.exponent() if self.take() == "-" else self.exponent()
        return self.power()

    def postfix(self):
        value = self.primary()
        while self.peek() == "!":
            self.take()
            value = self.factorial(value)
        return value

    def group(self):  # "{...}", "(...)" or "[...]": its content
        close = _BRACKETS.get(self.take())
        if close is None:
            raise _NotAValue("expected a bracket")
        value = self.sum()
        self.take(close)
        return value

    def braced_text(self):  # the raw tokens of a subscript: "_{n-1}" -> "n-1", "_2" -> "2"
        if self.peek() != "{":
            return self.take()
        start, depth = self.i, 0
        while True:
            token = self.take()
            depth += (token == "{") - (token == "}")
            if depth == 0:
                return "".join(self.tokens[start + 1:self.i - 1])

    def primary(self):
        sp, token = self.sp, self.peek()
        if token is None:
            raise _NotAValue("expected a value")
        if token in _BRACKETS:
            return self.group()
        self.take()
        if re.fullmatch(_DIGITS, token):  # "0.25" is exactly 1/4
            whole, _, places = token.partition(".")
            return sp.Rational(int(whole or "0") * 10 ** len(places) + int(places or "0"), 10 ** len(places))
        if token in _CONSTANTS:
            return getattr(sp, _CONSTANTS[token])
        if token.isalpha() and len(token) == 1:  # a variable; a subscript is part of its name: "F_{n-1}"
            if self.peek() == "_":
                self.take()
                return sp.Symbol(f"{token}_{self.braced_text()}")
            return sp.Symbol(token)
        if token in ("\\frac", "\\binom"):
            a, b = self.group(), self.group()
            return a / b if token == "\\frac" else self.binomial(a, b)
        if token == "\\sqrt":  # "\sqrt{2}", "\sqrt[3]{x}"; the cube root of -8 is -2
            root = self.group() if self.peek() == "[" else sp.Integer(2)
            a = self.group()
            odd = root.is_Integer and root % 2 == 1 and a.is_number and a.is_negative
            return -self.pow(-a, 1 / root) if odd else self.pow(a, 1 / root)
        if token == "\\sum":  # "\sum_{k=0}^{n-1} body": the body runs to the end of the group
            self.take("_")
            self.take("{")
            k = self.take()
            if not (k.isalpha() and len(k) == 1):
                raise _NotAValue("a sum needs a variable")
            k = sp.Symbol(k)
            self.take("=")
            low = self.sum()
            self.take("}")
            self.take("^")
            high = self.exponent()
            return sp.Sum(self.sum(), (k, low, high))
        if token in _FUNCS:
            return self.function(getattr(sp, _FUNCS[token]))
        raise _NotAValue(f"unknown {token}")

    def function(self, f):  # "\sin x", "\sin(2x)", "\sin^2 x" = (sin x)^2, "\log_2 8" = log(8, 2)
        power = base = None
        if self.peek() == "_" and f is self.sp.log:
            self.take()
            base = self.group() if self.peek() in _BRACKETS else self.primary()
        if self.peek() == "^":
            self.take()
            power = self.exponent()
        if self.peek() in _BRACKETS:
            arg = self.group()
        else:  # "\sin 2x": the argument is the implicit product that follows
            arg = self.power()
            while self.starts_primary(self.peek()) and self.peek() not in _FUNCS:
                arg = arg * self.power()
        value = f(arg) if base is None else f(arg, base)
        return value if power is None else self.pow(value, power)

    # Guards: integers grow fast under powers and factorials; refuse what is larger than any answer.
    def pow(self, base, exponent):
        sp = self.sp
        if exponent.is_zero and (base.is_zero or base.is_infinite):  # sympy says 0^0 = oo^0 = 1: no value
            raise _NotAValue("indeterminate")
        if base.is_number and exponent.is_Integer and abs(exponent) > 1:
            bits = max((max(abs(r.p), r.q).bit_length() for r in base.atoms(sp.Rational)), default=1)
            if abs(exponent) * max(bits, 2) > 2 * _MAX_BITS:
                raise _NotAValue("too large")
        return base ** exponent

    def factorial(self, n):  # (the size of the result is checked once the answer is parsed)
        if n.is_Integer and n > 1000:
            raise _NotAValue("too large")
        return self.sp.factorial(n)

    def binomial(self, n, k):
        if n.is_Integer and k.is_Integer and min(k, n - k) * n.p.bit_length() > _MAX_BITS:
            raise _NotAValue("too large")
        return self.sp.binomial(n, k)


def _to_sympy(s):
    """A normalized LaTeX value as a sympy expression; None for text, huge numbers or unknown LaTeX."""
    import sympy
    if len(s) > 300 or _NO_PARSE.search(s):
        return None
    try:
        value = _Parser(s).parse()
    except Exception:  # _NotAValue, or sympy refusing what it was given (a recursion too deep, say)
        return None
    if not isinstance(value, sympy.Expr) or value.has(sympy.zoo, sympy.nan):  # "1/0" is no value
        return None
    if any(max(abs(r.p), r.q).bit_length() > _MAX_BITS for r in value.atoms(sympy.Rational)):
        return None
    return value


# ---- equality: exact where sympy can decide it, else at points an answer cannot be built around ----
_DECIMAL = re.compile(r"-?\d*\.(\d{6,})")  # a rounded decimal: 0.0833333

def _rounding(a, b):
    """The places of a rounded decimal, which may differ from an exact value by half its last place;
    0 for none. Only an answer that is itself such a decimal (6+ places) counts: '0.0833333' = 1/12 but
    '0.333' != 1/3, and a decimal inside a larger answer widens nothing ('5+10^{-7}+0.000000' != 5)."""
    return max((len(m[1]) for m in (_DECIMAL.fullmatch(a), _DECIMAL.fullmatch(b)) if m), default=0)

def _points(key, symbols, n=4):
    """n points to evaluate at, drawn from a hash of the two answers: no answer can be built to vanish at
    them (it would have to know them before it is written). Rationals in (0.1, 10) with a prime
    denominator over a million, so that sin(k pi x) is not 0 there for any k an answer can write (99!, say)."""
    import sympy
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    points = []
    for _ in range(n):
        q = [sympy.nextprime(rng.randrange(10**6, 2 * 10**6)) for _ in symbols]
        points.append({s: sympy.Rational(rng.randrange(d // 10 + 1, 10 * d), d) for s, d in zip(symbols, q)})
    return points

def _is_zero(d, key):
    """Is the expression d identically zero? Only a proof says yes: d is 0 as sympy builds it; a rational
    function with rational coefficients cancels to 0 (a polynomial identity); an algebraic number has the
    minimal polynomial x; or sympy simplifies d to 0. Numbers only say no, and say it first (fast): d is
    evaluated at _points(key) to 15 significant digits, and a value that is not 0 proves d is not zero."""
    import sympy
    from sympy.core.evalf import PrecisionExhausted
    if d == 0:
        return True
    if d.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        return False
    symbols = sorted(d.free_symbols, key=str)
    parts = list(sympy.preorder_traversal(d))
    if all(isinstance(p, (sympy.Add, sympy.Mul, sympy.Symbol, sympy.Rational)) or p.is_Pow and p.exp.is_Integer
           for p in parts):  # + - * / of variables and rationals, no sqrt(2), pi, sin(x)
        return sympy.cancel(d) == 0  # decided exactly: "x^2+10^{-30}x" is not "x^2"
    for point in _points(key, symbols) if symbols else [{}]:
        v = d.xreplace(point)
        if v.has(sympy.zoo, sympy.nan):
            continue  # undefined at this point (a pole)
        try:
            if v.evalf(15, strict=True, maxn=200) != 0:
                return False  # not zero here: another answer
        except PrecisionExhausted:  # too close to 0 to tell here: a proof must decide
            pass
    if not symbols and all(p.is_Rational or p.is_Add or p.is_Mul or p is sympy.I or p.is_Pow and p.exp.is_Rational
                           for p in parts):  # an algebraic number: sqrt(3+2sqrt(2)) - 1 - sqrt(2)
        return sympy.minimal_polynomial(d, sympy.Dummy("x")).is_Symbol
    return sympy.simplify(d) == 0


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

_MEMORY_LIMIT = 512 * 2**20  # bytes of address space a helper may take (it needs about 70 MB)

def _serve():  # python grader.py --serve: reads [a, b] JSON lines, answers 1 or 0 for _equiv(a, b)
    try:  # a runaway answer then fails at once (MemoryError: answered 0) instead of growing until its kill
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, _MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):  # no such limit here (Windows): the time limit still holds
        pass
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
# the unit an answer ends with: "5\text{ cm}^2" -> "cm", "90^\circ" -> "degree"; two answers naming two units differ
_UNIT_AT_END = re.compile(r"(?<=[ {~,;:])(" + _UNIT + r")(?: ?\})?(?: ?\^ ?\{?[23]\}?)?(?: ?\.)? ?$|\\circ|°|\\degree")

def _unit(s):  # (plurals are one unit: "inches" -> "inch", "degrees", "deg" -> "degree")
    u = (m := _UNIT_AT_END.search(" ".join(s.split()))) and (m[1] or "degree").lower()
    u = u and ("degree" if u[:3] == "deg" else "radian" if u[:3] == "rad" else u)
    return u and re.sub(r"(ch|sh|x)es$|([^s])s$", r"\1\2", u)
# a gold's trailing words (a note, not a value: "5\text{ ways}", "17\text{ any text}"); a prediction's must be units
_NOTE = re.compile(r"(?<=[\d})\]])\s*\\(?:text|textnormal|mbox|mathrm) ?\{([^{}\d]*)\}\s*\.?\s*$")

def is_equiv(pred, gold):
    """Do two already-extracted answers denote the same mathematical answer? Never raises."""
    try:
        if len(pred) > 1000 or len(gold) > 1000:  # no final answer is that long
            return pred.strip() == gold.strip()
        deadline = time.monotonic() + _TIME_LIMIT
        if (u := _unit(pred)) and (v := _unit(gold)) and u != v:
            return False  # "5\text{ cm}" is not "5\text{ m}", "90 \text{ radians}" not "90^\circ"
        a, b = _normalize(pred), _normalize(gold)
        if (note := _NOTE.search(gold)) and not re.search(_HEDGES, note[1]):  # the gold's note may be left out:
            a, b = a.removesuffix(_normalize(note[1])), _normalize(gold[:note.start()])  # "17" = "17\text{ any text}"
        if not a or not b:
            return False
        if a == b:  # fast path 1: the same string
            return True
        if _PLAIN.fullmatch(a) and _PLAIN.fullmatch(b) and len(a + b) < 200:  # fast path 2: plain numbers, exactly
            diff = abs(Fraction(a) - Fraction(b))
            return diff == 0 or (places := _rounding(a, b)) > 0 and diff <= Fraction(1, 2 * 10**places)
        if (a, b) not in _cache:
            if len(_cache) > 20_000:  # at most ~40 MB of answer pairs
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

def _bench(path):  # python grader.py --bench [grader_cases.jsonl]
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; give a .jsonl of grading cases (pred, gold, kind, extracted)")
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
        print(f"{label:>13}: median {times[len(times) // 2] * 1e3:.3f} ms, p99 {times[int(len(times) * 0.99)] * 1e3:.3f} "
              f"ms, slowest {times[-1] * 1e3:.1f} ms over {len(times)} cases")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        _serve()
    elif sys.argv[1:2] == ["--bench"] and len(sys.argv) <= 3:
        _bench(sys.argv[2] if len(sys.argv) == 3 else
               os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "grader_cases.jsonl"))
    else:
        print("usage: python grader.py --bench [grader_cases.jsonl]")
