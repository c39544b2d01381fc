"""An fp16 or int4-cuda ONNX export on CUDA: the same greedy answer as on the CPU (or
within the parity gate's agreement), the KV cache kept on the device between steps (IO binding),
stops on its stop tokens, and `appliance serve --gpu` answers a request with the model on the GPU.

Skipped unless onnxruntime here has its CUDA provider (onnxruntime-gpu; CI's CPU onnxruntime has
none). The models: $APPLIANCE_GPU_TEST_ONNX, exports of the real SmolLM2 separated by ':' (a GPU
host makes them with `python3 bench/onnx_gpu.py smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf
--out DIR [--graph optimum | --precision int4-cuda]`): the export stage's genai-built graphs (fp16,
and int4-cuda: the same graph with int4 MatMulNBits weights) run through onnxruntime-genai,
optimum's through onnxruntime with IO binding. On a GPU host:
`APPLIANCE_GPU_TEST_ONNX=DIR1:DIR2 python -m pytest tests/gpu/test_onnx_gpu.py -q -s`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gpu.serving import ask_on_the_gpu, served

ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("needs onnxruntime-gpu (this onnxruntime has no CUDA provider)", allow_module_level=True)

from appliance.runtime.engine import Artifact, Delta, Done, Sampling  # noqa: E402
from appliance.runtime.engines import open_engine  # noqa: E402

pytestmark = pytest.mark.gpu
PROMPTS = [[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
           [{"role": "user", "content": "Write a short poem about the sea."}]]


def _folders() -> list[str]:
    return [f for f in os.environ.get("APPLIANCE_GPU_TEST_ONNX", "").split(os.pathsep) if f]


@pytest.fixture(scope="module", params=_folders() or [""])
def folder(request: pytest.FixtureRequest) -> Path:
    if not request.param:
        pytest.skip("set APPLIANCE_GPU_TEST_ONNX to fp16 ONNX exports (bench/onnx_gpu.py smollm2)")
    return Path(request.param)


Answers = list[tuple[list[int], str]]


def _greedy(folder: Path, gpu: bool, max_tokens: int = 48) -> tuple[Answers, list[list[int]]]:
    """The answers' ids and finish reasons, and the prompts' ids."""
    engine = open_engine(Artifact(folder.name, "onnx", folder, "unknown"), gpu=gpu, context_length=2048)
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
        if gpu:
            _check_the_cache_stays_on_the_card(engine)
        return out, [engine.prompt_ids(m) for m in PROMPTS]
    finally:
        engine.close()


def _check_the_cache_stays_on_the_card(engine: object) -> None:
    """A genai-built folder runs through genai's generator (its KV buffer on the device, CUDA
    graphs); another one through onnxruntime with the cache bound on the device (IO binding)."""
    from appliance.runtime.genai_lm import GenaiLM

    lm = engine.lm  # type: ignore[attr-defined]
    if (Path(engine.folder) / "genai_config.json").is_file():  # type: ignore[attr-defined]
        assert isinstance(lm, GenaiLM) and lm.device == "cuda" and lm.cuda_graph
        return
    assert lm.bind
    devices = {t.device_name().lower() for t in engine._cache.tensors.values()}  # type: ignore[attr-defined]
    assert devices == {"cuda"}, devices


def _teacher_forced_agreement(folder: Path, ids: list[int]) -> float:
    """Share of positions where CUDA's argmax equals the CPU's on the same tokens (the parity gate's
    agreement: each position judged on the same prefix, so one near-tie does not end it)."""
    from export.onnx import OnnxLM

    a = OnnxLM(folder).logits(ids).argmax(-1)
    b = OnnxLM(folder, providers=["CUDAExecutionProvider"]).logits(ids).argmax(-1)
    return float((a == b).mean())


def test_greedy_tokens_on_the_gpu_are_the_cpu_s(folder: Path) -> None:
    (cpu, prompts), (gpu, _) = _greedy(folder, False), _greedy(folder, True)
    for (c, c_reason), (g, g_reason), prompt in zip(cpu, gpu, prompts, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(c, g, strict=False)) if a != b), min(len(c), len(g)))
        agreement = _teacher_forced_agreement(folder, prompt + c)
        print(f"\ncpu {len(c)} tokens ({c_reason}), gpu {len(g)} tokens ({g_reason}), identical for "
              f"{same}; teacher-forced argmax agreement {agreement:.3f}")
        assert g and c[0] == g[0]
        assert agreement >= 0.9  # the parity gate's greedy-agreement bar: CUDA sums in another order


def test_it_stops_on_its_stop_tokens_on_the_gpu(folder: Path) -> None:
    (ids, reason), _ = _greedy(folder, True, max_tokens=400)[0]
    assert reason == "stop" and 0 < len(ids) < 400


@pytest.fixture
def server(folder: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    with served(folder, tmp_path / "ws") as url_key:
        yield url_key


def test_serve_answers_with_the_model_on_the_gpu(server: tuple[str, str]) -> None:
    answer = ask_on_the_gpu(*server, PROMPTS[0])
    print("\n" + answer)
    assert answer.strip()
