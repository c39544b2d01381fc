"""A GGUF through llama.cpp's CUDA backend: the same greedy tokens as on the CPU, stops on its stop
tokens, and `appliance serve --gpu` answers a request with the model on the GPU.

Skipped unless llama.cpp here can offload to a GPU (a CUDA build: `scripts/gpu_llama_build.sh`, loaded
through LLAMA_CPP_LIB_PATH; CI's CPU build cannot). The model: $APPLIANCE_GPU_TEST_GGUF, else the
embedded SmolLM2 (`appliance models import --default` needs it installed). On a GPU host:
`python -m pytest tests/gpu/test_runtime_gpu.py -q -s`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gpu.serving import ask_on_the_gpu, served

llama_cpp = pytest.importorskip("llama_cpp")
if not llama_cpp.llama_supports_gpu_offload():
    pytest.skip("needs a llama.cpp build with a GPU backend (this one has none)", allow_module_level=True)

from appliance.runtime.engine import Artifact, Delta, Done, Sampling  # noqa: E402
from appliance.runtime.engines import open_engine  # noqa: E402

pytestmark = pytest.mark.gpu
PROMPTS = [[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
           [{"role": "user", "content": "Write a short poem about the sea."}]]


@pytest.fixture(scope="module")
def gguf() -> Path:
    given = os.environ.get("APPLIANCE_GPU_TEST_GGUF")
    if given:
        return Path(given)
    from appliance import stack
    from appliance.errors import NotFoundError

    try:
        return stack.default_model_path()
    except NotFoundError:
        pytest.skip("no GGUF: set APPLIANCE_GPU_TEST_GGUF or install the embedded model")


def _greedy(path: Path, gpu: bool, max_tokens: int = 48) -> list[tuple[list[int], str]]:
    engine = open_engine(Artifact(path.stem, "gguf", path, "unknown"), gpu=gpu, context_length=2048)
    try:
        assert engine.gpu is gpu  # type: ignore[attr-defined]
        out = []
        for messages in PROMPTS:
            ids, reason = [], ""
            for item in engine.generate(messages, Sampling(temperature=0.0, max_tokens=max_tokens)):
                if isinstance(item, Delta) and item.token_id >= 0:
                    ids.append(item.token_id)
                elif isinstance(item, Done):
                    reason = item.reason
            out.append((ids, reason))
        return out
    finally:
        engine.close()


def _teacher_forced_agreement(path: Path, ids: list[int]) -> float:
    """Share of positions where the GPU's argmax equals the CPU's on the same tokens (the parity
    gate's agreement: each position judged on the same prefix, so one near-tie does not end it)."""
    from export.gguf import GgufLM

    with GgufLM(path, n_ctx=2048) as cpu:
        a = cpu.logits(ids).argmax(-1)
    with GgufLM(path, n_ctx=2048, n_gpu_layers=-1) as gpu:
        b = gpu.logits(ids).argmax(-1)
    return float((a == b).mean())


def test_greedy_tokens_on_the_gpu_are_the_cpu_s(gguf: Path) -> None:
    cpu, gpu = _greedy(gguf, False), _greedy(gguf, True)
    engine = open_engine(Artifact(gguf.stem, "gguf", gguf, "unknown"), gpu=False, context_length=2048)
    try:
        prompts = [engine.prompt_ids(m) for m in PROMPTS]
    finally:
        engine.close()
    for (c, c_reason), (g, g_reason), prompt in zip(cpu, gpu, prompts, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(c, g, strict=False)) if a != b), min(len(c), len(g)))
        agreement = _teacher_forced_agreement(gguf, prompt + c)
        print(f"\ncpu {len(c)} tokens ({c_reason}), gpu {len(g)} tokens ({g_reason}), identical for "
              f"{same}; teacher-forced argmax agreement {agreement:.3f}")
        assert g and c[0] == g[0]
        assert agreement >= 0.9  # the parity gate's greedy-agreement bar: CUDA sums in another order


def test_it_stops_on_its_stop_tokens_on_the_gpu(gguf: Path) -> None:
    (ids, reason), _ = _greedy(gguf, True, max_tokens=400)
    assert reason == "stop" and 0 < len(ids) < 400


@pytest.fixture
def server(gguf: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    with served(gguf, tmp_path / "ws") as url_key:
        yield url_key


def test_serve_answers_with_the_model_on_the_gpu(server: tuple[str, str]) -> None:
    answer = ask_on_the_gpu(*server, PROMPTS[0])
    print("\n" + answer)
    assert answer.strip()
