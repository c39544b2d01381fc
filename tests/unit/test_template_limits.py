"""Bounds on single operations of an untrusted chat template that the step counter cannot see.

A comparison, hash, sort or sum is one step for the template but runs in C over its operands, and
repetition (`[a] * 2000`) makes an operand that is small to build and huge to walk. Each attack
here is sized just past the default bound, so before the bound existed it finished quickly with a
wrong result (rendered), and now it stops at the named bound without doing the work. Also: printed
sizes of dict views and mappings, urlize's attributes, the total cost of constant folding, and
the light GGUF header reader that finds a GGUF's chat templates."""

from __future__ import annotations

import re
import struct
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ValidationError
from appliance.runtime import template_limits
from appliance.runtime.template import ChatTemplate, TemplateRenderError, check_gguf_templates
from appliance.runtime.template_limits import RenderLimitError, RenderLimits

USER = [{"role": "user", "content": "hi"}]
M = "messages[0].content"  # "hi": a value the compiler cannot fold, so the render must stop it
Z = "messages[0].content[:0]"  # "", not foldable either
P = 2**61 - 1  # ints i * P all have hash 0: a set or dict of them takes quadratic time
A = "{% set a = [0] * 2000 %}{% set b = [0] * 1999 + [1] %}{% set c = [0] * 2000 %}"
T = "{% set t = (0,) * 2000 %}"
DEEP = "{% set ns = namespace(t=(0,)) %}{% for i in range(21) %}{% set ns.t = (ns.t, ns.t) %}{% endfor %}"


def _refused(source: str, bound: str, *, limits: RenderLimits | None = None,
             compile_time: bool = False) -> TemplateRenderError:
    with pytest.raises(TemplateRenderError) as caught:
        ChatTemplate(source, limits=limits).render(USER)
    assert caught.value.bound == bound, str(caught.value)
    assert ("is refused: the constant expression" in str(caught.value)) == compile_time, str(caught.value)
    return caught.value


# -- 1. single operations over repeated containers ------------------------------------------------
OPERAND_ATTACKS = {  # each visits ~4M items in C: 4x the default operand_size
    "equal": A + "{{ [a] * 2000 == [c] * 2000 }}",
    "less": A + "{{ [a] * 2000 < [c] * 2000 }}",
    "in_list": A + "{{ b in [a] * 2000 }}",
    "not_in_list": A + "{{ b not in [a] * 2000 }}",
    "chained": A + "{{ 1 < 2 < 3 and [a] * 2000 == [c] * 2000 == [a] * 2000 }}",
    "test_eq": A + "{{ ([a] * 2000) is eq([c] * 2000) }}",
    "test_in": A + "{{ b is in([a] * 2000) }}",
    "select_eq": A + "{{ [[a] * 2000] | select('eq', [c] * 2000) | list | length }}",
    "sort": A + "{{ ([a] * 2000) | sort | length }}",
    "unique": T + "{{ ([t] * 2000) | unique | list | length }}",
    "min": A + "{{ ([a] * 2000) | min | length }}",
    "max": A + "{{ ([a] * 2000) | max | length }}",
    "groupby": A + "{{ ([[a]] * 2000) | groupby(0) | length }}",
    "dictsort_by_value": A + "{{ {1: [a] * 1000, 2: [c] * 1000} | dictsort(by='value') | length }}",
    "list_count": A + "{{ ([a] * 2000).count(c) }}",
    "list_index": A + "{{ ([a] * 2000 + [b]).index(b) }}",
    "tuple_count": T + "{{ ([t] * 2000).count(t[:-1] + (0,)) }}",
    "loop_changed": A + "{% for i in range(3) %}{{ loop.changed([a] * 2000 if loop.first else [c] * 2000) }}"
                        "{% endfor %}",
    "hash_getitem": DEEP + "{{ {}[ns.t] is defined }}",
    "hash_in_dict": DEEP + "{{ ns.t in {} }}",
    "hash_dict_literal": DEEP + "{{ {ns.t: 1} | length }}",
    "hash_dict_get": DEEP + "{{ {}.get(ns.t) }}",
    "hash_set_difference": DEEP + "{{ {}.keys() - [ns.t] }}",
    "in_generator": A + "{{ b in ([a] * 2000) | reverse }}",
    "tojson_sort_keys": A + "{{ {'k': [a] * 2000} | tojson(sort_keys=true) | length }}",
}


@pytest.mark.parametrize("name", sorted(OPERAND_ATTACKS))
def test_operations_over_repeated_containers_stop_at_operand_size(name: str) -> None:
    _refused(OPERAND_ATTACKS[name], "operand_size")


def test_the_operand_bound_names_the_operation() -> None:
    error = _refused(OPERAND_ATTACKS["sort"], "operand_size")
    assert "the filter sort" in str(error) and "(limit operand_size)" in str(error)


def test_small_comparisons_sorts_and_hashes_still_work() -> None:
    source = ("{% set a = [3, 1, 2] %}{{ a | sort }}{{ a | unique | list }}{{ a | min }}{{ a | max }}"
              "{{ 2 in a }}{{ a == [3, 1, 2] }}{{ 1 < 2 < 3 }}{{ 'i' in messages[0].content }}"
              "{{ [[1], [2]] | sum(start=[]) }}{{ {'b': 1, 'a': 2} | dictsort }}{{ a.count(3) }}"
              "{{ a.index(2) }}{{ {(1, 2): 'x'}[(1, 2)] }}{{ dict([(1, 2)]) }}{{ (a | reverse) is in(a) }}"
              "{{ 3 in a | reverse }}{% for x in a %}{{ loop.changed(x) }}{% endfor %}"
              "{{ {'x': 1}.keys() - ['x'] }}{{ 'x' is in({'x': 1}) }}")
    assert ChatTemplate(source).render(USER) == (
        "[1, 2, 3][3, 1, 2]13TrueTrueTrueTrue[1, 2][('a', 2), ('b', 1)]12x{1: 2}FalseTrue"
        "TrueTrueTrueset()True")


FLOOD = ("{% set ns = namespace(l=[]) %}{% for i in range(100) %}{% set ns.l = ns.l + [i * " + str(P) +
         "] %}{% endfor %}")  # 100 ints with hash 0
def test_deeply_nested_operands_are_refused() -> None:
    """Hashing a tuple recurses in C without a guard: nested 500,000 deep it crashed the process
    (a template builds that in 500,000 loop steps). Operands nested deeper than Python's recursion
    limit are refused; comparing or printing them raised RecursionError already."""
    nested = "{% set ns = namespace(t=()) %}{% for i in range(2000) %}{% set ns.t = (ns.t,) %}{% endfor %}"
    _refused(nested + "{{ ns.t in {} }}", "operand_size")
    _refused(nested + "{{ {ns.t: 1} | length }}", "operand_size")


HASH_FLOODS = {  # ints i * P share one hash: building a set or dict of n of them is n*n/2 probes
    "unique": FLOOD + "{{ ns.l | unique | list | length }}",
    "dict_call": FLOOD + "{{ dict(ns.l | batch(2) | list) | length }}",
    "fromkeys": FLOOD + "{{ dict.fromkeys(ns.l) | length }}",
    "namespace": FLOOD + "{{ namespace(ns.l | batch(2) | list) is defined }}",
    "dict_literal": "{% set p = " + str(P) + " * (" + M + " | length) %}{{ {"
                    + ", ".join(f"p * {i}: {i}" for i in range(1, 12)) + "} | length }}",
}


@pytest.mark.parametrize("name", sorted(HASH_FLOODS))
def test_many_keys_with_one_hash_are_refused(name: str) -> None:
    error = _refused(HASH_FLOODS[name], "operand_size")
    assert "same hash" in str(error)


def test_equal_keys_are_not_a_hash_flood() -> None:
    source = "{{ ([1, 1.0, true] * 1000) | unique | list }}{{ dict([(1, 'a')] * 50) }}"
    assert ChatTemplate(source).render(USER) == "[1]{1: 'a'}"


def test_a_quadratic_sum_of_lists_stops_at_produced() -> None:
    # each + copies the running list: 10000 lists of one item build 50M items on the way
    _refused(f"{{{{ ([[{M}]] * 10000) | sum(start=[]) | length }}}}", "produced")


def test_heavy_operations_in_a_loop_reach_the_cpu_bound() -> None:
    # every comparison is under operand_size, but their work is counted: the CPU bound is checked
    # between them, not only every 1024 steps
    source = A + "{% for i in range(100) %}{% if [a] * 200 == [c] * 200 %}{% endif %}{% endfor %}"
    with pytest.raises(TemplateRenderError, match=r"\(limit cpu_seconds\)"):
        ChatTemplate(source, limits=RenderLimits(cpu_seconds=0.001)).render(USER)


# -- 2. sizes of dict views, mappings and unknown iterables ---------------------------------------
VIEWS = {
    "values": "{% set d = {'k': [s] * 3} %}{% set t = d.values() ~ '' %}{{ t | length }}",
    "items": "{% set d = {'k': [s] * 3} %}{% set t = d.items() ~ '' %}{{ t | length }}",
    "keys": "{% set d = dict.fromkeys([s ~ 1, s ~ 2, s ~ 3]) %}{% set t = d.keys() ~ '' %}{{ t | length }}",
    "printed": "{% set d = {'k': [s] * 3} %}{{ d.values() }}",
}


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_dict_views_are_measured_before_they_are_printed(name: str) -> None:
    s = f"{{% set s = {M} * 1500000 %}}"  # 3M characters; three of them are more than value_size
    _refused(s + VIEWS[name], "value_size")


def test_escapes_in_printed_strings_are_counted() -> None:
    # repr() writes a control character as \x01: four times its length inside a list
    _refused(f"{{% set s = ({Z} ~ '\\x01') * 4000000 %}}{{{{ [s] }}}}", "value_size")


class _Opaque:
    """An iterable whose printed size the walk cannot know."""

    def __iter__(self) -> Iterator[str]:
        yield "x" * 100

    def __repr__(self) -> str:
        return "x" * 100


def _budget() -> template_limits.Budget:
    return template_limits.Budget(RenderLimits(value_size=1000, operand_size=1000))


def test_text_size_walks_mappings_and_fails_closed_on_unknown_iterables() -> None:
    budget = _budget()
    proxy = types.MappingProxyType({"k": "x" * 2000})
    with pytest.raises(RenderLimitError) as caught:
        template_limits.text_size(proxy, budget, "printing")
    assert caught.value.bound == "value_size"
    assert template_limits.text_size(types.MappingProxyType({"k": "v"}), budget, "printing") > 0
    with pytest.raises(RenderLimitError, match="cannot be measured"):
        template_limits.text_size(_Opaque(), budget, "printing")
    with pytest.raises(RenderLimitError, match="cannot be measured"):
        template_limits.operand_cost(_Opaque(), budget, "a comparison")


def test_known_small_values_are_measured_without_walking_them() -> None:
    budget = _budget()
    for value in (range(10), (x for x in "ab"), reversed([1, 2]), None, 1.5, len, ChatTemplate):
        assert template_limits.text_size(value, budget, "printing") <= 128
        assert template_limits.operand_cost(value, budget, "a comparison") <= 16


# -- 3. urlize --------------------------------------------------------------------------------------
@pytest.mark.parametrize("attribute", ["target", "rel"])
def test_urlize_counts_its_attributes_before_it_builds_links(attribute: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every link repeats the attributes: 100 links with a 200k-character target is 20M characters,
    refused before urlize runs (the result check alone came after building it: with a million
    links, an out-of-memory)."""
    import jinja2.filters
    from jinja2.utils import pass_eval_context

    real = jinja2.filters.FILTERS["urlize"]
    calls: list[str] = []

    @pass_eval_context
    def spy(eval_ctx: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(attribute)
        return real(eval_ctx, *args, **kwargs)

    monkeypatch.setitem(jinja2.filters.FILTERS, "urlize", spy)
    _refused(f"{{% set t = ('www.a.com ' * 100) | urlize({attribute}={M} * 100000) %}}{{{{ t | length }}}}"
             f"{{# {attribute} #}}", "value_size")  # the comment: a source not compiled before
    assert calls == []


def test_urlize_counts_each_word_and_scheme_as_work() -> None:
    source = f"{{{{ (({Z} ~ 'a ') * 200) | urlize(extra_schemes=['x:'] * 100) | length }}}}"
    _refused(source, "steps", limits=RenderLimits(steps=10_000))
    assert ChatTemplate("{{ 'see www.a.com' | urlize(target='_blank') }}").render(USER) == \
        'see <a href="https://www.a.com" rel="noopener" target="_blank">www.a.com</a>'


def test_urlize_refuses_words_long_enough_to_be_quadratic() -> None:
    _refused(f"{{{{ ({M} ~ '(' * 20000 ~ ')' * 20000) | urlize | length }}}}", "operand_size")


# -- 4. constant folding ------------------------------------------------------------------------------
def test_folded_constants_share_one_produced_budget() -> None:
    source = "{{ 'x' * 100000 }}" * 20  # 2M characters in all, each one well under value_size
    _refused(source, "produced", limits=RenderLimits(produced=1 << 20), compile_time=True)


def test_folded_lists_are_weighted_by_their_items() -> None:
    source = "{% set x = [0] * 1000000 %}{% set y = [1] * 1000000 %}"  # 2M small ints
    _refused(source, "produced", limits=RenderLimits(produced=16 << 20), compile_time=True)


def test_a_folded_value_too_large_to_write_out_is_refused() -> None:
    # other environments write a folded constant into the compiled code: 10000 copies of a list
    # of 10000 zeros is 400M characters there
    _refused("{{ [[0] * 10000] * 10000 }}", "value_size", compile_time=True)


@pytest.mark.parametrize("source", [
    "{{ [[0] * 1100] * 1100 == [[0] * 1100] * 1100 }}",
    "{{ [[0] * 1100] * 1100 is eq([[0] * 1100] * 1100) }}",
    "{{ ([[0] * 1000] * 1000) | sort | length }}",
    "{{ [" + ", ".join(str(i * P) for i in range(10)) + "] | unique | list }}",
    "{{ {" + ", ".join(f"{i * P}: {i}" for i in range(10)) + "} }}",
])
def test_folded_comparisons_and_hashes_are_bounded(source: str) -> None:
    _refused(source, "operand_size", compile_time=True)


def test_large_folded_values_are_not_kept() -> None:
    import jinja2.nodes as nodes

    env = template_limits.BoundedEnvironment()
    env.bound_filters()
    tree = env.parse("{{ 'x' * 100000 }}{{ 'y' * 10 }}")
    budget = template_limits.Budget(template_limits.DEFAULT_LIMITS)
    token = template_limits._BUDGET.set(budget)
    try:
        folder = template_limits._Folder(env, budget)
        values = [folder.fold(node) for node in tree.find_all(nodes.BinExpr)]
    finally:
        template_limits._BUDGET.reset(token)
    assert sorted(len(v) for v in values) == [10, 100000]
    kept = [value for ok, value in folder.memo.values() if ok]
    assert "y" * 10 in kept and all(len(v) < 4096 for v in kept if isinstance(v, str))
    assert budget.produced >= 100010


# -- 5. the GGUF header reader -------------------------------------------------------------------
BOMB = "{{ 'x' * 10**10 }}"


def _write_gguf(path: Path, templates: dict[str, Any], *, tokens: int = 3) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(tokens)])
    writer.add_array("tokenizer.ggml.scores", [0.0] * tokens)
    for key, value in templates.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tensor("w", np.zeros(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_templates_are_found_and_checked(tmp_path: Path) -> None:
    good = "{% for m in messages %}{{ m.content }}{% endfor %}"
    check_gguf_templates(_write_gguf(tmp_path / "ok.gguf", {"tokenizer.chat_template": good}))
    for key in ("tokenizer.chat_template", "tokenizer.chat_template.tool_use"):
        path = _write_gguf(tmp_path / "bomb.gguf", {"tokenizer.chat_template": good, key: BOMB})
        with pytest.raises(TemplateRenderError, match=rf"{key}.* is refused: .*\(limit value_size\)"):
            check_gguf_templates(path)
    # llama.cpp keeps only scalar metadata: an array or a number under the key is not a template
    check_gguf_templates(_write_gguf(tmp_path / "array.gguf", {"tokenizer.chat_template": [BOMB],
                                                               "tokenizer.chat_template.n": 3}))


def test_the_gguf_reader_reads_only_the_metadata(tmp_path: Path) -> None:
    """The tensor infos after the metadata are never parsed: damaging them does not hide a bad
    template (gguf's full reader failed on them first)."""
    intact = _write_gguf(tmp_path / "bomb.gguf", {"tokenizer.chat_template": BOMB})
    # the first tensor name's length
    path = _corrupt(intact, tmp_path / "damaged.gguf", _metadata_end(intact), struct.pack("<Q", 1 << 60))
    with pytest.raises(TemplateRenderError, match=r"\(limit value_size\)"):
        check_gguf_templates(path)


def _metadata_end(path: Path) -> int:
    """Where the tensor infos start (gguf's reader, on the intact file)."""
    from gguf import GGUFReader

    return int(GGUFReader(str(path)).tensors[0].field.offset)


def _corrupt(source: Path, path: Path, offset: int, data: bytes) -> Path:
    """A copy of `source` with `data` written over it at `offset`."""
    raw = bytearray(source.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def test_bad_gguf_headers_are_clear_errors_naming_the_file(tmp_path: Path) -> None:
    base = _write_gguf(tmp_path / "base.gguf", {"tokenizer.chat_template": "x"})
    raw = base.read_bytes()
    cases = {
        "not_gguf": b"NOPE" + raw[4:],
        "version": raw[:4] + struct.pack("<I", 99) + raw[8:],
        "big_endian": raw[:4] + struct.pack(">I", 3) + raw[8:],
        "kv_count": raw[:16] + struct.pack("<Q", 1 << 62) + raw[24:],
        "key_length": raw[:24] + struct.pack("<Q", 1 << 62) + raw[32:],
        "truncated": raw[:100],
        "empty": b"",
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with pytest.raises(ValidationError, match=f"^{re.escape(str(path))}: ") as caught:
            check_gguf_templates(path)
        assert not isinstance(caught.value, TemplateRenderError), name


def test_gguf_string_and_array_lengths_are_bounded(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "t.gguf", {"tokenizer.chat_template": "hello"})
    raw = path.read_bytes()
    at = raw.index(b"tokenizer.chat_template") + len("tokenizer.chat_template") + 4
    huge = _corrupt(path, tmp_path / "huge.gguf", at, struct.pack("<Q", 1 << 40))
    with pytest.raises(ValidationError, match=f"^{re.escape(str(huge))}: "):
        check_gguf_templates(huge)
    tokens = raw.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8  # item type, count
    many = _corrupt(path, tmp_path / "many.gguf", tokens, struct.pack("<Q", 1 << 61))
    with pytest.raises(ValidationError, match=f"^{re.escape(str(many))}: .*truncated"):
        check_gguf_templates(many)


def test_a_template_longer_than_the_source_limit_is_refused_unread(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "long.gguf", {"tokenizer.chat_template": "x" * ((4 << 20) + 1)})
    with pytest.raises(TemplateRenderError, match=r"chat_template is refused.*\(limit source_chars\)"):
        check_gguf_templates(path)


def test_a_template_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "t.gguf", {"tokenizer.chat_template": "hello"})
    raw = path.read_bytes()
    at = raw.index(b"hello")
    bad = _corrupt(path, tmp_path / "bad.gguf", at, b"\xff")
    with pytest.raises(ValidationError, match=f"^{re.escape(str(bad))}: tokenizer.chat_template is not UTF"):
        check_gguf_templates(bad)


class _Cancelled(BaseException):
    pass


def test_the_gguf_reader_never_swallows_an_interruption(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.runtime import template

    path = _write_gguf(tmp_path / "t.gguf", {"tokenizer.chat_template": "x"}, tokens=1000)
    calls = 0
    real = template._GGUFReader._fill

    def interrupted(self: Any, n: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise _Cancelled
        real(self, n)

    monkeypatch.setattr(template._GGUFReader, "_fill", interrupted)
    monkeypatch.setattr(template, "_GGUF_CHUNK", 64)
    with pytest.raises(_Cancelled):
        check_gguf_templates(path)


def test_gguf_metadata_matches_ggufs_reader_on_a_real_model(capsys: pytest.CaptureFixture[str]) -> None:
    """The embedded SmolLM2 GGUF: same chat template and architecture as gguf's full reader."""
    from gguf import GGUFReader

    from appliance import stack
    from appliance.errors import NotFoundError
    from appliance.runtime.template import gguf_metadata

    try:
        path = stack.default_model_path()
    except NotFoundError:
        pytest.skip("the embedded model is not installed")
    fields = GGUFReader(str(path)).fields
    meta = gguf_metadata(path, lambda key: key.startswith(("general.", "tokenizer.chat_template",
                                                           "llama.")))
    assert meta["tokenizer.chat_template"] == fields["tokenizer.chat_template"].contents()
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == fields["llama.context_length"].contents()
    from appliance.runtime.template import GGUFArray

    # arrays are skipped: a wanted one comes back as its length
    assert gguf_metadata(path, lambda key: True)["tokenizer.ggml.tokens"] == \
        GGUFArray(len(fields["tokenizer.ggml.tokens"].data))
    started = time.perf_counter()
    check_gguf_templates(path)
    with capsys.disabled():
        print(f"\ncheck_gguf_templates({path.name}): {time.perf_counter() - started:.3f} s")
