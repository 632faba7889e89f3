"""A jinja2 sandbox with bounds: a chat template cannot hang, recurse or eat the machine.

jinja2's immutable sandbox stops a template from reaching Python's internals,
but not from spending: `{{ 'x' * 10**9 }}` is even evaluated while the
template compiles (constant folding), `range` loops nest, macros recurse,
`'x'.center(10**9)` allocates a gigabyte in one call. A chat template comes
from a downloaded file, so rendering here is bounded:

- time: every operation the sandbox sees (a call, an attribute or item, an
  operator, a loop step, a piece of output) checks a deadline; a thread
  cannot be killed, so this is how a render is stopped;
- work: the characters (and list items) the render makes, counted as each
  operator, call, filter and output makes them, and checked before the ones
  that can make many at once (repetition, padding widths, `replace`, `join`,
  printing a container whose parts are shared);
- loop iterations, `range` sizes, nesting of macro / recursive-loop calls,
  the size of integers;
- nothing is evaluated at compile time: all arithmetic operators are
  intercepted and every filter takes the context, so jinja2 folds neither.

Each bound is generous next to what a real template needs and grows with the
input (a 20 MB message may be printed a few times), and each breach is one
sentence (a `TemplateLimit`).
"""

from __future__ import annotations

import contextlib
import operator
import re
import threading
import time
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from types import BuiltinMethodType, MethodType
from typing import Any

from jinja2 import nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace, _PassArg, generate_lorem_ipsum, pass_context
from jinja2.visitor import NodeTransformer

from .errors import LfmEdgeError

MAX_SECONDS = 2.0  # wall time of one render
MAX_WORK = 64 << 20  # characters and list items a render may make, plus WORK_PER_INPUT per input character
WORK_PER_INPUT = 32
MAX_OUTPUT = 16 << 20  # characters of the rendered prompt, plus OUTPUT_PER_INPUT per input character
OUTPUT_PER_INPUT = 2
MAX_ITEMS = 1 << 20  # items of one list the template builds, plus 4 per input item
MAX_ITERATIONS = 1 << 20  # loop steps in one render, plus 16 per input item
MAX_COMPARED = 1 << 16  # items of a structure compared or hashed, plus 2 per input item
MAX_RANGE = 100_000  # jinja2's own sandbox limit, kept
MAX_DEPTH = 64  # nested macro, caller() and recursive-loop calls
MAX_INT_BITS = 1 << 16  # about 20,000 digits
MAX_SLOW_TEXT = 1 << 20  # characters given to filters that work in Python per character (wordwrap, urlize, pprint)
MAX_INDENT = 1000  # of tojson's indent and separators
MAX_ROUND_DIGITS = 1000  # of the round filter's precision (a float has at most ~330 digits that matter)


class TemplateError(LfmEdgeError):
    pass


class TemplateLimit(TemplateError):
    """A render went past one of the bounds."""


class Budget:
    """What one render may still spend; kept per thread by the environment."""

    def __init__(self, input_chars: int = 0, input_items: int = 0, seconds: float = MAX_SECONDS):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.work_limit = MAX_WORK + WORK_PER_INPUT * input_chars
        self.work = self.work_limit
        self.output_limit = MAX_OUTPUT + OUTPUT_PER_INPUT * input_chars
        self.item_limit = MAX_ITEMS + 4 * input_items
        self.iteration_limit = MAX_ITERATIONS + 16 * input_items
        self.compare_limit = MAX_COMPARED + 2 * input_items
        self.iterations = 0
        self.depth = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"the chat template ran for more than {self.seconds:g} s and was stopped")

    def need(self, n: int) -> None:
        """About to make about n characters (or items)."""
        self.tick()
        if n > self.work:
            raise TemplateLimit(
                f"the chat template tried to make more than the {self.work_limit:,} characters "
                "a render may make and was stopped"
            )

    def spend(self, value: Any) -> Any:
        """Count what an operation made; `value` is returned."""
        if isinstance(value, (str, bytes, list, tuple, dict)):
            self.work -= len(value)
            if self.work < 0:
                self.need(0)
            if isinstance(value, (list, tuple)) and len(value) > self.item_limit:
                self.too_many_items()
        return value

    def too_many_items(self) -> None:
        raise TemplateLimit(f"the chat template made a list of more than {self.item_limit:,} items and was stopped")

    def step(self) -> None:
        self.iterations += 1
        if self.iterations > self.iteration_limit:
            raise TemplateLimit(f"the chat template ran more than {self.iteration_limit:,} loop steps and was stopped")
        if not self.iterations & 63:
            self.tick()

    def items(self, values: Iterable[Any]) -> list[Any]:
        """`values` as a list, built under the bounds (it may be a lazy generator of anything)."""
        if isinstance(values, (list, tuple)):
            return list(values)
        out = []
        for v in values:
            out.append(v)
            if len(out) > self.item_limit:
                self.too_many_items()
            if not len(out) & 1023:
                self.need(len(out))
        self.spend(out)
        return out

    def int_result(self, bits: int) -> None:
        if bits > MAX_INT_BITS:
            raise TemplateLimit(f"the chat template made a number of more than {MAX_INT_BITS:,} bits and was stopped")


class _TooBig(Exception):
    pass


def text_size(value: Any, cap: int) -> int:
    """About len(str(value)) (escapes aside), or cap + 1 once it is known to pass cap.

    Each container is walked once: a list holding the same list twice counts
    it twice without walking it twice, so `[a, a]` nested 40 deep is measured
    in 40 steps, not 2**40.
    """
    memo: dict[int, int] = {}

    def size(v: Any, depth: int) -> int:
        t = type(v)
        if t is str or t is bytes:
            return len(v) + 2
        if t is int:
            return v.bit_length() // 3 + 2
        if v is None or t is bool or t is float:
            return 24
        key = id(v)
        if key in memo:
            return memo[key]
        if depth > 1000:
            raise _TooBig
        memo[key] = 16  # a container that holds itself prints as [...]
        if isinstance(v, Namespace):
            v = _namespace_attrs(v)
        if isinstance(v, (str, bytes)):
            n = len(v) + 2
        elif isinstance(v, (Mapping, ItemsView)):
            pairs = v.items() if isinstance(v, Mapping) else v
            n = 2
            for k, x in pairs:
                n += size(k, depth + 1) + size(x, depth + 1) + 4
                if n > cap:
                    raise _TooBig
        elif isinstance(v, (list, tuple, set, frozenset, KeysView, ValuesView)):
            n = 2
            for x in v:
                n += size(x, depth + 1) + 2
                if n > cap:
                    raise _TooBig
        else:  # generators, macros, undefined values, ...: a short repr
            n = 64
        memo[key] = n
        return n

    try:
        n = size(value, 0)
    except _TooBig:
        return cap + 1
    return n if n <= cap else cap + 1


def tree_size(value: Any, cap: int) -> int:
    """Items in `value` counted as Python compares or hashes them (a shared part once per
    appearance), or cap + 1 once it is known to pass cap; walked without a memo, so at most
    cap + 1 steps."""
    n, stack = 0, [value]
    while stack:
        v = stack.pop()
        n += 1
        if n > cap:
            return cap + 1
        if isinstance(v, Namespace):
            v = _namespace_attrs(v)
        if isinstance(v, Mapping):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
    return n


def _namespace_attrs(ns: Namespace) -> dict:
    return object.__getattribute__(ns, "_Namespace__attrs")


def input_size(value: Any) -> tuple[int, int]:
    """(characters, items) of the data a render is given, for the bounds that grow with it."""
    chars = items = 0
    stack = [value]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        items += 1
        if isinstance(v, (str, bytes)):
            chars += len(v)
        elif isinstance(v, (Mapping, list, tuple)) and id(v) not in seen:
            seen.add(id(v))
            stack.extend(v.keys() if isinstance(v, Mapping) else ())
            stack.extend(v.values() if isinstance(v, Mapping) else v)
    return chars, items


# -- arguments that ask for a lot at once ------------------------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _text_len(budget: Budget, value: Any) -> int:
    return len(value) if isinstance(value, str) else text_size(value, budget.work)


def _check_percent(budget: Budget, fmt: str | bytes, values: Any) -> None:
    """`fmt % values`: widths and precisions, and the values printed, must fit the budget."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    star = False
    for m in _PERCENT_SPEC.finditer(text):
        for g in m.groups():
            if g == "*":
                star = True
            elif g is not None and len(g) > 12 or g is not None and int(g) > budget.work:
                budget.need(budget.work + 1)
    args = values if isinstance(values, tuple) else (values,)
    if star and any(type(a) is int and a > budget.work for a in args):
        budget.need(budget.work + 1)
    budget.need(len(text) + text_size(values, budget.work))


class BoundedFormatter(SandboxedFormatter):
    """str.format in the sandbox, with each field's width and precision counted before it is padded."""

    def __init__(self, env: BoundedEnvironment):
        super().__init__(env)
        self._bounded = env

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = self._bounded.budget()
        if budget is not None:
            for g in _DIGITS.findall(format_spec):
                if len(g) > 12 or int(g) > budget.work:
                    budget.need(budget.work + 1)
            budget.need(_text_len(budget, value))
        out = super().format_field(value, format_spec)
        return budget.spend(out) if budget is not None else out


def _check_method(budget: Budget, method: Any, args: tuple, kwargs: dict) -> tuple:
    """Calls of str / bytes / int / list methods that can make much more than they are given."""
    owner = method.__self__
    name = method.__name__
    for a in (*args, *kwargs.values()):
        if type(a) is int and a > budget.work:  # a width, a length, a count
            budget.need(a)
    if not isinstance(owner, (str, bytes)):
        return args
    if name in ("split", "rsplit", "splitlines"):
        sep = _arg(args, kwargs, 0, "sep") if name != "splitlines" else None
        most = _arg(args, kwargs, 1, "maxsplit", -1) if name != "splitlines" else -1
        pieces = owner.count(sep) + 1 if isinstance(sep, type(owner)) and sep else (len(owner) + 1) // 2
        if isinstance(most, int) and most >= 0:
            pieces = min(pieces, most + 1)
        if pieces > budget.item_limit:
            budget.too_many_items()
    if name == "join" and args:
        parts = budget.items(args[0])
        budget.need(sum(len(p) if isinstance(p, (str, bytes)) else 0 for p in parts) + len(owner) * len(parts))
        return (parts, *args[1:])
    if name == "replace" and len(args) >= 2 and isinstance(args[0], type(owner)) and isinstance(args[1], type(owner)):
        old, new = args[0], args[1]
        count = owner.count(old) if old else len(owner) + 1
        limit = _arg(args, kwargs, 2, "count", -1)
        if isinstance(limit, int) and limit >= 0:
            count = min(count, limit)
        budget.need(len(owner) + count * max(0, len(new) - len(old)))
    elif name == "expandtabs":
        tab = _arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(tab, int):
            budget.need(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * max(tab, 0))
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        budget.need(len(owner) * max(longest, 1))
    return args


# -- filters -----------------------------------------------------------------------------

# filters that compare or hash the items of their value
_COMPARING = {"sort", "unique", "min", "max", "groupby", "dictsort"}
# filters that work per character or word in Python, or build a list of its words
_SLOW = {"wordwrap", "urlize", "pprint", "wordcount", "striptags", "title"}
# filters that print their value, with how many characters one character of it can become
_PRINTING = {
    "string": 1, "safe": 1, "trim": 1, "truncate": 1, "reverse": 1, "wordcount": 1, "striptags": 1,
    "upper": 3, "lower": 3, "title": 3, "capitalize": 3,
    "e": 6, "escape": 6, "forceescape": 6, "xmlattr": 6, "urlencode": 12, "urlize": 8, "pprint": 2,
}


def _check_filter(budget: Budget, name: str, value: Any, args: tuple, kwargs: dict) -> None:
    if name in _PRINTING or name in ("center", "indent", "replace", "wordwrap", "format"):
        size = _text_len(budget, value)
        budget.need(size * _PRINTING.get(name, 1))
        if name in _SLOW and size > MAX_SLOW_TEXT:
            raise TemplateLimit(
                f"the chat template gave {name} {size:,} characters, more than the {MAX_SLOW_TEXT:,} it may"
            )
    if name == "center":
        width = _arg(args, kwargs, 0, "width", 80)
        if isinstance(width, int):
            budget.need(size + max(width, 0))
    elif name == "indent":
        width = _arg(args, kwargs, 0, "width", 4)
        step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        lines = value.count("\n") + 1 if isinstance(value, str) else size
        budget.need(size + lines * max(step, 0))
    elif name == "replace":
        old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
        if isinstance(old, str) and isinstance(new, str):
            count = (value.count(old) if old else len(value) + 1) if isinstance(value, str) else size + 1
            limit = _arg(args, kwargs, 2, "count")
            if isinstance(limit, int) and limit >= 0:
                count = min(count, limit)
            budget.need(size + count * max(0, len(new) - len(old)))
    elif name == "wordwrap":
        wrap = _arg(args, kwargs, 2, "wrapstring") or "\n"
        budget.need(size * (1 + len(wrap) if isinstance(wrap, str) else 2))
    elif name == "format":
        _check_percent(budget, value if isinstance(value, str) else str(value), kwargs or args)
    elif name == "join":
        sep = _arg(args, kwargs, 0, "d", "")
        count = len(value) if hasattr(value, "__len__") else 0
        budget.need(_text_len(budget, value) + (len(sep) * count if isinstance(sep, str) else 0))
    elif name == "list" and hasattr(value, "__len__") and len(value) > budget.item_limit:
        budget.too_many_items()
    elif name in _COMPARING and (len(value) if isinstance(value, (str, bytes)) else tree_size(
            value, budget.compare_limit)) > budget.compare_limit:  # (a string's items are its characters)
        _too_big_to_compare(budget)
    elif name == "round":
        digits = _arg(args, kwargs, 0, "precision", 0)
        if type(digits) is int and abs(digits) > MAX_ROUND_DIGITS:  # round(n, -10**9) computes 10**(10**9)
            raise TemplateLimit(
                f"the chat template asked round for {digits:,} digits, more than the {MAX_ROUND_DIGITS:,} it may"
            )
    elif name in ("batch", "slice"):
        n = _arg(args, kwargs, 0, "linecount" if name == "batch" else "slices", 0)
        if isinstance(n, int) and n > budget.item_limit:
            budget.too_many_items()


def _too_big_to_compare(budget: Budget) -> None:
    raise TemplateLimit(
        f"the chat template compared or hashed a structure of more than {budget.compare_limit:,} items and was stopped"
    )


_COMPARE = {
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "lteq": operator.le, "gt": operator.gt,
    "gteq": operator.ge, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b,
}
_CONTAINERS = (list, tuple, dict, set, frozenset, Namespace)


def _bounded_sum(env: BoundedEnvironment, context: Context, budget: Budget, iterable: Any,
                 attribute: Any = None, start: Any = 0) -> Any:
    """jinja2's sum, one checked `+` at a time (summing lists is quadratic in Python's sum)."""
    from jinja2.filters import make_attrgetter

    get = make_attrgetter(env, attribute) if attribute is not None else None
    total = start
    for item in iterable:
        budget.step()
        total = env.call_binop(context, "+", total, get(item) if get else item)
    return total


# -- the environment -----------------------------------------------------------------------


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with the bounds of this module on every render.

    Render inside `with env.bounded(Budget(...)):`, with a template compiled
    from `env.bound(env.parse(source))`.
    """

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._local = threading.local()
        self.globals["range"] = self._range
        self.globals["lipsum"] = self._lipsum
        for name, f in list(self.filters.items()):
            self.set_filter(name, f)

    # -- the budget of the render running on this thread
    def budget(self) -> Budget | None:
        return getattr(self._local, "budget", None)

    @contextlib.contextmanager
    def bounded(self, budget: Budget) -> Iterator[Budget]:
        self._local.budget = budget
        try:
            yield budget
        finally:
            self._local.budget = None

    # -- compiling: the checks the generated code calls
    def bound(self, ast: nodes.Template) -> nodes.Template:
        """The template with its loops, output and `~` routed through this environment's checks."""
        return _RouteThroughChecks().visit(ast)

    def loop_items(self, iterable: Any) -> Iterator[Any]:
        budget = self.budget()
        for item in iterable:
            budget.step()
            yield item

    def emit(self, value: Any) -> str:
        budget = self.budget()
        return budget.spend(self._text(budget, value))

    def concat_text(self, *values: Any) -> str:
        budget = self.budget()
        parts = [self._text(budget, v) for v in values]
        budget.need(sum(map(len, parts)))
        return budget.spend("".join(parts))

    def compare(self, left: Any, *ops: Any) -> Any:
        """`left op1 right1 op2 right2 ...` as Python chains it; structures are measured
        first, since comparing or hashing one whose parts are shared is a walk of every path."""
        budget = self.budget()
        budget.tick()
        result: Any = True
        for op, right in zip(ops[::2], ops[1::2]):
            deep = isinstance(left, _CONTAINERS) if op in ("in", "notin") else (
                isinstance(left, _CONTAINERS) and isinstance(right, _CONTAINERS))
            if deep and (tree_size(left, budget.compare_limit) > budget.compare_limit
                         or op not in ("in", "notin") and tree_size(right, budget.compare_limit) > budget.compare_limit):
                _too_big_to_compare(budget)
            result = _COMPARE[op](left, right)
            if not result:
                return result
            left = right
        return result

    def make_tuple(self, *items: Any) -> tuple:
        """A tuple literal, measured: a tuple can be hashed (a dict key, `in`), which walks every path."""
        budget = self.budget()
        budget.tick()
        if any(isinstance(v, _CONTAINERS) for v in items) and tree_size(items, budget.compare_limit) > budget.compare_limit:
            _too_big_to_compare(budget)
        return items

    def _text(self, budget: Budget, value: Any) -> str:
        if type(value) is str:
            budget.tick()
            return value
        budget.need(text_size(value, budget.work))
        return budget.spend(str(value))

    # -- what the sandbox intercepts
    def call_binop(self, context: Context, op: str, left: Any, right: Any) -> Any:
        budget = self.budget()
        if budget is None:  # not rendering: never fold at compile time
            raise TemplateLimit("the chat template computed outside a render")
        budget.tick()
        if op == "*":
            seq, n = (left, right) if type(right) is int else (right, left)
            if isinstance(seq, (str, bytes, list, tuple)) and type(n) is int:
                budget.need(len(seq) * max(n, 0))
                if isinstance(seq, (list, tuple)) and len(seq) * n > budget.item_limit:
                    budget.too_many_items()
                if isinstance(seq, tuple) and n > 1 and tree_size(seq, budget.compare_limit // n) * n > budget.compare_limit:
                    _too_big_to_compare(budget)
            elif type(left) is int and type(right) is int:
                budget.int_result(left.bit_length() + right.bit_length())
        elif op == "**" and type(left) is int and type(right) is int and right > 0 and abs(left) > 1:
            budget.int_result(right * left.bit_length())
        elif op == "+" and isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
            budget.need(len(left) + len(right))
            if isinstance(left, (list, tuple)) and len(left) + len(right) > budget.item_limit:
                budget.too_many_items()
            if isinstance(left, tuple) and isinstance(right, tuple) and (
                    tree_size(left, budget.compare_limit) + tree_size(right, budget.compare_limit) > budget.compare_limit):
                _too_big_to_compare(budget)
        elif op == "%" and isinstance(left, (str, bytes)):
            _check_percent(budget, left, right)
        return budget.spend(self.binop_table[op](left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = self.budget()
        if budget is not None:
            budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = self.budget()
        if budget is None:
            return super().getitem(obj, argument)
        budget.tick()
        value = super().getitem(obj, argument)
        return budget.spend(value) if isinstance(argument, slice) else value  # a slice is a copy

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None or self.budget() is None:
            return wrapped
        f_self, is_map = value.__self__, value.__name__ == "format_map"
        formatter = BoundedFormatter(self)

        def bounded(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return self.budget().spend(type(f_self)(formatter.vformat(f_self, args, kwargs)))

        return bounded

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = __self.budget()
        if type(__obj) is MethodType and __obj.__func__ in _ROUTES and __obj.__self__ is __self:
            return __obj(*args)  # (the keywords are jinja's own _loop_vars / _block_vars)
        budget.tick()
        copies = isinstance(__obj, BuiltinMethodType) and isinstance(__obj.__self__, (str, bytes, int, list, tuple))
        if copies:
            args = _check_method(budget, __obj, args, kwargs)
        budget.depth += 1
        try:
            if budget.depth > MAX_DEPTH:
                raise TemplateLimit(f"the chat template nested its calls more than {MAX_DEPTH} deep and was stopped")
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return budget.spend(result) if copies else result

    # -- filters and globals
    def set_filter(self, name: str, f: Callable[..., Any]) -> None:
        """Add filter `name`, checked before and after it runs, and never folded at compile time."""
        passes = _PassArg.from_obj(f)

        @pass_context
        def bounded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
            budget = self.budget()
            budget.tick()
            if isinstance(value, Iterator):  # a lazy map / select / ...: make it under the bounds
                value = budget.items(value)
            if name == "sum":
                return _bounded_sum(self, context, budget, value, *args, **kwargs)
            _check_filter(budget, name, value, args, kwargs)
            if passes is _PassArg.context:
                result = f(context, value, *args, **kwargs)
            elif passes is _PassArg.eval_context:
                result = f(context.eval_ctx, value, *args, **kwargs)
            elif passes is _PassArg.environment:
                result = f(self, value, *args, **kwargs)
            else:
                result = f(value, *args, **kwargs)
            return budget.spend(result)

        bounded.__name__ = getattr(f, "__name__", name)
        self.filters[name] = bounded

    def join_text(self, pieces: Iterable[str]) -> str:
        """Pieces made one at a time (json's iterencode), joined once they are known to fit."""
        budget = self.budget()
        out, n = [], 0
        for p in pieces:
            out.append(p)
            n += len(p)
            if not len(out) & 255 or len(p) > 4096:
                budget.need(n)
        budget.need(n)
        return "".join(out)

    def _range(self, *args: int) -> range:
        rng = range(*args)
        try:
            n = len(rng)
        except OverflowError:
            n = MAX_RANGE + 1
        if n > MAX_RANGE:
            raise TemplateLimit(f"the chat template asked for a range of more than {MAX_RANGE:,} numbers")
        return rng

    def _lipsum(self, n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
        budget = self.budget()
        if not all(type(v) is int for v in (n, min, max)):
            raise TypeError("lipsum takes whole numbers")
        budget.need(n * max * 16 if n > 0 and max > 0 else 0)  # words of up to 15 letters and a space
        return budget.spend(generate_lorem_ipsum(n, html, min, max))


# what _RouteThroughChecks makes the template call
_ROUTES = {BoundedEnvironment.emit, BoundedEnvironment.concat_text, BoundedEnvironment.loop_items,
           BoundedEnvironment.compare, BoundedEnvironment.make_tuple}


def _check(name: str, *args: nodes.Expr, lineno: int | None = None) -> nodes.Call:
    """A call of the environment's method `name`, in the template's code."""
    call = nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None)
    return call.set_lineno(lineno) if lineno is not None else call


class _RouteThroughChecks(NodeTransformer):
    """Loops step through `loop_items`, output pieces through `emit`, `~` through `concat_text`,
    comparisons through `compare`, tuple literals through `make_tuple`."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = _check("loop_items", node.iter, lineno=node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [_check("emit", n, lineno=n.lineno) for n in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return _check("concat_text", *node.nodes, lineno=node.lineno)

    def visit_Compare(self, node: nodes.Compare) -> nodes.Call:
        self.generic_visit(node)
        args: list[nodes.Expr] = [node.expr]
        for operand in node.ops:
            args += [nodes.Const(operand.op), operand.expr]
        return _check("compare", *args, lineno=node.lineno)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        if node.ctx != "load":  # `{% for a, b in ... %}`, `{% set a, b = ... %}`
            return node
        return _check("make_tuple", *node.items, lineno=node.lineno)
