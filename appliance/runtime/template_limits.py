"""Bounds on what rendering an untrusted Jinja chat template may cost: output, memory and work.

Why this module exists: a chat template arrives with the model (tokenizer_config.json, a GGUF's
metadata, `--chat-template FILE`) and Jinja's sandbox only stops it from reaching Python internals,
not from exhausting the machine: `{{ 'x' * 10**10 }}` grew an import to 20.8 GB (Jinja even folds
it at compile time), and two nested loops over `range(99999)` spin for hours. Every render of a
chat template (import, training, export, serving, chat) goes through `BoundedEnvironment`, which
keeps a per-render `Budget` and stops the render with `RenderLimitError` naming the bound that was
hit. The limits are far above what a real template needs for a conversation that fills a 128k-token
context (tests render Llama-3.x, Qwen2.5/3, Phi-3.5, Mistral and SmolLM2 templates over long
conversations), and far below what would hurt the machine.

How each resource is bounded:
- output: the template is rendered through `generate()` and stopped past `output_chars`.
- values: every operation that can build a large value checks its result size *before* building it:
  `*`, `**`, `+`, `%` (intercepted binary operators; this also stops compile-time folding),
  `~` (rewritten into a bounded concatenation), and calls of filters and methods that multiply
  sizes (`replace`, `join`, `indent`, `wordwrap`, `expandtabs`, `format`, `tojson`, ...); an integer
  argument of any other call is a size and may not exceed `value_size`. Anything converted to text
  (printed, concatenated, stringified by a filter) is measured first with a walk that stops at the
  limit, so a list holding the same large string a thousand times cannot be printed.
- total allocation: the sizes of all results are summed against `produced` (an item of a list,
  tuple or dict weighs 8, a character 1), and everything printed (also into `{% set %}` blocks and
  macros) counts, so a loop cannot pile up memory.
- single operations: a comparison (`==`, `<`, `in`, tests such as `is eq`), a hash (dict keys,
  `unique`, subscripts), a sort (`sort`, `dictsort`, `groupby`, `min`, `max`), `list.count` /
  `list.index`, `loop.changed` and set differences run in C over their operands, and repetition
  (`[a] * 2000` holds `a` 2000 times) makes an operand that is cheap to build and huge to walk. The
  operands are walked first, counting shared items each time they are reached as C would, and an
  operation that would visit more than `operand_size` items is refused (times log n for sorts).
  Building a set or dict from many distinct keys with one hash (ints i * (2**61 - 1)) takes time
  quadratic in their number, so a dict literal, `dict()`, `namespace()`, `dict.fromkeys` and
  `unique` refuse more than a few such keys. `sum` of lists copies the running list on every `+`,
  so its intermediate lists count against `produced`. The work of these operations is summed, and
  the CPU bound is checked whenever enough has been done (not only every 1024 steps).
- work: loop iterations (every `{% for %}` iterable, recursive `loop()` calls), calls, filter
  applications and printed pieces are steps, at most `steps`; and a render that has used
  `cpu_seconds` of its thread's CPU time is stopped (a backstop for scans such as `in` over large
  values, which are cheap per step but not free).
- the source itself is at most `source_chars` long (real templates are a few KB; Jinja's compiler
  is not free on megabytes).
- compile time: Jinja evaluates constant expressions while compiling, unbounded, in every
  environment that does not intercept the operators (transformers', and llama-cpp-python's, whose
  `Llama()` compiles the GGUF's template while loading the model: `{{ 'x' * 10**9 }}` took 10 s and
  3.9 GB there). `check_constants` folds the template's constant expressions with the same limits
  (one budget for all of them: those environments keep every folded value in the compiled code)
  and refuses the template, so the appliance refuses it wherever it first sees it.
- values whose size cannot be measured (an iterable of a type this module does not know) are
  refused rather than counted as small.

Imports jinja2 at module scope: import it only where a template is compiled (the runtime stays
light until an engine opens).
"""

from __future__ import annotations

import itertools
import json
import operator
import re
import string
import time
import types
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, Sized, ValuesView
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.nodes as nodes
from jinja2.nodes import EvalContext
from jinja2.runtime import (
    BlockReference,
    Context,
    LoopContext,
    Macro,
    TemplateReference,
    Undefined,
    markup_join,
    str_join,
)
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Cycler, Joiner, Namespace, _PassArg, pass_context, pass_eval_context
from jinja2.visitor import NodeTransformer


@dataclass(frozen=True)
class RenderLimits:
    """What one render may cost. The defaults fit a conversation that fills a 128k-token context
    several times over (at 64 characters per token the output limit is 131,072 tokens)."""

    source_chars: int = 1 << 20  # the template's own text
    output_chars: int = 8 << 20  # the rendered prompt
    value_size: int = 8 << 20  # characters of one string, items of one list or dict
    produced: int = 256 << 20  # all values built and all text printed, summed
    steps: int = 2_000_000  # loop iterations + calls + filter applications + printed pieces
    int_bits: int = 4096  # size of any integer the template computes
    cpu_seconds: float = 5.0  # CPU time of the rendering thread
    operand_size: int = 1 << 20  # items one comparison, hash, sort or sum may visit in its operands


DEFAULT_LIMITS = RenderLimits()


class RenderLimitError(Exception):
    """A render went past one of its limits; `bound` is the RenderLimits field that stopped it."""

    def __init__(self, bound: str, message: str) -> None:
        super().__init__(message)
        self.bound = bound


_CPU_CHECK_EVERY = 1024  # steps
_WORK_CHECK_EVERY = 1 << 16  # items visited by operations that run in C (see Budget.work)
_ITEM_BYTES = 8  # what an item of a list, tuple or dict weighs in `produced` (a character: 1)


class Budget:
    """The running costs of one render."""

    __slots__ = ("cpu_start", "limits", "produced", "steps", "worked")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.steps = 0
        self.produced = 0
        self.worked = 0
        self.cpu_start = time.thread_time()

    def step(self, n: int = 1) -> None:
        before = self.steps
        self.steps += n
        if self.steps > self.limits.steps:
            raise RenderLimitError("steps", f"it ran more than {self.limits.steps:,} steps (loop "
                                   "iterations, calls, filters and printed pieces)")
        if before // _CPU_CHECK_EVERY != self.steps // _CPU_CHECK_EVERY:
            self.check_cpu()

    def check_cpu(self) -> None:
        used = time.thread_time() - self.cpu_start
        if used > self.limits.cpu_seconds:
            raise RenderLimitError("cpu_seconds", f"it used more than {self.limits.cpu_seconds:g} s "
                                   "of CPU time")

    def check_size(self, size: int, what: str) -> None:
        if size > self.limits.value_size:
            raise RenderLimitError("value_size", f"{what} would build a value of {size:,} characters "
                                   f"or items (at most {self.limits.value_size:,})")

    def produce(self, size: int, what: str, extra: int = 0) -> None:
        """A value of `size` characters or items was built; `extra` more counts in the total only."""
        self.check_size(size, what)
        self.produced += size + extra
        if self.produced > self.limits.produced:
            raise RenderLimitError("produced", f"it built more than {self.limits.produced:,} "
                                   "characters and items in total")

    def work(self, n: int) -> None:
        """`n` items visited by an operation that runs in C: one step for the step counter, but
        it may be long, so the CPU bound is checked whenever enough work has been done."""
        before = self.worked
        self.worked += n
        if before // _WORK_CHECK_EVERY != self.worked // _WORK_CHECK_EVERY:
            self.check_cpu()

    def check_operand(self, cost: int, what: str) -> None:
        """Refuse an operation that would visit more than `operand_size` items of its operands."""
        if cost > self.limits.operand_size:
            raise RenderLimitError("operand_size", f"{what} would visit {cost:,} items of its "
                                   f"operands (at most {self.limits.operand_size:,}; a repeated "
                                   "value such as [x] * n is counted n times, as it is walked)")
        self.work(cost)


_BUDGET: ContextVar[Budget | None] = ContextVar("appliance_template_budget", default=None)


def current() -> Budget:
    budget = _BUDGET.get()
    if budget is None:  # fail closed: the hooks only run inside render()
        raise RenderLimitError("steps", "a bounded template ran outside render()")
    return budget


def render(template: jinja2.Template, limits: RenderLimits, **variables: Any) -> str:
    """Render `template` (compiled by `compile_template`) within `limits`."""
    budget = Budget(limits)
    token = _BUDGET.set(budget)
    try:
        parts: list[str] = []
        size = 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > limits.output_chars:
                raise RenderLimitError("output_chars", f"its output passed {limits.output_chars:,} "
                                       "characters")
            parts.append(chunk)
        return "".join(parts)
    finally:
        _BUDGET.reset(token)


# -- measuring values -----------------------------------------------------------------------------
def shallow_size(value: Any) -> int:
    """Characters of a string, items of a container; 0 for anything else."""
    if isinstance(value, str | bytes | bytearray | list | tuple | dict | set | frozenset):
        return len(value)
    return 0


def produce_value(budget: Budget, value: Any, what: str) -> None:
    """Count a value just built: its characters, or its items at _ITEM_BYTES each."""
    size = shallow_size(value)
    budget.produce(size, what, extra=0 if isinstance(value, str | bytes | bytearray) else
                   (_ITEM_BYTES - 1) * size)


# The concrete view types (dict_keys, ...), typed as the views they are registered as.
_DICT_KEYS: type[KeysView[Any]] = type({}.keys())
_DICT_VALUES: type[ValuesView[Any]] = type({}.values())
_DICT_ITEMS: type[ItemsView[Any, Any]] = type({}.items())
_SEQUENCES = (list, tuple, set, frozenset, _DICT_KEYS, _DICT_VALUES, _DICT_ITEMS)
# Values whose str() and repr() are short and that compare in constant time (by identity, or
# Undefined's comparison of types): Jinja's objects, callables, generators.
_SMALL = (float, complex, range, Undefined, LoopContext, Macro, Cycler, Joiner, Namespace,
          TemplateReference, BlockReference, types.GeneratorType, types.FunctionType,
          types.BuiltinFunctionType, types.MethodType, types.MethodWrapperType,
          types.WrapperDescriptorType, types.MethodDescriptorType, types.ClassMethodDescriptorType,
          type, slice)
_SMALL_TEXT = 128  # the longest str() of a _SMALL value, about


def _plain(value: Any) -> bool:
    """An object with object's own repr, str and ==: short to print, compared by identity (an
    iterator such as reversed(list) is one). An iterable that is not an iterator is not plain: it
    may be a container this module does not know."""
    cls = type(value)
    return cls.__repr__ is object.__repr__ and cls.__str__ is object.__str__ and \
        cls.__eq__ is object.__eq__ and (isinstance(value, Iterator) or not isinstance(value, Iterable))


def _unmeasurable(bound: str, value: Any, what: str) -> RenderLimitError:
    return RenderLimitError(bound, f"{what} was given a {type(value).__name__}, whose size cannot "
                            "be measured")


def _repr_len(s: str) -> int:
    """Upper bound of len(repr(s)): quotes and backslashes are escaped, and a character that is
    not printable is written as an escape of up to 10 characters (\\U0001f600)."""
    if s.isprintable():
        return len(s) + 3 + s.count("\\") + s.count("'")
    return 10 * len(s) + 3


def _fields_len(value: Any) -> int:
    """What a named tuple (groupby's groups) adds to a tuple's repr: its name and field names."""
    fields = getattr(type(value), "_fields", None)
    if type(value) is tuple or not isinstance(fields, tuple):
        return 0
    return len(type(value).__name__) + sum(len(str(f)) + 1 for f in fields)


def _text_walk(value: Any, budget: Budget, what: str) -> tuple[int, int]:
    """(an upper bound of len(str(value)), the number of container items in it), walking
    containers and stopping past the value limit, so a list that repeats one large string (cheap
    to hold, huge to print) is caught before printing. Shared items count each time they are
    reached, as str() prints them; a value of unknown type is refused."""
    if isinstance(value, str):
        return len(value), 0
    limit = budget.limits.value_size
    total, items, seen, stack = 0, 0, 0, [value]
    while stack:
        item = stack.pop()
        seen += 1
        if isinstance(item, str):
            total += _repr_len(item)
        elif isinstance(item, bytes | bytearray):
            total += 4 * len(item) + 14  # \\xNN, and bytearray(b'...')
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, _SEQUENCES):
            n = len(item)
            items += n
            total += 16 + 2 * n + _fields_len(item)  # 16: dict_values([...]), set(), ...
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, Mapping):  # dicts, and any other mapping
            n = len(item)
            items += 2 * n
            total += 16 + 4 * n
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, Namespace):
            attrs = object.__getattribute__(item, "_Namespace__attrs")
            total += 16 + 4 * len(attrs)
            stack.extend(attrs.keys())
            stack.extend(attrs.values())
        elif isinstance(item, _SMALL) or _plain(item):
            total += _SMALL_TEXT
        else:  # fail closed: something that may print its contents
            raise _unmeasurable("value_size", item, what)
        if total > limit:
            budget.check_size(total, what)
        if seen % 65536 == 0:
            budget.check_cpu()
    return total, items


def text_size(value: Any, budget: Budget, what: str) -> int:
    """An upper bound of len(str(value)), refused past the value limit (see _text_walk)."""
    return _text_walk(value, budget, what)[0]


def _range_len(r: range) -> int:
    return max(0, -(-(r.stop - r.start) // r.step))


_MAX_DEPTH = 1000  # Python's recursion limit: comparing or printing a deeper value fails anyway


def _cost_walk(value: Any, budget: Budget, what: str) -> tuple[int, int]:
    """(items a comparison, hash or sort may visit in `value`, its widest container), stopping
    past `operand_size`. Shared items count each time they are reached, as C visits them: [a] *
    2000 holds one list, but comparing it visits a 2000 times. Text counts a unit per 64
    characters (memcmp and hashing are fast); a value of unknown type is refused, and so is one
    nested more than _MAX_DEPTH deep (hashing a tuple recurses in C with no guard: a tuple nested
    500,000 deep crashed the interpreter)."""
    limit = budget.limits.operand_size
    total, widest, seen = 0, 0, 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        seen += 1
        if isinstance(item, str | bytes | bytearray):
            total += 1 + len(item) // 64
        elif isinstance(item, bool) or item is None:
            total += 1
        elif isinstance(item, int):
            total += 1 + item.bit_length() // 64
        elif isinstance(item, (*_SEQUENCES, Mapping)):
            if depth >= _MAX_DEPTH:
                raise RenderLimitError("operand_size", f"{what} was given a value nested more "
                                       f"than {_MAX_DEPTH} deep")
            n = len(item)
            widest = max(widest, n)
            if isinstance(item, Mapping):
                total += 1 + 2 * n
                if total <= limit:
                    stack.extend((child, depth + 1) for child in item)
                    stack.extend((child, depth + 1) for child in item.values())
            else:
                total += 1 + n
                if total <= limit:
                    stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, range):  # `x in range(...)` scans it unless x is an int
            total += 1 + _range_len(item)
        elif isinstance(item, _SMALL) or _plain(item):
            total += 1
        else:  # fail closed: a container this module does not know
            raise _unmeasurable("operand_size", item, what)
        if total > limit:
            budget.check_operand(total, what)
        if seen % 65536 == 0:
            budget.check_cpu()
    return total, widest


def operand_cost(value: Any, budget: Budget, what: str) -> int:
    """Items a comparison, hash or sort may visit in `value` (see _cost_walk)."""
    return _cost_walk(value, budget, what)[0]


# How a comparison uses an operand: compared (or hashed), searched by `in`, or both (the middle
# operand of `a in b == c`).
PLAIN, CONTAINER, BOTH = 0, 1, 2
# `x in d` hashes x (measured as the other operand) and compares it with the keys of d that share
# its hash, few in any dict or set a template can build (see check_keys).
_HASHED = (dict, set, frozenset, _DICT_KEYS, _DICT_ITEMS)


def materialize(budget: Budget, iterator: Iterator[Any], what: str) -> list[Any]:
    items = list(iterator)
    produce_value(budget, items, what)
    return items


def _materialized(budget: Budget, value: Any, what: str) -> Any:
    """`value`, or the list of what it yields if it is an iterator (which can be walked once)."""
    return materialize(budget, value, what) if isinstance(value, Iterator) else value


def check_operand(budget: Budget, value: Any, role: int, what: str) -> Any:
    """Refuse `value` as an operand of `what` if the operation could visit more than
    `operand_size` items of it. Returns the operand to use: `x in iterator` would consume the
    iterator, so it is searched as a list of what it yields (the same answer)."""
    cls = type(value)
    if cls is str:  # the common case, and never past operand_size (value_size is far less)
        budget.work(1 + len(value) // 64)
        return value
    if cls is int or cls is bool or cls is float or value is None:
        budget.work(1)
        return value
    if role == CONTAINER and isinstance(value, _HASHED):
        return value
    if role != PLAIN and isinstance(value, Iterator):
        if role == BOTH:
            raise RenderLimitError("operand_size", f"{what} both searches and compares an iterator")
        value = materialize(budget, value, what)
    budget.check_operand(operand_cost(value, budget, what), what)
    return value


_MAX_SAME_HASH = 8  # distinct keys with one hash in a set or dict a template builds


def check_keys(budget: Budget, keys: list[Any], what: str) -> None:
    """Refuse to build a set or dict from `keys` if hashing them could visit more than
    `operand_size` items, or if more than _MAX_SAME_HASH distinct keys share a hash: each insertion
    compares a key with every earlier one of its hash, so n such keys take n * n / 2 steps in C
    (ints i * (2**61 - 1) all hash to 0; 20,000 of them took 3.5 s). Equal keys are not counted
    (they are one entry)."""
    budget.check_operand(operand_cost(keys, budget, what), what)
    buckets: dict[int, list[Any]] = {}
    for key in keys:
        try:
            digest = hash(key)
        except TypeError:  # unhashable: the operation itself raises the same error
            return
        bucket = buckets.setdefault(digest, [])
        if any(key is other or key == other for other in bucket):
            continue
        bucket.append(key)
        if len(bucket) > _MAX_SAME_HASH:
            raise RenderLimitError("operand_size", f"{what} was given more than {_MAX_SAME_HASH} "
                                   "different keys with the same hash (building a set or dict of "
                                   "them takes time quadratic in their number)")


def _ints(args: Iterable[Any]) -> Iterator[int]:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool):
            yield arg


def _check_int_args(budget: Budget, args: tuple[Any, ...], kwargs: Mapping[str, Any], what: str) -> None:
    """Integer arguments of calls are widths and counts: no larger than the value limit."""
    for value in _ints((*args, *kwargs.values())):
        if abs(value) > budget.limits.value_size:
            raise RenderLimitError("value_size", f"{what} was given {value:,}, more than the "
                                   f"{budget.limits.value_size:,} any width or count may be")


# -- operators ------------------------------------------------------------------------------------
_SEQUENCE = (str, bytes, list, tuple)
_SET_LIKE = (set, frozenset, _DICT_KEYS, _DICT_ITEMS)


def _check_binop(budget: Budget, op: str, left: Any, right: Any) -> tuple[Any, Any]:
    """Refuse an operation whose result would be too large; returns the operands to use."""
    what = f"the operator {op!r}"
    if op == "-" and (isinstance(left, _SET_LIKE) or isinstance(right, _SET_LIKE)):
        # a set difference (of dict views) hashes every element of both operands into a new set
        left, right = _materialized(budget, left, what), _materialized(budget, right, what)
        elements: list[Any] = []
        for side in (left, right):
            budget.check_operand(operand_cost(side, budget, what), what)
            if isinstance(side, Iterable):
                elements.extend(side)
        check_keys(budget, elements, what)
    elif op == "*":
        if isinstance(left, int) and isinstance(right, _SEQUENCE):
            left, right = right, left
        if isinstance(left, _SEQUENCE) and isinstance(right, int):
            budget.check_size(len(left) * max(right, 0), what)
        elif isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > budget.limits.int_bits + 1:
                raise RenderLimitError("int_bits", f"{what} would compute an integer of about "
                                       f"{bits:,} bits (at most {budget.limits.int_bits:,})")
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 and \
                left.bit_length() * right > budget.limits.int_bits + 1:
            raise RenderLimitError("int_bits", f"{what} would compute an integer of about "
                                   f"{left.bit_length() * right:,} bits (at most "
                                   f"{budget.limits.int_bits:,})")
    elif op == "+":
        if isinstance(left, _SEQUENCE) and isinstance(right, _SEQUENCE):
            budget.check_size(len(left) + len(right), what)
    elif op == "%" and isinstance(left, str | bytes):
        budget.check_size(_percent_size(budget, left, right), what)
    return left, right


_PERCENT_SPEC = re.compile(rb"%(\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")


def _percent_size(budget: Budget, fmt: str | bytes, args: Any) -> int:
    """Upper bound of len(fmt % args): every field as wide as its width or the widest argument."""
    raw = fmt.encode("utf-8", "surrogatepass") if isinstance(fmt, str) else fmt
    values = list(args.values()) if isinstance(args, Mapping) else \
        list(args) if isinstance(args, tuple) else [args]
    widest = max((text_size(v, budget, "a % format") for v in values), default=0)
    stars = [abs(v) for v in _ints(values)]
    size = len(fmt)
    for m in _PERCENT_SPEC.finditer(raw):
        for part in (m.group(2), m.group(3)):
            if part == b"*":
                size += max(stars, default=0)
            elif part:
                size += int(part) if len(part) < 12 else budget.limits.value_size + 1
        size += widest
    return size


_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?")


def _format_size(budget: Budget, fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """Upper bound of len(fmt.format(...)), same rule as `_percent_size`."""
    values = [*args, *kwargs.values()]
    if len(values) == 1 and isinstance(values[0], Mapping):  # format_map
        values = list(values[0].values())
    widest = max((text_size(v, budget, "str.format") for v in values), default=0)
    nested = max((abs(v) for v in _ints(values)), default=0)
    size = len(fmt)
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return size  # the call itself will raise
    for _literal, name, spec, _conversion in fields:
        if name is None:
            continue
        size += widest
        if spec and "{" in spec:
            size += 2 * nested
        elif spec and (m := _FORMAT_SPEC.match(spec)):
            for part in m.groups():
                if part:
                    size += int(part) if len(part) < 12 else budget.limits.value_size + 1
    return size


# -- filters and methods that multiply sizes ------------------------------------------------------
PreCheck = Callable[[Budget, Context, tuple[Any, ...], dict[str, Any]], tuple[Any, ...]]


def _as_text(budget: Budget, value: Any, what: str) -> str:
    """str(value), measured before it is built."""
    if isinstance(value, str):
        return value
    text_size(value, budget, what)
    return str(value)


def _replace_size(budget: Budget, s: Any, old: Any, new: Any, count: Any = -1) -> int:
    s, old, new = (_as_text(budget, x, "replace") for x in (s, old, new))
    hits = len(s) + 1 if old == "" else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _lines(s: str) -> int:
    return s.count("\n") + 1


def _pre_replace(budget: Budget, context: Context, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[Any, ...]:
    budget.check_size(_replace_size(budget, *args, **kwargs), "the filter replace")
    return args


def _pre_join(budget: Budget, context: Context, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[Any, ...]:
    value, *rest = args
    d = rest[0] if rest else kwargs.get("d", "")
    attribute = rest[1] if len(rest) > 1 else kwargs.get("attribute")
    items = list(value)
    budget.produce(len(items), "the filter join")
    shown = items
    if attribute is not None:
        getter = jinja2.filters.make_attrgetter(context.environment, attribute)
        shown = [getter(item) for item in items]
    sep = text_size(d, budget, "the filter join")
    total = max(len(items) - 1, 0) * sep
    for item in shown:
        total += text_size(item, budget, "the filter join")
        budget.check_size(total, "the filter join")
    return (items, *rest)


def _pre_indent(budget: Budget, context: Context, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[Any, ...]:
    s = _as_text(budget, args[0], "the filter indent")
    width = args[1] if len(args) > 1 else kwargs.get("width", 4)
    pad = width if isinstance(width, int) and not isinstance(width, bool) else \
        text_size(width, budget, "the filter indent")
    budget.check_size(len(s) + _lines(s) * pad, "the filter indent")
    return (s, *args[1:])


def _pre_wordwrap(budget: Budget, context: Context, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[Any, ...]:
    s = _as_text(budget, args[0], "the filter wordwrap")
    wrap = args[3] if len(args) > 3 else kwargs.get("wrapstring")
    sep = 1 if wrap is None else text_size(wrap, budget, "the filter wordwrap")
    budget.check_size(len(s) + (len(s) + 1) * sep, "the filter wordwrap")
    return (s, *args[1:])


def _pre_format(budget: Budget, context: Context, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[Any, ...]:
    fmt = _as_text(budget, args[0], "the filter format")
    budget.check_size(_percent_size(budget, fmt, dict(kwargs) if kwargs else tuple(args[1:])),
                      "the filter format")
    return (fmt, *args[1:])


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str,
         default: Any = None) -> Any:
    """A filter's argument, given by position (after the value, which is index 0) or by name."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def _pre_sum(budget: Budget, context: Context, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> tuple[Any, ...]:
    what = "the filter sum"
    items = list(args[0])
    attribute = _arg(args, kwargs, 1, "attribute")
    start = _arg(args, kwargs, 2, "start", 0)
    summed = items
    if attribute is not None:
        getter = jinja2.filters.make_attrgetter(context.environment, attribute)
        summed = [getter(item) for item in items]
    budget.work(len(summed))
    total = shallow_size(start) + sum(shallow_size(item) for item in summed)
    budget.check_size(total, what)
    if isinstance(start, list | tuple):  # every + copies the running list: quadratic in the items
        running = built = len(start)
        headroom = (budget.limits.produced - budget.produced) // _ITEM_BYTES
        for item in summed:
            running += shallow_size(item)
            built += running
            if built > headroom:
                raise RenderLimitError("produced", f"{what} would copy more than {built:,} items "
                                       "into its intermediate lists (each + copies the running "
                                       f"list; at most {budget.limits.produced:,} in all)")
        budget.produce(0, what, extra=_ITEM_BYTES * built)
    return (items, *args[1:])


_CHAR_BYTES = 64  # a one-character str object (only ASCII ones are shared)


def _charge_chars(budget: Budget, value: Any, what: str) -> None:
    """A filter that makes a list of the characters of a string builds one object per character."""
    if isinstance(value, str) and not value.isascii():
        budget.produce(len(value), what, extra=_CHAR_BYTES * len(value))


def _pre_list(budget: Budget, context: Context, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if args:
        _charge_chars(budget, args[0], "the filter list")
    return args


def _pre_slice(budget: Budget, context: Context, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[Any, ...]:
    slices = _arg(args, kwargs, 1, "slices", 1)
    if isinstance(slices, int) and slices > _MAX_SLICES:  # each slice is a list object of its own
        raise RenderLimitError("value_size", f"the filter slice was asked for {slices:,} slices "
                               f"(at most {_MAX_SLICES:,})")
    if args:
        _charge_chars(budget, args[0], "the filter slice")
    return args


def _pre_batch(budget: Budget, context: Context, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[Any, ...]:
    linecount = _arg(args, kwargs, 1, "linecount")
    value = args[0] if args else None
    if isinstance(linecount, int) and linecount > 0 and isinstance(value, Sized):
        batches = -(-len(value) // linecount)
        if batches > _MAX_SLICES:  # each batch is a list object of its own
            raise RenderLimitError("value_size", f"the filter batch would make {batches:,} lists "
                                   f"(at most {_MAX_SLICES:,})")
    _charge_chars(budget, value, "the filter batch")
    return args


_MAX_SLICES = 100_000  # as many as Jinja's sandbox lets range() have


def _items_cost(budget: Budget, value: Any, what: str) -> int:
    """What sorting or deduplicating `value` visits: a string's characters are its items."""
    if isinstance(value, str | bytes | bytearray):
        return 1 + len(value)
    return operand_cost(value, budget, what)


def _pre_ordering(name: str, sorts: bool) -> PreCheck:
    """min and max compare every item with the running result; sort, dictsort and groupby sort,
    which compares each item about log2(n) times. A comparison walks both items."""
    what = f"the filter {name}"

    def pre(budget: Budget, context: Context, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> tuple[Any, ...]:
        if not args:
            return args
        value = _materialized(budget, args[0], what)
        cost = _items_cost(budget, value, what)
        if sorts:
            cost *= max(1, (len(value) if isinstance(value, Sized) else 1).bit_length())
            _charge_chars(budget, value, what)
        budget.check_operand(cost, what)
        return (value, *args[1:])
    return pre


def _pre_unique(budget: Budget, context: Context, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """unique hashes every item (after attribute lookup and lower-casing) into a set."""
    what = "the filter unique"
    if not args:
        return args
    value = _materialized(budget, args[0], what)
    budget.check_operand(_items_cost(budget, value, what), what)
    case_sensitive = _arg(args, kwargs, 1, "case_sensitive", False)
    attribute = _arg(args, kwargs, 2, "attribute")
    getter = jinja2.filters.make_attrgetter(
        context.environment, attribute, postprocess=None if case_sensitive else jinja2.filters.ignore_case)
    check_keys(budget, [getter(item) for item in value], what)
    return (value, *args[1:])


_URLIZE_WORD = re.compile(r"\S+")
_ESCAPED = 5  # markupsafe.escape: '&' -> '&amp;', '"' -> '&#34;'


def _pre_urlize(budget: Budget, context: Context, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """urlize escapes the text, splits it into words and makes each word that looks like a link
    `<a href="word" rel="..." target="...">word</a>`: the attributes are repeated for every word.
    It is Python work per word and per extra scheme (steps), and balancing parentheses in a word is
    quadratic in its length (the operand bound, on the sum of the squares)."""
    what = "the filter urlize"
    text = _as_text(budget, args[0], what)
    policies = context.environment.policies
    target = _arg(args, kwargs, 3, "target")
    rel = _arg(args, kwargs, 4, "rel")
    schemes = _arg(args, kwargs, 5, "extra_schemes")
    if target is None:
        target = policies.get("urlize.target")
    if schemes is not None:
        schemes = list(schemes)
        if len(args) > 5:
            args = (*args[:5], schemes, *args[6:])
        else:
            kwargs["extra_schemes"] = schemes
    else:
        schemes = list(policies.get("urlize.extra_schemes") or ())
    attrs = _ESCAPED * (text_size(target, budget, what) + text_size(rel, budget, what) +
                        len(str(policies.get("urlize.rel") or ""))) + 64
    per_word = 1 + len(schemes)
    words = quadratic = 0
    for match in _URLIZE_WORD.finditer(text):
        width = _ESCAPED * (match.end() - match.start())
        words += 1
        quadratic += width * width
        budget.step(per_word)
    budget.check_operand(quadratic // 1024, what)
    budget.check_size(2 * _ESCAPED * len(text) + words * attrs, what)
    budget.produce(0, what, extra=2 * _CHAR_BYTES * words)  # a string per word and per space
    return args


def _pre_pprint(budget: Budget, context: Context, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[Any, ...]:
    size = text_size(args[0], budget, "the filter pprint")
    budget.check_size(size * 4, "the filter pprint")  # pformat adds indentation
    return args


def _pre_text(name: str, factor: int) -> PreCheck:
    """Filters that turn their input into text, at most `factor` times as long (case mapping can
    triple a character, HTML escaping makes '&' five, percent-encoding an astral character twelve)."""
    def pre(budget: Budget, context: Context, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> tuple[Any, ...]:
        what = f"the filter {name}"
        budget.check_size(text_size(args[0], budget, what) * factor, what)
        return args
    return pre


def _pre_generic(name: str) -> PreCheck:
    """A filter this module does not know: assume it may multiply its inputs."""
    def pre(budget: Budget, context: Context, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> tuple[Any, ...]:
        what = f"the filter {name}"
        first = text_size(args[0], budget, what) if args else 0
        rest = sum(text_size(a, budget, what) for a in (*args[1:], *kwargs.values())
                   if not isinstance(a, int | float))
        budget.check_size((first + 1) * (2 + rest), what)
        return args
    return pre


# Filters whose result is at most linear in their input and whose work is at most linear in its
# size (lists are walked lazily by consumers; the tests select/reject apply are bounded themselves).
_LINEAR_FILTERS = frozenset({
    "abs", "attr", "count", "d", "default", "first", "float", "int", "items", "last", "length",
    "map", "random", "reject", "rejectattr", "reverse", "round", "select", "selectattr", "center",
    "truncate",
    "tojson",  # tojson streams its output against the value limit itself
})
_TEXT_FILTERS = {  # name: how many times longer than its input as text the result can be
    "filesizeformat": 1, "safe": 1, "string": 1, "striptags": 1, "trim": 1, "wordcount": 1,
    "capitalize": 3, "lower": 3, "title": 3, "upper": 3,
    "e": 6, "escape": 6, "forceescape": 6, "xmlattr": 6, "urlencode": 12,
}
_FILTER_CHECKS: dict[str, PreCheck] = {
    "replace": _pre_replace, "join": _pre_join, "indent": _pre_indent, "wordwrap": _pre_wordwrap,
    "format": _pre_format, "sum": _pre_sum, "pprint": _pre_pprint, "slice": _pre_slice,
    "batch": _pre_batch, "list": _pre_list, "unique": _pre_unique, "urlize": _pre_urlize,
    "sort": _pre_ordering("sort", True), "dictsort": _pre_ordering("dictsort", True),
    "groupby": _pre_ordering("groupby", True), "min": _pre_ordering("min", False),
    "max": _pre_ordering("max", False),
    **{name: _pre_text(name, factor) for name, factor in _TEXT_FILTERS.items()},
}


def _filter_check(name: str) -> PreCheck | None:
    if name in _LINEAR_FILTERS:
        return None
    return _FILTER_CHECKS.get(name) or _pre_generic(name)


def bound_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` (a Jinja filter) with a step, argument checks and a result-size check around it."""
    pass_arg = _PassArg.from_obj(func)
    check = _filter_check(name)
    what = f"the filter {name}"

    @pass_context
    def bounded(context: Context, *args: Any, **kwargs: Any) -> Any:
        budget = current()
        budget.step()
        _check_int_args(budget, args[1:], kwargs, what)
        if check is not None:
            args = check(budget, context, args, kwargs)
        if pass_arg is _PassArg.context:
            result = func(context, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = func(context.eval_ctx, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = func(context.environment, *args, **kwargs)
        else:
            result = func(*args, **kwargs)
        produce_value(budget, result, what)
        return result

    bounded.__name__ = f"bounded_{name}"
    return bounded


# Tests that take constant time, or time linear in a string: no operand walk.
_CHEAP_TESTS = frozenset({
    "odd", "even", "divisibleby", "defined", "undefined", "none", "boolean", "false", "true",
    "integer", "float", "lower", "upper", "string", "mapping", "number", "sequence", "iterable",
    "callable", "sameas", "escaped",
})


def _check_test_args(budget: Budget, name: str, args: tuple[Any, ...],
                     kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """`in` searches its second operand; the comparisons (eq, lt, ...), `filter` and `test` (which
    hash their value) and any test this module does not know walk all of theirs."""
    what = f"the test {name!r}"
    budget.work(1)
    if name in _CHEAP_TESTS:
        return args
    if name == "in" and len(args) == 2 and not kwargs:
        return (check_operand(budget, args[0], PLAIN, what), check_operand(budget, args[1], CONTAINER, what))
    for value in kwargs.values():
        check_operand(budget, value, PLAIN, what)
    return tuple(check_operand(budget, arg, PLAIN, what) for arg in args)


def bound_test(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` (a Jinja test) with its operands measured first."""
    pass_arg = _PassArg.from_obj(func)

    @pass_context
    def bounded(context: Context, *args: Any, **kwargs: Any) -> Any:
        args = _check_test_args(current(), name, args, kwargs)
        if pass_arg is _PassArg.context:
            return func(context, *args, **kwargs)
        if pass_arg is _PassArg.eval_context:
            return func(context.eval_ctx, *args, **kwargs)
        if pass_arg is _PassArg.environment:
            return func(context.environment, *args, **kwargs)
        return func(*args, **kwargs)

    bounded.__name__ = f"bounded_{name}"
    return bounded


def _check_str_method(budget: Budget, receiver: str | bytes, name: str, args: tuple[Any, ...],
                      kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    what = f"{type(receiver).__name__}.{name}"
    if name in ("format", "format_map") and isinstance(receiver, str):
        budget.check_size(_format_size(budget, receiver, args, kwargs), what)
        return args
    _check_int_args(budget, args, kwargs, what)
    if name == "replace" and isinstance(receiver, str):
        budget.check_size(_replace_size(budget, receiver, *args, **kwargs), what)
    elif name == "join":
        items = list(args[0]) if args else []
        total = max(len(items) - 1, 0) * len(receiver) + sum(shallow_size(i) for i in items)
        budget.check_size(total, what)
        return (items, *args[1:])
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        tab = "\t" if isinstance(receiver, str) else b"\t"
        budget.check_size(len(receiver) + receiver.count(tab) * max(int(size), 0), what)  # type: ignore[arg-type]
    elif name == "translate" and isinstance(receiver, str) and args and isinstance(args[0], Mapping):
        widest = max((shallow_size(v) for v in args[0].values()), default=1)
        budget.check_size(len(receiver) * max(widest, 1), what)
    elif name not in _LINEAR_METHODS:
        _generic_call(budget, len(receiver), args, kwargs, what)
    return args


# str/bytes methods whose result is at most a small multiple of the receiver (widths are int args).
_LINEAR_METHODS = frozenset({
    "capitalize", "casefold", "center", "count", "decode", "encode", "endswith", "find", "hex",
    "index", "isalnum", "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower",
    "isnumeric", "isprintable", "isspace", "istitle", "isupper", "ljust", "lower", "lstrip",
    "maketrans", "partition", "removeprefix", "removesuffix", "rfind", "rindex", "rjust",
    "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip", "swapcase",
    "title", "upper", "zfill",
    # list / dict / tuple / int / float methods the sandbox lets through
    "copy", "get", "items", "keys", "values", "fromkeys", "bit_length", "bit_count", "to_bytes",
    "as_integer_ratio", "conjugate", "is_integer", "from_bytes",
})


def _check_container_method(budget: Budget, owner: Any, name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """list.count / list.index compare their argument with every item; dict.get hashes its key;
    dict.fromkeys builds a dict of its keys."""
    what = f"{name}()"
    if name in ("count", "index") and isinstance(owner, list | tuple):
        budget.check_operand(operand_cost(owner, budget, what), what)
        if args:
            check_operand(budget, args[0], PLAIN, what)
    elif name == "get" and isinstance(owner, Mapping) and args:
        check_operand(budget, args[0], PLAIN, what)
    elif name == "fromkeys" and args:
        keys = list(args[0])
        check_keys(budget, keys, what)
        return (keys, *args[1:])
    return args


def _pair(item: Any) -> Any:
    """An item of dict()'s sequence of pairs, as dict() will read it (three items at most)."""
    if isinstance(item, list | tuple | str | bytes) or not isinstance(item, Iterable):
        return item
    return tuple(itertools.islice(item, 3))


def _pre_dict_args(budget: Budget, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                   what: str) -> tuple[Any, ...]:
    """dict(...) and namespace(...): a mapping or a sequence of pairs, and names."""
    keys: list[Any] = list(kwargs)
    if args:
        source = args[0]
        budget.check_operand(operand_cost(source, budget, what), what)
        if isinstance(source, Mapping):
            keys.extend(source.keys())
        elif isinstance(source, Iterable):
            source = [_pair(item) for item in source]
            keys.extend(p[0] for p in source if isinstance(p, list | tuple | str | bytes) and len(p) == 2)
            args = (source, *args[1:])
    check_keys(budget, keys, what)
    return args


def _generic_call(budget: Budget, base: int, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                  what: str) -> None:
    rest = sum(text_size(a, budget, what) for a in (*args, *kwargs.values())
               if not isinstance(a, int | float))
    budget.check_size((base + 1) * (2 + rest), what)


def counted(iterable: Any) -> Iterator[Any]:
    """`iterable`, one step per item."""
    budget = current()
    for item in iterable:
        budget.step()
        yield item


# -- the environment ------------------------------------------------------------------------------
class BoundsExtension(jinja2.ext.Extension):
    """Holds the functions the rewritten template calls (as extension attributes, which a template
    cannot shadow with a variable of the same name)."""

    def _loop(self, iterable: Any) -> Iterator[Any]:
        current().step()
        return counted(iterable)

    def _dict(self, *pairs: tuple[Any, Any]) -> dict[Any, Any]:
        budget = current()
        check_keys(budget, [key for key, _ in pairs], "a dict literal")
        result = dict(pairs)
        produce_value(budget, result, "a dict literal")
        return result

    @pass_eval_context
    def _concat(self, eval_ctx: EvalContext, *parts: Any) -> str:
        budget = current()
        budget.step()
        total = 0
        for part in parts:
            total += text_size(part, budget, "the operator '~'")
            budget.check_size(total * (6 if eval_ctx.autoescape else 1), "the operator '~'")
        budget.produce(total, "the operator '~'")
        return markup_join(parts) if eval_ctx.autoescape else str_join(parts)  # Jinja's own

    def _emit(self, value: Any) -> Any:
        budget = current()
        budget.step()
        budget.produce(text_size(value, budget, "printing a value"), "printing a value")
        return value


_CMP_NAMES = {"eq": "==", "ne": "!=", "gt": ">", "gteq": ">=", "lt": "<", "lteq": "<=", "in": "in",
              "notin": "not in"}
# The comparison operand check, as a filter: the compiled template calls a filter directly, where a
# call goes through the sandbox (10 us). It only measures its value, so a template may call it too.
_OPERAND_FILTER = "appliance_bounded_operand"


def _operand_filter(value: Any, role: int, op: str) -> Any:
    return check_operand(current(), value, role, f"the operator {_CMP_NAMES.get(op, op)!r}")


_N = TypeVar("_N", bound=nodes.Node)


class _Rewriter(NodeTransformer):
    """Routes loops, `~`, printed pieces, comparison operands and dict literals through
    BoundsExtension."""

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier

    def _children(self, node: _N) -> _N:
        """generic_visit, typed: Jinja's rewrites the children in place and returns `node` itself."""
        return cast(_N, self.generic_visit(node))

    def _call(self, name: str, args: list[nodes.Node], lineno: int) -> nodes.Call:
        return nodes.Call(nodes.ExtensionAttribute(self.identifier, name), args, [], None, None,
                          lineno=lineno)

    @staticmethod
    def _literal(child: nodes.TemplateData) -> nodes.Expr:
        """Template text as an argument: safe markup inside `{% autoescape true %}`, as Jinja has it."""
        return nodes.MarkSafeIfAutoescape(nodes.Const(child.data, lineno=child.lineno),
                                          lineno=child.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self._children(node)
        node.iter = self._call("_loop", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self._children(node)
        return self._call("_concat", list(node.nodes), node.lineno)

    def visit_Compare(self, node: nodes.Compare) -> nodes.Node:
        """Each operand is measured as it is evaluated (a chained comparison stays lazy)."""
        node = self._children(node)
        if node.ops:
            node.expr = self._operand(node.expr, PLAIN, node.ops[0].op)
        last = len(node.ops) - 1
        for i, operand in enumerate(node.ops):
            role = PLAIN
            if operand.op in ("in", "notin"):
                role = CONTAINER if i == last else BOTH
            operand.expr = self._operand(operand.expr, role, operand.op)
        return node

    @staticmethod
    def _operand(expr: nodes.Expr, role: int, op: str) -> nodes.Expr:
        return nodes.Filter(expr, _OPERAND_FILTER, [nodes.Const(role, lineno=expr.lineno),
                                                    nodes.Const(op, lineno=expr.lineno)],
                            [], None, None, lineno=expr.lineno)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        """`{k: v, ...}` becomes `_dict((k, v), ...)`: same order of evaluation, keys checked."""
        node = self._children(node)
        pairs: list[nodes.Node] = [nodes.Tuple([pair.key, pair.value], "load", lineno=pair.lineno)
                                   for pair in node.items]
        return self._call("_dict", pairs, node.lineno)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        node = self._children(node)
        node.nodes = [self._call("_emit", [self._literal(child) if isinstance(child, nodes.TemplateData)
                                           else child], child.lineno)
                      for child in node.nodes]
        return node


# Callables that only store or pass values (their work is counted elsewhere): no size checks.
# (Also `dict`, `namespace`, `cycler`, `joiner` and the trusted globals, see BoundedEnvironment.)
_VALUE_CALLABLES: tuple[type, ...] = (Macro, LoopContext, Cycler, Joiner)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment (an immutable sandbox) with a budget on every render.
    Compile with `compile_template`, render with `render`."""

    intercepted_binops = frozenset({"*", "**", "+", "%", "-"})
    trusted_callables: tuple[Any, ...] = ()

    def __init__(self, *, trusted: Iterable[Callable[..., Any]] = (), **options: Any) -> None:
        extensions = [*options.pop("extensions", ()), BoundsExtension]
        super().__init__(optimized=False, extensions=extensions, **options)
        self.trusted_callables = (dict, Namespace, Cycler, Joiner, *trusted)

    def bound_filters(self) -> None:
        """Wrap every filter and test (call after the last one is registered)."""
        self.raw_filters = dict(self.filters)
        self.filters = {name: bound_filter(name, func) for name, func in self.filters.items()}
        tests = cast("dict[str, Callable[..., Any]]", self.tests)  # Jinja's dict literal: "function"
        self.raw_tests = dict(tests)
        self.tests = {name: bound_test(name, func) for name, func in tests.items()}
        self.filters[_OPERAND_FILTER] = _operand_filter
        self.globals["lipsum"] = _bounded_lipsum

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = current()
        budget.step()
        left, right = _check_binop(budget, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        produce_value(budget, result, f"the operator {operator!r}")
        return result

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(argument, tuple):  # a key that is hashed (and compared)
            check_operand(current(), argument, PLAIN, "a subscript")
        result = super().getitem(obj, argument)
        if isinstance(argument, slice):
            produce_value(current(), result, "a slice")
        return result

    def call(__self, __context: Context, __obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = current()
        scope = {k: kwargs.pop(k) for k in ("_loop_vars", "_block_vars") if k in kwargs}  # jinja's
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, BoundsExtension):  # counts its own steps
            return super().call(__context, __obj, *args, **kwargs, **scope)
        budget.step()
        name = getattr(target, "__name__", "")
        if isinstance(__obj, LoopContext) and args:  # recursive loop(): count its iterations too
            args = (counted(args[0]), *args[1:])
        elif isinstance(owner, LoopContext) and name == "changed":  # compares with the last values
            check_operand(budget, args, PLAIN, "loop.changed()")
        elif isinstance(owner, str | bytes) and isinstance(target, types.BuiltinFunctionType):
            args = _check_str_method(budget, owner, target.__name__, args, kwargs)
        elif __obj is dict or __obj is Namespace:
            args = _pre_dict_args(budget, args, kwargs, "dict()" if __obj is dict else "namespace()")
        elif isinstance(__obj, _VALUE_CALLABLES) or isinstance(owner, _VALUE_CALLABLES) or \
                any(__obj is t for t in __self.trusted_callables):
            pass
        elif isinstance(target, types.BuiltinFunctionType) and name in _LINEAR_METHODS:
            _check_int_args(budget, args, kwargs, f"{name}()")
            args = _check_container_method(budget, owner, name, args)
        else:
            what = f"{getattr(target, '__name__', type(target).__name__)}()"
            _check_int_args(budget, args, kwargs, what)
            _generic_call(budget, shallow_size(owner), args, kwargs, what)
        result = super().call(__context, __obj, *args, **kwargs, **scope)
        produce_value(budget, result, "a call")
        return result


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    from jinja2.utils import generate_lorem_ipsum

    current().check_size(abs(n) * abs(max) * 12, "lipsum()")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def compile_template(env: BoundedEnvironment, source: str, limits: RenderLimits) -> jinja2.Template:
    """Parse, rewrite and compile `source` in `env` (whose filters are already bound)."""
    if len(source) > limits.source_chars:
        raise RenderLimitError("source_chars", f"it is {len(source):,} characters long (at most "
                               f"{limits.source_chars:,})")
    tree = env.parse(source)
    check_constants(tree, env, limits)
    identifier = BoundsExtension.identifier
    tree = _Rewriter(identifier).visit(tree)
    return env.from_string(tree)


# -- constants Jinja folds at compile time --------------------------------------------------------
class _NotConstant(Exception):
    pass


def check_constants(tree: nodes.Template, env: BoundedEnvironment, limits: RenderLimits) -> None:
    """Refuse a template holding a constant expression too large to build.

    Jinja's compiler evaluates constant expressions (`{{ 'x' * 10**10 }}`, `{{ 'x' | center(10**9) }}`)
    when it compiles a template, with no bound, in every environment that does not intercept the
    operators: transformers' and llama-cpp-python's (whose `Llama()` compiles the GGUF's template
    while loading the model). This folds every expression the way Jinja's folding would, with the
    render limits, so such a template is refused wherever the appliance first sees it, before
    another library compiles it. One budget covers all of them: those environments keep every
    folded value (written out into the compiled code), so each counts against `produced`, its list
    items at _ITEM_BYTES each, and one that would be written out longer than `value_size` is
    refused.
    """
    budget = Budget(limits)
    token = _BUDGET.set(budget)
    folder = _Folder(env, budget)
    try:
        for node in tree.find_all(nodes.Expr):
            try:
                folder.fold(node)
            except _NotConstant:
                pass
            except RenderLimitError as exc:
                raise RenderLimitError(exc.bound, f"the constant expression on line {node.lineno}: "
                                       f"{exc} (Jinja builds constant expressions when it compiles "
                                       "a template, as transformers and llama.cpp's Python binding "
                                       "do)") from None
    finally:
        _BUDGET.reset(token)


_MEMO_MAX = 4096  # folded values at most this large (characters + item weights) are remembered


class _Folder:
    """Jinja's `as_const`, bounded: the value of a constant expression, or _NotConstant.

    Every value folded is charged to the budget, and only small ones are remembered (a large one
    is built again, and charged again, where an enclosing expression needs it), so the folder
    holds little and a template of many large constants runs out of budget."""

    def __init__(self, env: BoundedEnvironment, budget: Budget) -> None:
        self.env, self.budget = env, budget
        self.eval_ctx = EvalContext(env)
        self.memo: dict[int, tuple[bool, Any]] = {}

    def fold(self, node: nodes.Node) -> Any:
        key = id(node)
        known = self.memo.get(key)
        if known is not None:
            if not known[0]:
                raise _NotConstant
            return known[1]
        try:
            value = self._fold(node)
        except _NotConstant:
            self.memo[key] = (False, None)
            raise
        size, items = _text_walk(value, self.budget, "a constant")  # as it is written out
        self.budget.produce(size, "a constant", extra=_ITEM_BYTES * items)
        if size + _ITEM_BYTES * items <= _MEMO_MAX:
            self.memo[key] = (True, value)
        return value

    def _fold(self, node: nodes.Node) -> Any:  # one case per node type
        self.budget.step()
        try:
            if isinstance(node, nodes.Const):
                return node.value
            if isinstance(node, nodes.TemplateData):
                return node.data
            if isinstance(node, nodes.Tuple | nodes.List):
                items = [self.fold(item) for item in node.items]
                return tuple(items) if isinstance(node, nodes.Tuple) else items
            if isinstance(node, nodes.Dict):
                pairs = [(self.fold(pair.key), self.fold(pair.value)) for pair in node.items]
                check_keys(self.budget, [key for key, _ in pairs], "a dict literal")
                return dict(pairs)
            if isinstance(node, nodes.And | nodes.Or):
                left = self.fold(node.left)
                return (left and self.fold(node.right)) if isinstance(node, nodes.And) else \
                    (left or self.fold(node.right))
            if isinstance(node, nodes.BinExpr):
                left, right = self.fold(node.left), self.fold(node.right)
                left, right = _check_binop(self.budget, node.operator, left, right)
                return _NODE_BINOPS[node.operator](left, right)
            if isinstance(node, nodes.UnaryExpr):
                return _NODE_UNOPS[node.operator](self.fold(node.node))
            if isinstance(node, nodes.Concat):
                parts = [self.fold(part) for part in node.nodes]
                self.budget.check_size(sum(text_size(p, self.budget, "'~'") for p in parts), "'~'")
                return "".join(str(p) for p in parts)
            if isinstance(node, nodes.CondExpr):
                if self.fold(node.test):
                    return self.fold(node.expr1)
                if node.expr2 is None:
                    raise _NotConstant
                return self.fold(node.expr2)
            if isinstance(node, nodes.Compare):
                last = len(node.ops) - 1
                value = self.fold(node.expr)
                if node.ops:
                    value = check_operand(self.budget, value, PLAIN, "a comparison")
                for i, op in enumerate(node.ops):
                    role = PLAIN if op.op not in ("in", "notin") else CONTAINER if i == last else BOTH
                    new = check_operand(self.budget, self.fold(op.expr), role,
                                        f"the operator {_CMP_NAMES.get(op.op, op.op)!r}")
                    if not _NODE_CMPOPS[op.op](value, new):
                        return False
                    value = new
                return True
            if isinstance(node, nodes.Getitem):
                return self.env.getitem(self.fold(node.node), self.fold(node.arg))
            if isinstance(node, nodes.Slice):
                return slice(*(None if part is None else self.fold(part)
                               for part in (node.start, node.stop, node.step)))
            if isinstance(node, nodes.Getattr):
                return self.env.getattr(self.fold(node.node), node.attr)
            if isinstance(node, nodes.Filter | nodes.Test):
                return self._filter_or_test(node)
            if isinstance(node, nodes.MarkSafe | nodes.MarkSafeIfAutoescape):
                return self.fold(node.expr)
        except (_NotConstant, RenderLimitError):
            raise
        except Exception:  # Jinja's folding gives up on any error too
            raise _NotConstant from None
        raise _NotConstant

    def _filter_or_test(self, node: nodes.Filter | nodes.Test) -> Any:
        is_filter = isinstance(node, nodes.Filter)
        func = (self.env.raw_filters if is_filter else self.env.raw_tests).get(node.name)
        pass_arg = None if func is None else _PassArg.from_obj(func)
        if func is None or pass_arg is _PassArg.context or node.node is None or node.dyn_args or \
                node.dyn_kwargs:
            raise _NotConstant  # Jinja does not fold these either
        args = (self.fold(node.node), *(self.fold(a) for a in node.args))
        # Jinja annotates `kwargs` as Pairs; its parser makes Keywords (a name and a value).
        keywords = cast("list[nodes.Keyword]", node.kwargs)
        kwargs = {kw.key: self.fold(kw.value) for kw in keywords}
        if is_filter:
            what = f"the filter {node.name}"
            _check_int_args(self.budget, args[1:], kwargs, what)
            check = _filter_check(node.name)
            if check is not None:
                args = check(self.budget, types.SimpleNamespace(environment=self.env), args,  # type: ignore[arg-type]
                             kwargs)
        else:
            args = _check_test_args(self.budget, node.name, args, kwargs)
        if pass_arg is _PassArg.eval_context:
            args = (self.eval_ctx, *args)
        elif pass_arg is _PassArg.environment:
            args = (self.env, *args)
        return func(*args, **kwargs)


_NODE_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "*": operator.mul, "/": operator.truediv, "//": operator.floordiv, "**": operator.pow,
    "%": operator.mod, "+": operator.add, "-": operator.sub,
}
_NODE_UNOPS: dict[str, Callable[[Any], Any]] = {"not": operator.not_, "+": operator.pos, "-": operator.neg}
_NODE_CMPOPS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gteq": operator.ge, "lt": operator.lt,
    "lteq": operator.le, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b,
}


# -- tojson, streamed ---------------------------------------------------------------------------
_MAX_JSON_INDENT = 64


def bounded_tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
    """transformers' tojson (json.dumps without HTML escaping), built chunk by chunk against the
    value limit, so indentation or a repeated large value cannot blow it up."""
    budget = current()
    width = len(indent) if isinstance(indent, str) else indent or 0
    if width > _MAX_JSON_INDENT:
        raise RenderLimitError("value_size", f"tojson was given an indent of {width:,} (at most "
                               f"{_MAX_JSON_INDENT})")
    if sort_keys:  # sorts the items of every dict, comparing (key, value) pairs
        what = "tojson(sort_keys=true)"
        cost, widest = _cost_walk(value, budget, what)
        budget.check_operand(cost * max(1, widest.bit_length()), what)
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                               sort_keys=sort_keys)
    if isinstance(value, str):
        return encoder.encode(value)
    chunks, size = [], 0
    for chunk in encoder.iterencode(value):
        size += len(chunk)
        budget.check_size(size, "the filter tojson")
        chunks.append(chunk)
    return "".join(chunks)
