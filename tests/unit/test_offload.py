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


def test_the_host_arena_reserves_per_layer_and_keeps_what_a_graph_may_still_write(
        tiny_llama_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload.torch.cuda, "is_available", lambda: False)  # plain, exact sizes
    monkeypatch.setattr(offload, "ARENA", offload._Arena())
    arena = offload.ARENA
    small = arena.view(0, torch.Size((2, 3)), torch.float32)
    assert small.shape == (2, 3) and arena.nbytes() == 24
    assert arena.view(0, torch.Size((3, 2)), torch.float32).data_ptr() == small.data_ptr()  # reused
    arena.view(0, torch.Size((4, 3)), torch.float32)  # outgrown before any capture: the old one goes
    assert arena.nbytes() == 48 and arena.kept == []
    arena.captured = True  # a graph captured since may copy into the current buffer: kept
    arena.view(0, torch.Size((5, 3)), torch.float32)
    assert arena.nbytes() == 48 + 60 and len(arena.kept) == 1

    monkeypatch.setattr(offload, "ARENA", offload._Arena())
    cfg = validate({"quantization": "none", "offload_activations": True})
    model = load_model(tiny_llama_source, cfg, "cpu", torch.float32)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert offload.reserve(model, 10, torch.float32) == layers * 10 * hidden * 4
    assert sorted(offload.ARENA.buffers) == [(i, torch.float32) for i in range(layers)]


def test_checkpointing_enabled_again_keeps_offload(tiny_llama_source: Path) -> None:
    """transformers' gradient_checkpointing_enable replaces every layer's checkpoint function: the
    trainer turns it on again when it leaves CUDA graphs, and offload must survive that."""
    from appliance.stages.train.recipe import enable_checkpointing

    cfg = validate({"quantization": "none", "offload_activations": True})
    model = load_model(tiny_llama_source, cfg, "cpu", torch.float32)

    def bound() -> list[tuple[int, int]]:
        funcs = [m._gradient_checkpointing_func for m in offload._layers(model)]
        return [(f.keywords["layer"], f.keywords["layers"]) for f in funcs
                if getattr(f, "func", None) is offload.checkpoint]

    assert bound() == [(0, 2), (1, 2)]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert bound() == []  # what transformers does
    enable_checkpointing(model, cfg, graphs=False)
    assert bound() == [(0, 2), (1, 2)]


def test_a_pass_that_never_reached_its_backward_leaves_nothing_to_the_next(
        tiny_llama_source: Path) -> None:
    cfg = validate({"quantization": "none", "offload_activations": True, "lora_dropout": 0})
    model = load_model(tiny_llama_source, cfg, "cpu", torch.float32).train()
    ids = torch.randint(3, 49152, (1, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    causal_lm_loss(model, batch)  # forward only: its slots stay behind
    stale = offload._last[torch.device("cpu")]
    assert stale.host is not None
    total, count = causal_lm_loss(model, batch)
    chain, slot = [], offload._last[torch.device("cpu")]
    while slot is not None:
        chain.append(slot)
        slot = slot.prev
    assert len(chain) == model.config.num_hidden_layers and stale not in chain  # this pass only
    (total / count).backward()
    assert torch.device("cpu") not in offload._last
