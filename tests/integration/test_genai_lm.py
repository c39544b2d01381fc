"""onnxruntime-genai's generator behind the ONNX engine (appliance/runtime/genai_lm.py), on the
real genai runtime with its CPU provider (CI has no GPU; tests/gpu/test_onnx_gpu.py runs it on
CUDA): the same logits and greedy tokens as onnxruntime on the same genai-built graph, and the
engine's loop (prompt-cache reuse by rewinding, sampling, stops) unchanged on top of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.runtime.engine import Artifact, Delta, Sampling
from appliance.runtime.genai_lm import GenaiCache, GenaiLM, usable
from appliance.runtime.onnx_engine import OnnxEngine
from export.onnx import OnnxLM, export_onnx
from tests.tmpdirs import ModuleTemp

pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.integration
IDS = [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def fp16(module_tmp: ModuleTemp, tiny_llama_source: Path) -> Path:
    folder = module_tmp.mktemp("genai") / "fp16"
    export_onnx(tiny_llama_source, folder, "fp16")
    return folder


def test_steps_match_onnxruntime_on_the_same_graph(fp16: Path) -> None:
    lm, reference = GenaiLM(fp16, 256, device="cpu"), OnnxLM(fp16, threads=2)
    logits, cache = lm.forward(IDS[:10], lm.empty_cache())
    logits, cache = lm.forward(IDS[10:], cache)
    assert cache == GenaiCache(len(IDS)) and logits.shape == (1, reference.logits(IDS).shape[1])
    assert np.abs(logits[0] - reference.logits(IDS)[-1]).max() < 2e-3
    assert lm.generate(IDS, 12, []) == reference.generate(IDS, 12, [])
    # a step that does not continue where the generator stands rewinds it first
    again, _ = lm.forward(IDS[5:], cache.cut(5))
    assert np.abs(again[0] - reference.logits(IDS)[-1]).max() < 2e-3
    with pytest.raises(Exception, match="whole-sequence logits"):
        lm.logits(IDS)
    with pytest.raises(Exception, match="do not fit the context of 256"):
        lm.forward(list(range(300)), lm.empty_cache())


def test_the_engine_answers_the_same_through_genai(fp16: Path) -> None:
    chats = [[{"role": "user", "content": "Hello there"}],
             [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"},
              {"role": "user", "content": "Tell me more"}],
             [{"role": "user", "content": "Something else entirely"}]]
    settings = [Sampling(temperature=0.0, max_tokens=10), Sampling(temperature=0.8, max_tokens=10, seed=7),
                Sampling(temperature=0.0, max_tokens=6, logit_bias=((42, 5.0),))]

    def answers(engine: OnnxEngine) -> list[list[int]]:
        out = []
        for chat, sampling in zip(chats, settings, strict=True):
            out.append([d.token_id for d in engine.generate(chat, sampling) if isinstance(d, Delta)])
        return out

    artifact = Artifact(fp16.name, "onnx", fp16, "unknown")
    plain = OnnxEngine(artifact, gpu=False, context_length=256)
    through_genai = OnnxEngine(artifact, gpu=False, context_length=256)
    through_genai.lm = GenaiLM(fp16, 256, device="cpu")
    through_genai._cache = through_genai.lm.empty_cache()
    assert answers(through_genai) == answers(plain)


def test_only_genai_built_folders_with_cuda_go_through_it(fp16: Path, tmp_path: Path) -> None:
    import onnxruntime_genai as og

    assert usable(fp16) is bool(og.is_cuda_available())  # the CPU package has no CUDA: False in CI
    assert usable(tmp_path) is False
