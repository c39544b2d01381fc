"""The optimizer a run gets, and that its state survives a checkpoint exactly: `adamw` is torch's
fused AdamW on CUDA (a few launches a step instead of one per adapter matrix), the for-loop one on
the CPU; a checkpoint of the fused one resumes to the same weights as a run that never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from appliance.stages.train import recipe
from appliance.stages.train.config import validate


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.a(x)).square().mean()


@pytest.mark.parametrize(("device", "fused"), [("cuda", True), ("cuda:1", True), ("cpu", None)])
def test_adamw_is_fused_on_cuda_only(device: str, fused: bool | None) -> None:
    opt = recipe.make_optimizer(_Tiny(), validate({"optimizer": "adamw"}), device)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is fused
    assert len(opt.param_groups[0]["params"]) == 2  # the trainable ones only


def _steps(model: _Tiny, opt: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        torch.manual_seed(seed)
        model(torch.randn(3, 8)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_a_fused_adamw_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    straight = _Tiny()
    opt = torch.optim.AdamW([p for p in straight.parameters() if p.requires_grad], lr=1e-2, fused=True)
    _steps(straight, opt, range(6))

    first = _Tiny()
    opt = torch.optim.AdamW([p for p in first.parameters() if p.requires_grad], lr=1e-2, fused=True)
    _steps(first, opt, range(3))
    saved = recipe.save_checkpoint(tmp_path, first, opt, recipe.LoopState(step=3))
    resumed = _Tiny()  # a fresh process: fresh weights and optimizer, then the checkpoint
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2, fused=True)
    assert recipe.load_checkpoint(saved, resumed, opt2).step == 3
    _steps(resumed, opt2, range(3, 6))
    for want, got in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(want, got)
    assert not torch.equal(_Tiny().a.weight, resumed.a.weight)  # it trained
