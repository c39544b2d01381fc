"""`logit_bias` on both real engines: llama.cpp's logit-bias sampler for GGUF (the embedded
SmolLM2) and numpy for ONNX (a tiny random Llama exported by the pipeline's exporter). A bias of
-100 on the token greedy decoding picks moves it off that token, +100 on another token picks that
one, and a token id outside the vocabulary is refused before any output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import stack
from appliance.errors import ValidationError
from appliance.runtime.engines import ChatEngine, Delta, Sampling, open_engine, resolve
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module", params=["gguf", "onnx"])
def engine(request: pytest.FixtureRequest, module_tmp: ModuleTemp) -> Iterator[ChatEngine]:
    if request.param == "gguf":
        art = resolve(str(stack.default_model_path()))
    else:
        from export.onnx import export_onnx

        source: Path = request.getfixturevalue("tiny_llama_source")
        out = module_tmp.mktemp("bias") / "onnx-fp32"
        export_onnx(source, out, "fp32")
        art = resolve(str(out))
    eng = open_engine(art, threads=2, context_length=256)
    yield eng
    eng.close()


def first_token(eng: ChatEngine, **bias: float) -> int:
    sampling = Sampling(temperature=0.0, max_tokens=1, logit_bias=tuple((int(t), b) for t, b in bias.items()))
    return next(d.token_id for d in eng.generate(QUESTION, sampling) if isinstance(d, Delta))


def test_minus_100_moves_greedy_off_the_token_and_plus_100_picks_one(engine: ChatEngine) -> None:
    greedy = first_token(engine)
    assert first_token(engine, **{str(greedy): -100.0}) != greedy
    other = (greedy + 1000) % engine.vocab_size
    assert first_token(engine, **{str(other): 100.0}) == other
    assert first_token(engine) == greedy  # nothing stays behind in the engine


def test_a_token_outside_the_vocabulary_is_refused_before_output(engine: ChatEngine) -> None:
    with pytest.raises(ValidationError, match="vocabulary"):
        engine.generate(QUESTION, Sampling(temperature=0.0, logit_bias=((engine.vocab_size, 1.0),)))
