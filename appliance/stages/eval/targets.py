"""What a target name means, and the runtime that answers for it.

A target is named as other commands name things: an export (GGUF or ONNX: served by the runtime's
own engine, llama.cpp or onnxruntime, as `appliance chat` and `serve` run it; a merged model:
transformers), a run (its adapter on its base as trained, through peft, as the parity check scores
it), or a model (transformers). `KIND:NAME` picks one where names collide; otherwise an export wins
over a run, a run over a model. An export whose parity gate failed is still evaluated (measuring it
is the point) and the report says so.

Every target's items are rendered with the chat template of its lineage's tokenizer, and the
perplexity of the reference answers is scored on those ids (`verify.parity.samples`, the parity
check's), through the target's runtime. Answers are greedy: a seeded temperature-0 generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance import manifest
from appliance.errors import NotFoundError, ValidationError
from appliance.stages.eval.request import split_target
from appliance.stages.merge.inputs import run_inputs
from appliance.stages.verify import parity
from appliance.workspace import ArtifactRecord, Workspace

PPL_MAX_TOKENS = 1024  # a conversation's perplexity is scored on its first 1024 tokens
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Target:
    name: str  # as the operator wrote it
    record: ArtifactRecord
    runtime: str  # "transformers", "transformers+peft", "llama.cpp", "onnxruntime"
    model: ArtifactRecord  # the base model of its lineage: its tokenizer, template, stop tokens
    dataset: ArtifactRecord | None  # the data its run was trained on, if any
    parity: str | None = None  # an export's gate verdict


def resolve(ws: Workspace, target: str) -> Target:
    """A target name (or KIND:NAME) -> the artifact and its runtime; unknown names are refused
    naming what there is."""
    return _target(ws, target, find(ws, target))


def find(ws: Workspace, target: str) -> ArtifactRecord:
    """The artifact a target names (no manifest read: the CLI checks names before queueing)."""
    kind, name = split_target(target)
    for k in (kind,) if kind else ("export", "run", "model"):
        try:
            return ws.get(k, name)
        except (NotFoundError, ValidationError):
            continue
    there = {k: ", ".join(r.name for r in ws.list(k)) or "none" for k in ("model", "run", "export")}
    raise NotFoundError(f"no {kind or 'export, run or model'} named {name!r} in {ws.root}",
                        hint="; ".join(f"{k}s: {v}" for k, v in there.items()))


def _target(ws: Workspace, target: str, record: ArtifactRecord) -> Target:
    data = manifest.verify(record.path, full=False)
    if record.kind == "model":
        return Target(target, record, "transformers", record, None)
    run = record.name if record.kind == "run" else data["config"].get("run")
    if not run:
        raise ValidationError(f"export {record.name!r} names no run", hint="export it again")
    _, model, dataset = run_inputs(ws, run, hash_model=False)
    if record.kind == "run":
        return Target(target, record, "transformers+peft", model, dataset)
    fmt = data["config"].get("format")
    runtime = {"gguf": "llama.cpp", "onnx": "onnxruntime"}.get(fmt, "transformers")
    return Target(target, record, runtime, model, dataset, record.summary.get("parity"))


class Runner:
    """A target loaded: `answer` generates, `nll` scores a reference conversation."""

    def __init__(self, tokenizer: Any, stops: list[str], scorer: Any) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.scorer: Any = scorer  # a `parity.Scorer`; the runners use more of it

    def answer(self, messages: Messages, max_new_tokens: int, seed: int) -> tuple[str, int, str]:
        """(text, generated tokens, "stop" | "length" | "overflow")."""
        raise NotImplementedError

    def nll(self, conversation: Messages) -> tuple[float | None, int]:
        """The summed NLL of the conversation's assistant tokens and their count (None, 0 when it
        has none within PPL_MAX_TOKENS)."""
        found = parity.samples(self.tokenizer, [conversation], self.stops, PPL_MAX_TOKENS)
        if not found:
            return None, 0
        s = found[0]
        rows = parity.logits_at(self.scorer, s.input_ids, s.positions)
        return parity.target_nll(rows, s.targets), len(s.targets)

    def close(self) -> None:
        pass


class TorchRunner(Runner):
    """transformers' greedy `generate` on the CPU, the model in its scoring dtype (fp32 unless
    memory is short: `merge.weights.scoring_dtype`)."""

    def __init__(self, tokenizer: Any, stops: list[str], scorer: Any) -> None:
        super().__init__(tokenizer, stops, scorer)
        ids = [tokenizer.convert_tokens_to_ids(s) for s in stops]
        self.stop_ids = sorted({i for i in ids if isinstance(i, int) and i >= 0}
                               | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))

    def answer(self, messages: Messages, max_new_tokens: int, seed: int) -> tuple[str, int, str]:
        import torch

        from appliance import chat

        text = chat.render(self.tokenizer, messages, generation_prompt=True)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.scorer.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                pad_token_id=self.stop_ids[0] if self.stop_ids else None)
        new = out[0, ids.shape[1]:].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        new = new[:-1] if stopped else new
        return (self.tokenizer.decode(new, skip_special_tokens=True), len(new),
                "stop" if stopped else "length")


class EngineRunner(Runner):
    """The runtime's engine (what `chat` and `serve` run) answers; the scorer is the same file in
    the export stage's scoring wrapper (`GgufLM`, `OnnxLM`), which gives every position's logits."""

    def __init__(self, tokenizer: Any, stops: list[str], scorer: Any, engine: Any) -> None:
        super().__init__(tokenizer, stops, scorer)
        self.engine = engine

    def answer(self, messages: Messages, max_new_tokens: int, seed: int) -> tuple[str, int, str]:
        from appliance.runtime.engine import ContextOverflow, Delta, Sampling

        sampling = Sampling(temperature=0, max_tokens=max_new_tokens, seed=seed)
        try:
            stream = list(self.engine.generate(messages, sampling))
        except ContextOverflow:
            return "", 0, "overflow"
        done = stream[-1]
        text = "".join(d.text for d in stream if isinstance(d, Delta))
        return text, done.completion_tokens, done.reason

    def close(self) -> None:
        self.engine.close()
        if self.scorer is not self.engine and hasattr(self.scorer, "close"):
            self.scorer.close()


def open_runner(ws: Workspace, target: Target, prompts: Sequence[Messages], max_new_tokens: int,
                conversations: Sequence[Messages] = ()) -> Runner:
    """Load the target in its runtime, with a context that fits the longest of `prompts` and its
    answer, and the longest of the `conversations` to score."""
    from appliance.hfmodel import load_tokenizer

    stops = list(manifest.read(target.model.path)["info"]["stop_tokens"])
    if target.runtime == "transformers":
        from appliance.stages.verify.scoring import HFScorer

        return TorchRunner(load_tokenizer(target.record.path), stops, HFScorer(target.record.path))
    tokenizer = load_tokenizer(target.model.path)
    if target.runtime == "transformers+peft":
        from appliance.stages.verify.scoring import AdapterScorer

        train = manifest.read(target.record.path)["config"].get("train", {})
        return TorchRunner(tokenizer, stops, AdapterScorer(target.model.path,
                                                           target.record.path / "adapter", train))
    return _engine_runner(ws, target, tokenizer, stops,
                          context_needed(tokenizer, prompts, max_new_tokens, conversations))


def _engine_runner(ws: Workspace, target: Target, tokenizer: Any, stops: list[str],
                   context: int) -> EngineRunner:
    """The engine answers; a GGUF's engine also scores the reference in its own context (after
    answering, it holds the prompt: one prompt pass per item, one model load); an ONNX target's
    reference is scored by the export stage's `OnnxLM` on the same folder."""
    from appliance.runtime import engines
    from appliance.runtime.engine import job_threads

    artifact = engines.resolve(target.record.name, ws, allow_failed_parity=True)
    engine = engines.open_engine(artifact, threads=job_threads(), context_length=context)
    if artifact.kind == "gguf":
        return EngineRunner(tokenizer, stops, engine, engine)
    try:
        from export.onnx import OnnxLM

        scorer = OnnxLM(artifact.path, threads=job_threads())
    except BaseException:
        engine.close()
        raise
    return EngineRunner(tokenizer, stops, scorer, engine)


def context_needed(tokenizer: Any, prompts: Sequence[Messages], max_new_tokens: int,
                   conversations: Sequence[Messages] = ()) -> int:
    """Tokens the longest prompt plus its answer need, or the longest scored conversation (at
    most PPL_MAX_TOKENS) if more, rounded up to 256."""
    from appliance import chat

    def longest(rows: Sequence[Messages], prompt: bool) -> int:
        return max((len(tokenizer(chat.render(tokenizer, m, generation_prompt=prompt),
                                  add_special_tokens=False)["input_ids"]) for m in rows), default=0)

    need = max(longest(prompts, True) + max_new_tokens + 16,
               min(longest(conversations, False), PPL_MAX_TOKENS) + 16)
    return -(-need // 256) * 256
