"""Both chat engines on real SmolLM2 artifacts: a Q8_0 GGUF through llama.cpp and an fp32 ONNX
export through onnxruntime, made from the imported default model by the exporters the pipeline
uses (Q8_0 and fp32 are the types the parity gate passes on SmolLM2; docs/PITFALLS.md has why a
4-bit type may answer differently). Checked: prompt ids equal to training's rendering, the same
greedy answer from both, EOS and stop strings, max_tokens, seeds, context overflow, cancel, the
KV-cache reuse between turns, the parity-failed refusal, and no torch/transformers at run time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import chat
from appliance.errors import ApplianceError, RefusedError
from appliance.runtime.engine import (
    Artifact,
    ChatEngine,
    ContextOverflow,
    Delta,
    Done,
    Sampling,
)
from appliance.runtime.engines import open_engine, resolve
from appliance.workspace import ArtifactRecord, Workspace
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]
GREEDY = Sampling(temperature=0.0, max_tokens=32)
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def artifacts(smol_model: ArtifactRecord, module_tmp: ModuleTemp) -> dict[str, Artifact]:
    from export import gguf
    from export.onnx import export_onnx

    root = module_tmp.mktemp("runtime")
    start = time.monotonic()
    path = gguf.convert(smol_model.path, root / "smollm2-Q8_0.gguf", outtype="q8_0")
    TIMINGS["GGUF Q8_0 conversion"] = time.monotonic() - start
    start = time.monotonic()
    export_onnx(smol_model.path, root / "onnx-fp32", "fp32")
    TIMINGS["ONNX fp32 export"] = time.monotonic() - start
    return {"gguf": resolve(str(path)), "onnx": resolve(str(root / "onnx-fp32"))}


@pytest.fixture(scope="module")
def engines(artifacts: dict[str, Artifact]) -> Iterator[dict[str, ChatEngine]]:
    opened = {kind: open_engine(artifact, threads=1) for kind, artifact in artifacts.items()}
    yield opened
    for engine in opened.values():
        engine.close()


@pytest.fixture(scope="module", autouse=True)
def _report_timings() -> Iterator[None]:
    yield
    print("\n" + "\n".join(f"  {k}: {v:.1f} s" for k, v in TIMINGS.items()))


def _answer(engine: ChatEngine, messages: list[dict[str, str]], sampling: Sampling = GREEDY,
            cancel: threading.Event | None = None) -> tuple[str, list[int], Done]:
    items = list(engine.generate(messages, sampling, cancel))
    deltas = [d for d in items if isinstance(d, Delta)]
    assert isinstance(items[-1], Done) and items[:-1] == deltas
    return "".join(d.text for d in deltas), [d.token_id for d in deltas if d.token_id >= 0], items[-1]


KINDS = ["gguf", "onnx"]


def test_artifacts_and_engines_describe_themselves(engines: dict[str, ChatEngine],
                                                   artifacts: dict[str, Artifact]) -> None:
    assert artifacts["gguf"].kind == "gguf" and artifacts["gguf"].parity == "unknown"
    assert artifacts["onnx"].path.name == "onnx-fp32" and artifacts["onnx"].kind == "onnx"
    for kind, engine in engines.items():
        assert engine.kind == kind and engine.context_length == 8192  # SmolLM2's trained context
        assert 2 in engine.stop_ids  # type: ignore[attr-defined]  # <|im_end|>


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_ids_are_the_ids_training_used(engines: dict[str, ChatEngine], smol_tokenizer: Any,
                                              kind: str) -> None:
    conversation = [{"role": "system", "content": "Réponds brièvement.  \n\tOK?"},
                    {"role": "user", "content": "Prix : 1234,50 € — naïve café 😀"},
                    {"role": "assistant", "content": "D'accord.\n\n- un\n- deux"},
                    {"role": "user", "content": "x = [1, 22, 333];  // done"}]
    text = chat.render(smol_tokenizer, conversation, generation_prompt=True)
    expected = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert engines[kind].prompt_ids(conversation) == expected
    answer = {"role": "assistant", "content": "Voilà."}
    trained = chat.render_and_mask(smol_tokenizer, [*conversation, answer], ["<|im_end|>"])
    assert trained.input_ids[:len(expected)] == expected  # the prompt is what training saw before it
    defaulted = [{"role": "user", "content": "Hi"}]  # the template's default system prompt
    assert engines[kind].prompt_ids(defaulted) == smol_tokenizer.apply_chat_template(
        defaulted, add_generation_prompt=True)


def test_both_engines_give_the_same_greedy_answer(engines: dict[str, ChatEngine]) -> None:
    results = {kind: _answer(engine, QUESTION) for kind, engine in engines.items()}
    text, ids, done = results["gguf"]
    assert text == ANSWER and "<|im_end|>" not in text
    assert done == Done("stop", 27, len(ids))  # stopped on EOS, which is not counted or shown
    assert results["onnx"] == results["gguf"]


@pytest.mark.parametrize("kind", KINDS)
def test_stop_strings_and_max_tokens(engines: dict[str, ChatEngine], kind: str) -> None:
    engine = engines[kind]
    text, _, done = _answer(engine, QUESTION, Sampling(temperature=0.0, stop=("Paris",)))
    assert (text, done.reason, done.completion_tokens) == ("The capital of France is ", "stop", 6)
    text, _, done = _answer(engine, QUESTION, Sampling(temperature=0.0, stop=("ce is P", "never")))
    assert (text, done.reason) == ("The capital of Fran", "stop")  # a stop string across tokens
    text, ids, done = _answer(engine, QUESTION, Sampling(temperature=0.0, max_tokens=3))
    assert (text, done) == ("The capital of", Done("length", 27, 3)) and len(ids) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_a_seed_reproduces_a_sampled_answer(engines: dict[str, ChatEngine], kind: str) -> None:
    def sample(seed: int) -> str:
        sampling = Sampling(temperature=1.0, top_k=40, top_p=0.9, repeat_penalty=1.1, seed=seed,
                            max_tokens=24)
        return _answer(engines[kind], HAIKU, sampling)[0]

    first = sample(11)
    assert sample(11) == first
    assert len({first, sample(12), sample(13)}) > 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_reused_cache_gives_the_answer_a_fresh_one_gives(engines: dict[str, ChatEngine], kind: str) -> None:
    engine = engines[kind]
    follow_up = [*QUESTION, {"role": "assistant", "content": ANSWER},
                 {"role": "user", "content": "And the capital of Germany?"}]
    _answer(engine, QUESTION)
    after_its_prefix = _answer(engine, follow_up)  # most of the prompt is already in the cache
    _answer(engine, HAIKU)  # shares only the template's first tokens
    assert _answer(engine, follow_up) == after_its_prefix
    assert "Berlin" in after_its_prefix[0]


@pytest.mark.parametrize("kind", KINDS)
def test_context_overflow_is_raised_before_any_output(engines: dict[str, ChatEngine], kind: str) -> None:
    engine = engines[kind]
    with pytest.raises(ContextOverflow) as err:
        engine.generate(QUESTION, Sampling(max_tokens=8192 - 26))
    assert (err.value.prompt_tokens, err.value.max_tokens, err.value.context_length) == (27, 8166, 8192)
    long = [{"role": "user", "content": "word " * 8200}]
    with pytest.raises(ContextOverflow, match="no room left for an answer"):
        engine.generate(long, Sampling())
    assert _answer(engine, QUESTION, Sampling(temperature=0.0, max_tokens=8192 - 27))[0] == ANSWER


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_stops_at_the_next_token_and_the_engine_goes_on(engines: dict[str, ChatEngine],
                                                               kind: str) -> None:
    engine = engines[kind]
    cancel = threading.Event()
    stream = engine.generate(HAIKU, Sampling(temperature=0.0, max_tokens=64), cancel)
    first = next(stream)
    cancel.set()
    assert isinstance(first, Delta) and list(stream) == [Done("cancelled", 38, 1)]
    cancel.set()  # still set: the prompt is not even read
    assert list(engine.generate(QUESTION, GREEDY, cancel)) == [Done("cancelled", 27, 0)]
    assert _answer(engine, QUESTION)[0] == ANSWER


def test_a_context_smaller_than_training_is_enforced(artifacts: dict[str, Artifact]) -> None:
    engine = open_engine(artifacts["gguf"], threads=1, context_length=32)
    try:
        text, _, done = _answer(engine, QUESTION, Sampling(temperature=0.0))  # the rest: 5 tokens
        assert (text, done) == ("The capital of France is", Done("length", 27, 5))
        with pytest.raises(ContextOverflow):
            engine.generate(QUESTION, Sampling(max_tokens=6))
    finally:
        engine.close()
    with pytest.raises(ApplianceError, match="more than the model was trained on"):
        open_engine(artifacts["gguf"], context_length=16384)


def test_a_workspace_export_is_gated_on_parity(artifacts: dict[str, Artifact], tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws").ensure()
    for name, status in (("demo-gguf-q8_0", "ready"), ("demo-gguf-q2_k", "failed")):
        with ws.writer("export", name) as w:
            os.link(artifacts["gguf"].path, w.path / "demo-Q8_0.gguf")
            (w.path / "gguf_check.json").write_text(json.dumps({"stop_token_ids": [2]}))
            w.commit(config={"format": "gguf", "type": "Q8_0", "run": "demo"}, status=status,
                     info={"summary": {"format": "gguf", "file": "demo-Q8_0.gguf"}},
                     metrics={"parity": {"passed": status == "ready"}})
    assert resolve("demo-gguf-q8_0", ws).parity == "pass"
    with pytest.raises(RefusedError, match="'demo-gguf-q2_k' failed its parity gate") as err:
        resolve("demo-gguf-q2_k", ws)
    assert "--allow-failed-parity" in (err.value.hint or "")
    allowed = resolve("demo-gguf-q2_k", ws, allow_failed_parity=True)
    assert allowed.parity == "fail"
    engine = open_engine(allowed, threads=1)
    try:
        assert _answer(engine, QUESTION)[0] == ANSWER
    finally:
        engine.close()


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_required_without_one_is_a_clear_error(artifacts: dict[str, Artifact], kind: str) -> None:
    import llama_cpp
    import onnxruntime

    has = {"gguf": llama_cpp.llama_supports_gpu_offload(),
           "onnx": "CUDAExecutionProvider" in onnxruntime.get_available_providers()}[kind]
    if has:
        pytest.skip("this build has a GPU path")
    with pytest.raises(ApplianceError, match=r"GPU|CUDA") as err:
        open_engine(artifacts[kind], gpu=True)
    assert err.value.hint


def test_a_cuda_provider_that_cannot_start_is_refused_or_left_for_the_cpu(
        artifacts: dict[str, Artifact], monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime lists CUDA but starts a session on the CPU when the provider cannot load (a missing
    cuDNN): --gpu is refused, naming it; the default (no flag) runs on the CPU, saying so in the log."""
    import onnxruntime

    real = onnxruntime.InferenceSession
    preloaded: list[bool] = []

    def falls_back(path: str, options: Any = None, providers: list[str] | None = None) -> Any:
        return real(path, options, providers=[p for p in providers or [] if p != "CUDAExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", falls_back)
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: preloaded.append(True))
    with pytest.raises(ApplianceError, match="could not start CUDAExecutionProvider") as err:
        open_engine(artifacts["onnx"], gpu=True, threads=1)
    assert "cuDNN" in (err.value.hint or "") and preloaded
    engine = open_engine(artifacts["onnx"], threads=1)
    try:
        assert engine.gpu is False  # type: ignore[attr-defined]
        assert _answer(engine, QUESTION)[0] == ANSWER
    finally:
        engine.close()


def test_the_runtime_runs_without_torch_or_transformers(artifacts: dict[str, Artifact]) -> None:
    code = ("import json, sys\nfrom pathlib import Path\n"
            "from appliance.runtime.engines import Artifact, Sampling, open_engine\n"
            "out = {}\n"
            f"for kind, path in {[(a.kind, str(a.path)) for a in artifacts.values()]!r}:\n"
            "    engine = open_engine(Artifact(kind, kind, Path(path), 'unknown'), threads=1)\n"
            "    items = list(engine.generate([{'role': 'user', 'content': 'Hi'}],"
            " Sampling(temperature=0.7, seed=1, max_tokens=4, top_p=0.9, top_k=20, repeat_penalty=1.1)))\n"
            "    out[kind] = items[-1].completion_tokens\n"
            "print(json.dumps([out, sorted({n.split('.')[0] for n in sys.modules})]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True)
    done, loaded = json.loads(run.stdout.splitlines()[-1])
    assert done == {"gguf": 4, "onnx": 4}
    assert {"llama_cpp", "onnxruntime", "tokenizers", "jinja2"} <= set(loaded)
    assert not set(loaded) & {"torch", "transformers", "optimum", "onnx"}, sorted(loaded)
