"""The CUDA-graphed step's loss (graphed.dense_loss: every position, no attention mask, no host
read) is the training loop's loss: the same value, count and adapter gradients as
recipe.causal_lm_loss on a right-padded batch with prompt positions ignored. The capture itself
needs CUDA and runs only in bench/train_throughput.py (`--engines graphed`) so far: it is not in
the training loop, and no GPU test covers it yet."""

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


def test_a_graphed_step_refuses_dropout(tiny_llama_source: Path) -> None:
    model = _model(tiny_llama_source)
    with pytest.raises(ValueError, match="lora_dropout 0"):
        graphed.prepare(model, 0.05)
    graphed.prepare(model, 0.0)
    assert model.is_gradient_checkpointing
    dropping = _model(tiny_llama_source, dropout=0.1)
    ids = torch.zeros((1, 8), dtype=torch.long)
    with pytest.raises(ValueError, match="one dropout mask"):  # refused before any CUDA call
        graphed.GraphedStep(dropping, ids, ids, chunk=4)
