"""The CUDA-graphed step's loss (graphed.dense_loss: every position, no attention mask, no host
read) is the training loop's loss: the same value, count and adapter gradients as
recipe.causal_lm_loss on a right-padded batch with prompt positions ignored; batches are padded to
a few shapes; `cuda_graphs = on` is refused where a graph cannot hold the run. The capture itself
needs CUDA: tests/gpu/test_train_gpu.py trains with it, and bench/train_throughput.py measures it."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from appliance.stages.train import graphed  # noqa: E402
from appliance.stages.train.config import validate  # noqa: E402
from appliance.stages.train.recipe import causal_lm_loss, load_model  # noqa: E402
from tests.conftest import randomize_lora_b  # noqa: E402


def _model(folder: Path, dropout: float = 0.0):
    cfg = validate({"quantization": "none", "lora_dropout": dropout, "lora_r": 8, "lora_alpha": 16,
                    "seed": 5})
    model = load_model(folder, cfg, "cpu", torch.float32)
    randomize_lora_b(model)
    return model.train()


def test_the_dense_loss_is_the_training_loss_on_a_padded_batch(tiny_llama_source: Path) -> None:
    model = _model(tiny_llama_source)
    ids = torch.randint(3, 49152, (2, 20), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt
    mask = torch.ones_like(ids)
    ids[1, 15:], labels[1, 15:], mask[1, 15:] = 0, -100, 0  # right padding
    results = []
    for dense in (False, True):
        model.zero_grad(set_to_none=True)
        if dense:
            total, count = graphed.dense_loss(model, ids, labels, chunk=7)
        else:
            total, count = causal_lm_loss(model, {"input_ids": ids, "labels": labels, "attention_mask": mask})
        (total / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(total.detach()), int(count), grads))
    (t0, n0, g0), (t1, n1, g1) = results
    assert n1 == n0 == 14 + 9  # labels of positions 6..19, and 6..14 in the padded row
    assert t1 == pytest.approx(t0, rel=1e-5)
    assert set(g1) == set(g0) and len(g0) > 10
    for name in g0:
        err = float((g1[name] - g0[name]).norm() / g0[name].norm())
        assert err < 1e-4, (name, err)  # fp32; the masked and unmasked attention round differently


def test_a_graphed_step_refuses_dropout_it_cannot_seed(tiny_llama_source: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout in a graph needs the Triton kernel that reads its seed on the device."""
    from appliance.stages.train import dropkernel

    monkeypatch.setattr(dropkernel, "available", lambda: False)
    dropping = _model(tiny_llama_source, dropout=0.1)
    ids = torch.zeros((1, 8), dtype=torch.long)
    with pytest.raises(ValueError, match="cannot draw again"):  # refused before any CUDA call
        graphed.GraphedStep(dropping, ids, ids, chunk=4)


def test_fused_lora_dropout_is_seeded_where_triton_is(tiny_llama_source: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.stages.train import dropkernel

    dropping = _model(tiny_llama_source, dropout=0.1)
    monkeypatch.setattr(dropkernel, "available", lambda: True)
    assert graphed.unseeded_dropout(dropping) == []  # every LoRA dropout is the fused layer's
    dropping.get_base_model().model.layers[0].self_attn.extra = torch.nn.Dropout(0.1)
    assert graphed.unseeded_dropout(dropping) == ["base_model.model.model.layers.0.self_attn.extra"]
    del dropping.get_base_model().model.layers[0].self_attn.extra
    dropping.config.attention_dropout = 0.1  # SDPA's own dropout: no module to find
    assert graphed.unseeded_dropout(dropping) == ["attention_dropout (the model's config)"]


@pytest.mark.parametrize(("length", "padded"), [(1, 64), (64, 64), (65, 128), (100, 128),
                                                (300, 320), (1000, 1024), (2048, 2048),
                                                (2049, 2304), (16000, 16384)])
def test_lengths_pad_to_few_shapes_and_little_padding(length: int, padded: int) -> None:
    assert graphed.bucket(length) == padded
    assert padded - length <= max(63, length // 8)


def test_batches_pad_right_with_ignored_labels() -> None:
    ids = torch.tensor([[5, 6, 7]])
    labels = torch.tensor([[-100, 6, 7]])
    out_ids, out_labels = graphed.pad(ids, labels, rows=2, length=5, pad_id=0)
    assert out_ids.tolist() == [[5, 6, 7, 0, 0], [0, 0, 0, 0, 0]]
    assert out_labels.tolist() == [[-100, 6, 7, -100, -100], [-100] * 5]


@pytest.mark.parametrize(("config", "problem"), [
    ({"devices": 2}, "devices > 1"),
    ({"fused_lora": False, "lora_dropout": 0.05}, "fused_lora = true"),
])
def test_cuda_graphs_refuse_what_a_graph_cannot_hold(config: dict, problem: str) -> None:
    from appliance.errors import ValidationError

    with pytest.raises(ValidationError, match=f"cuda_graphs: .*{problem}"):
        validate({"cuda_graphs": "on", **config})
    validate(config)  # fine without graphs
    assert validate({"cuda_graphs": "on", "fused_lora": False, "lora_dropout": 0}).cuda_graphs == "on"
    assert validate({"cuda_graphs": "on", "offload_activations": True}).offload_activations  # offload.py
