"""Shared fixtures. The whole suite runs behind the offline guard: a test that tries to reach a
non-loopback address fails, unless it is marked `network_probe` (tests of the guard itself)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import offline
from appliance.workspace import ArtifactRecord, Workspace
from tests.tmpdirs import module_tmp  # noqa: F401  (a fixture, shared by every module)

offline.install()

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "smollm2-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def build_random_llama(folder: Path, **shape: int) -> Path:
    """A random-init Llama HF folder around SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, **shape)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    return folder


def randomize_lora_b(model: object) -> None:
    """Give every LoRA B (zero at init, so the adapters would do nothing) small random values
    drawn on the CPU from its name: the same values on any device and in every model built alike."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():  # type: ignore[attr-defined]
            if "lora_B" in name:
                g = torch.Generator().manual_seed(len(name))
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_random_qwen2(folder: Path, **shape: int) -> Path:
    """A random-init Qwen2 HF folder (attention biases, tied embeddings): a second architecture
    family, around the same real tokenizer (llama.cpp recognises it) and its ChatML template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, **shape)
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    return folder


TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "network_probe: the test triggers the offline guard on purpose")


@pytest.fixture(autouse=True)
def _fail_on_network_attempt(request: pytest.FixtureRequest):
    before = len(offline.blocked_attempts)
    yield
    attempts = offline.blocked_attempts[before:]
    if attempts and request.node.get_closest_marker("network_probe") is None:
        pytest.fail("the test tried to reach the network:\n" + "\n".join(attempts))


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def smol_model(tmp_path_factory: pytest.TempPathFactory) -> ArtifactRecord:
    """The real embedded SmolLM2-135M-Instruct, imported once per session. Treat as read-only."""
    from appliance.stages.models import importer as models

    ws = Workspace(tmp_path_factory.mktemp("smol") / "ws")
    return models.import_default(ws)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_model: ArtifactRecord):
    from appliance.stages.models.importer import load_tokenizer

    return load_tokenizer(smol_model.path)


@pytest.fixture
def model_workspace(tmp_path: Path, smol_model: ArtifactRecord) -> tuple[Workspace, ArtifactRecord]:
    """A fresh workspace that already holds the SmolLM2 model (copied, not re-imported)."""
    ws = Workspace(tmp_path / "ws").ensure()
    shutil.copytree(smol_model.path, ws.artifact_dir("model", smol_model.name))
    ws.reconcile()
    return ws, ws.get("model", smol_model.name)


@pytest.fixture(scope="session")
def tiny_llama_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama HF folder with SmolLM2's real tokenizer and template (built once)."""
    return build_random_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", **TINY_SHAPE)


@pytest.fixture(scope="session")
def tiny_qwen2_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 HF folder (biases, tied embeddings), built once. Treat as read-only."""
    return build_random_qwen2(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", **TINY_SHAPE)


@pytest.fixture
def tiny_llama(tmp_path: Path, tiny_llama_source: Path) -> Path:
    """A private copy of the tiny model folder that a test may damage."""
    return Path(shutil.copytree(tiny_llama_source, tmp_path / "tiny-llama"))


@pytest.fixture
def stop_jobs_after() -> Iterator[Callable[[Workspace], Workspace]]:
    """Register a workspace: whatever the test did, its jobs still queued or running at the end
    are cancelled, and a process that has not stopped 30 s later is killed (a server job runs
    until it is stopped: a failing test must not leave one behind)."""
    from appliance import jobs

    seen: list[Workspace] = []
    yield lambda ws: seen.append(ws) or ws
    for ws in seen:
        left = [j for j in jobs.list_jobs(ws) if j.state in ("queued", "running")]
        for job in left:
            jobs.cancel(ws, job.id)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                jobs.get(ws, j.id).state in ("queued", "running") for j in left):
            time.sleep(0.2)
        for job in (jobs.get(ws, j.id) for j in left):
            if jobs.is_alive(job.pid, job.pid_start):
                with contextlib.suppress(ProcessLookupError):  # a pid that leads no group, or gone
                    os.killpg(job.pid, signal.SIGKILL)  # the job leads its own session
                pytest.fail(f"job {job.id} did not stop when cancelled; killed")
