"""The CUDA-graphed micro-batch (graphed.Steps) on a GPU, on the tiny Llama with LoRA dropout:
a replay with the same seed gives the same gradients and another seed others (the masks are drawn
on the device, not captured); a replay gives the eager step's gradients for the same padded batch
and seed (the same kernels); a shape captured in the middle of an accumulation keeps what was
accumulated. Each with the checkpointed layer inputs kept on the GPU and offloaded to host memory
(offload.py's copies captured in the graph). Skipped without CUDA (CI has none)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (none found)", allow_module_level=True)
pytest.importorskip("triton")

from appliance.stages.train import fastlora, graphed  # noqa: E402
from appliance.stages.train.config import validate  # noqa: E402
from appliance.stages.train.recipe import load_model  # noqa: E402
from tests.conftest import randomize_lora_b  # noqa: E402

pytestmark = pytest.mark.gpu
CHUNK = 64


@pytest.fixture(params=[False, True], ids=["kept", "offloaded"])
def model(tiny_llama_source: Path, request: pytest.FixtureRequest):
    cfg = validate({"quantization": "nf4", "lora_dropout": 0.1, "lora_r": 8, "lora_alpha": 16,
                    "seed": 5, "cuda_graphs": "on", "offload_activations": request.param})
    model = load_model(tiny_llama_source, cfg, "cuda", torch.bfloat16)
    randomize_lora_b(model)
    return model.train()


def _batch(length: int) -> tuple:
    ids = torch.randint(3, 49152, (2, length), generator=torch.Generator().manual_seed(length)).cuda()
    labels = ids.clone()
    labels[:, : length // 3] = -100  # the prompt
    return ids, labels


def _grads(model) -> dict:
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _zero(model) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()


def test_replays_draw_the_masks_of_their_seed(model) -> None:
    steps = graphed.Steps(model, 2, 0, CHUNK)
    ids, labels = _batch(40)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        steps(ids, labels, 1.0)
        torch.cuda.synchronize()
        runs.append(_grads(model))
        _zero(model)
    def gap(a: dict, b: dict) -> float:  # attention's backward may add in any order: not bitwise
        return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in b)

    assert gap(runs[0], runs[1]) < 1e-3  # the same seed: the same masks
    assert gap(runs[0], runs[2]) > 1e-2  # another seed: other masks, not the captured ones


def test_a_replay_gives_the_eager_gradients(model) -> None:
    steps = graphed.Steps(model, 2, 0, CHUNK)
    ids, labels = _batch(40)
    torch.manual_seed(7)
    total, count = steps(ids, labels, 1.0)
    replayed, replayed_loss = _grads(model), float(total / count)
    _zero(model)
    padded = graphed.pad(ids, labels, 2, graphed.bucket(40), 0)
    torch.manual_seed(7)
    fastlora.new_dropout_seed("cuda")  # what a replay draws before it runs
    total, count = graphed.dense_loss(model, *padded, CHUNK)
    total.backward()
    eager = _grads(model)
    assert float(total / count) == pytest.approx(replayed_loss, rel=1e-3)
    for name in eager:
        err = float((replayed[name] - eager[name]).norm() / eager[name].norm())
        assert err < 1e-2, (name, err)


def test_a_shape_captured_mid_accumulation_keeps_the_earlier_gradients(model) -> None:
    steps = graphed.Steps(model, 2, 0, CHUNK)
    short, long = _batch(40), _batch(150)
    torch.manual_seed(3)
    steps(*short, 1.0)
    torch.manual_seed(4)
    steps(*long, 1.0)  # captured now, with the short batch's gradients in .grad
    both = _grads(model)
    _zero(model)
    parts = []
    for seed, batch in ((3, short), (4, long)):  # both graphs exist now: replays only
        torch.manual_seed(seed)
        steps(*batch, 1.0)
        parts.append(_grads(model))
        _zero(model)
    assert len(steps.graphs) == 2
    for name in both:
        want = parts[0][name] + parts[1][name]
        err = float((both[name] - want).norm() / want.norm())
        assert err < 1e-3, (name, err)
