"""Activation offload (train/offload.py): the loss and every adapter gradient equal those of the
plain gradient checkpointing, with LoRA dropout on (the recompute must draw the same masks), and
the configuration refuses what it cannot do. On the CPU the "host copy" is the tensor itself, so
this checks the re-entrant checkpoint and its random state; the copies and the memory it saves
are checked on a GPU (tests/gpu/test_offload_gpu.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from appliance.errors import ValidationError  # noqa: E402
from appliance.stages.train import offload  # noqa: E402
from appliance.stages.train.config import validate  # noqa: E402
from appliance.stages.train.recipe import causal_lm_loss, load_model  # noqa: E402
from tests.conftest import randomize_lora_b  # noqa: E402


def _grads(folder: Path, offloaded: bool, dropout: float) -> tuple[float, dict[str, Any]]:
    cfg = validate({"quantization": "none", "lora_r": 8, "lora_alpha": 16, "seed": 2,
                    "lora_dropout": dropout, "offload_activations": offloaded})
    model = load_model(folder, cfg, "cpu", torch.float32).train()
    randomize_lora_b(model)
    ids = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :5] = -100
    torch.manual_seed(11)  # the dropout masks of the forward
    total, count = causal_lm_loss(model, {"input_ids": ids, "labels": labels,
                                          "attention_mask": torch.ones_like(ids)})
    torch.manual_seed(12)  # anything but the forward's state before the backward's recompute
    (total / count).backward()
    return float(total.detach() / count), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offloaded_checkpointing_trains_as_the_plain_one(tiny_llama_source: Path, dropout: float,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    plain_apply = offload._Offloaded.apply
    monkeypatch.setattr(offload._Offloaded, "apply", lambda *a: calls.append(1) or plain_apply(*a))
    loss0, g0 = _grads(tiny_llama_source, False, dropout)
    assert calls == []
    loss1, g1 = _grads(tiny_llama_source, True, dropout)
    assert len(calls) == 2  # the tiny model's two layers, each checkpointed through offload
    assert loss1 == loss0
    assert set(g1) == set(g0) and len(g0) > 10
    for name in g0:
        assert float(g0[name].abs().sum()) > 0, name
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_config_refuses_offload_where_it_cannot_work() -> None:
    with pytest.raises(ValidationError, match="offload_activations: needs gradient_checkpointing"):
        validate({"offload_activations": True, "gradient_checkpointing": False})
    with pytest.raises(ValidationError, match="offload_activations: not with devices > 1"):
        validate({"offload_activations": True, "devices": 2})
    assert validate({"offload_activations": True}).offload_activations


def test_inputs_it_cannot_train_through_are_refused_and_no_grad_passes_through() -> None:
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(TypeError, match="got 2 positional inputs"):
        offload.checkpoint(lambda a, b: a + b, x, x)
    with pytest.raises(RuntimeError, match="does not require grad"):
        offload.checkpoint(lambda a: a * 2, torch.ones(2, 3))
    with torch.no_grad():
        out = offload.checkpoint(lambda a: a * 2, x)
    assert out.grad_fn is None and float(out.sum()) == 12.0
