"""QLoRA training as a resumable job: base in 4-bit NF4 (double quant) through bitsandbytes, LoRA
through peft, loss on assistant tokens only (the template + mask of `appliance.chat`).

The loop is written out rather than delegated to `transformers.Trainer` because resuming must be
exact: a checkpoint holds the LoRA weights, the optimizer state, the step, the data position and
every RNG state, all in safetensors + JSON (nothing is pickled), so "N steps straight" and "killed at
step k, resumed" produce the same loss sequence. Work in progress lives in the job's directory
(`jobs/<id>/work/`); only a finished run becomes the `runs/<name>/` artifact, with its adapter, its
config, its metrics and its lineage (base model and dataset).

Every phase says what it does (`appliance.progress` stages, each event also carrying `max_steps`):
check-inputs, tokenize, load-model, load-checkpoint, evaluate (counted in batches), save-checkpoint,
publish; each attempt starts with a `train-start` event (attempt, step it starts from, max_steps),
so a viewer knows the run's length before the first step and drops an earlier attempt's ETA.
A cancel stops any phase (`appliance.cancellation`): the step loop and its evaluations stop by
themselves at a safe point (a cancel during an evaluation saves the checkpoint with that
evaluation still owed, and the resumed job runs it first); the rest is interrupted where it is.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import chat, licences, manifest
from appliance.errors import AlreadyExistsError, ApplianceError
from appliance.fsutil import atomic_write_text, exchange, fsync_dir
from appliance.jobs import JobCancelled, JobContext
from appliance.progress import Stages
from appliance.stages.datasets import importer as datasets
from appliance.stages.train import distributed
from appliance.stages.train.config import TrainConfig, resolve_compute_dtype, validate
from appliance.stages.train.planner import loss_chunk
from appliance.workspace import ArtifactRecord, parent_ref

KEEP_CHECKPOINTS = 2
COMPLETE = "COMPLETE"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    best_eval: float | None = None
    evals_without_improvement: int = 0
    first_eval: float | None = None
    last_eval: float | None = None
    pending_eval: bool = False  # the evaluation due at `step` was cancelled: a resume runs it first


# -- data --------------------------------------------------------------------------------------
def encode(tokenizer: Any, rows: list[dict[str, Any]], stops: list[str], max_len: int,
           on_row: Callable[[int], None] | None = None) -> tuple[list[Example], int]:
    """Render + mask every conversation; truncate to max_len; drop ones left with nothing to learn.
    `on_row(n)` hears after each of them how many are done."""
    out, dropped = [], 0
    for n, row in enumerate(rows, 1):
        r = chat.render_and_mask(tokenizer, row["messages"], stops)
        ids, labels = r.input_ids[:max_len], r.labels[:max_len]
        if on_row is not None:
            on_row(n)
        if all(label == chat.IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        out.append(Example(ids, labels))
    return out, dropped


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped batches: shuffle, sort within windows of 32 batches, shuffle the batches.
    Similar lengths share a batch (little padding) and no two conversations are mixed in a row."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 32
    batches: list[list[int]] = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: -lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), chat.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = (torch.tensor(e.input_ids), torch.tensor(e.labels), 1)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one optimizer step on one rank: a resumed run, on any rank, draws the
    same dropout masks as a straight one without restoring every rank's generator."""
    return ((seed * 1_000_003 + step) * 64 + rank) % (2**63)


def evals_from(step: int, cfg: TrainConfig) -> int:
    """How many evaluations are due at steps `step`..max_steps (each eval_every-th, and the last)."""
    if step > cfg.max_steps:
        return 0
    step = max(step, 1)  # steps are 1-based: step 0 is no evaluation
    due = cfg.max_steps // cfg.eval_every - (step - 1) // cfg.eval_every
    return due + (1 if cfg.max_steps % cfg.eval_every else 0)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at max_steps (`step` is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- model -------------------------------------------------------------------------------------
def pick_device(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> tuple[str, Any]:
    """cuda when present, else the CPU; the compute dtype as `resolve_compute_dtype` decides (bf16
    where the GPU supports it, fp16 on a T4 (7.5); on the CPU bf16 only where it is native), and
    why, said to `log` in one line."""
    import torch

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    name, why = resolve_compute_dtype(cfg, capability)
    if log is not None:
        log(why)
    return ("cpu" if capability is None else "cuda"), names[name]


def enable_checkpointing(model: Any, cfg: TrainConfig, graphs: bool) -> None:
    """Gradient checkpointing on every decoder layer, through activation offload when configured
    (transformers' enable replaces each layer's checkpoint function: offload is bound after it).
    Under CUDA graphs no RNG state is stashed: a capture cannot read it, and the graphed step's
    only random numbers, the fused layer's seeded dropout masks, are drawn again without it."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, **({"preserve_rng_state": False} if graphs else {})})
    if cfg.offload_activations:
        from appliance.stages.train import offload

        offload.enable(model)


def load_model(path: Path, cfg: TrainConfig, device: str, dtype: Any) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}}
    if cfg.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    if device == "cpu" and cfg.quantization == "nf4":
        keep_cpu_weights_trainable(model)
    # Not peft's prepare_model_for_kbit_training: it upcasts embeddings, head and norms to fp32,
    # which turns the whole residual stream fp32 (fp32 norm weight x bf16 hidden) and doubles
    # activation memory. Frozen weights stay in the compute dtype; only LoRA trains (in fp32).
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg, graphs=cfg.cuda_graphs == "on" and device.startswith("cuda"))
        model.enable_input_require_grads()
    model.config.use_cache = False
    torch.manual_seed(cfg.seed)  # the LoRA init depends only on the seed
    # peft annotates lora_alpha as int but only divides by it (scaling = alpha / r): a float is fine.
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]
                      lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    if cfg.fused_lora:
        from appliance.stages.train import fastlora

        fastlora.fuse(peft_model)
        if cfg.unpack_scales and cfg.quantization == "nf4":
            fastlora.unpack_scales(peft_model)
    from appliance.stages.train import kernels

    # what was fused, for the job log (a plain attribute: PeftModel forwards unknown ones)
    peft_model.appliance_kernels = kernels.apply(  # type: ignore[assignment]
        peft_model, device, cfg.fused_kernels)
    return peft_model


def keep_cpu_weights_trainable(model: Any) -> None:
    """bitsandbytes 0.50.2, on CPUs with AVX512-BF16, repacks a Linear4bit's weights for a fast
    inference kernel the first time it runs in eval mode without grad (our evaluation). That
    kernel has no autograd formula, so training after the first evaluation silently computes
    different (wrong) gradients, and a resumed run diverges from a straight one. Turning the
    repacking off keeps one kernel for training and evaluation."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


LOSS_CHUNK = 1024  # trained tokens whose logits exist at once


def causal_lm_loss(model: Any, inputs: dict[str, Any]) -> tuple[Any, int]:
    """Summed cross-entropy over the trained (assistant) tokens and their count.

    Logits are computed only for the positions that carry a label, a chunk at a time, with the
    gradient w.r.t. the hidden states made while they exist (headloss): the [batch, seq, vocab]
    logits a plain forward materialises (with their fp32 copy and gradients: ~12 bytes per
    vocabulary entry per token) never exist, and prompt tokens cost no head matmul at all. Same
    value as the model's own shifted loss.
    """
    from appliance.stages.train.fastlora import new_dropout_seed
    from appliance.stages.train.headloss import head_loss

    causal = model.get_base_model()
    new_dropout_seed(inputs["input_ids"].device)  # this forward's LoRA dropout masks (fastlora)
    hidden = causal.model(input_ids=inputs["input_ids"],
                          attention_mask=inputs["attention_mask"]).last_hidden_state
    labels = inputs["labels"][:, 1:]
    keep = labels != chat.IGNORE_INDEX
    states, targets = hidden[:, :-1][keep], labels[keep]
    return (head_loss(states, causal.get_output_embeddings().weight, targets, head_chunk(model)),
            int(targets.shape[0]))


def head_chunk(model: Any) -> int:
    """Positions whose logits the loss head makes at once, for this model's vocabulary."""
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    return min(LOSS_CHUNK, loss_chunk(vocab))


def _loss_module(model: Any) -> Any:
    """The peft model with `causal_lm_loss` as its forward, so DistributedDataParallel sees (and
    hooks) the forward that training really runs."""
    import torch

    class CausalLMLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.peft = model

        def forward(self, **inputs: Any) -> tuple[Any, int]:
            return causal_lm_loss(self.peft, inputs)

    return CausalLMLoss()


def make_optimizer(model: Any, cfg: TrainConfig, device: str) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    choice = cfg.optimizer if cfg.optimizer != "auto" else (
        "paged_adamw_8bit" if device.startswith("cuda") else "adamw")
    if choice == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # on CUDA the fused kernel updates every adapter matrix in a few launches (the 8-bit optimizer
    # launches one per matrix: 224 a step at 1B, host time the GPU waits on); the CPU keeps the
    # for-loop update it was checked with
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=True if device.startswith("cuda") else None)


# -- checkpoints (safetensors + JSON, never pickle) --------------------------------------------
def _trainable(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _split_tensors(state: dict[str, Any], prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """Move the tensors of a (nested) optimizer state into `tensors` under dotted keys and return
    what is left, which is JSON. bitsandbytes nests its quantization state one level down."""
    import torch

    rest: dict[str, Any] = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            tensors[f"{prefix}{key}"] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            rest[key] = _split_tensors(value, f"{prefix}{key}.", tensors)
        else:
            rest[key] = value
    return rest


def save_checkpoint(work: Path, model: Any, optimizer: Any, state: LoopState, scaler: Any = None) -> Path:
    import torch
    from safetensors.torch import save_file

    final = work / "checkpoints" / f"step-{state.step:07d}"
    if (final / COMPLETE).exists() and _saved_loop(final) == state.__dict__:
        return final  # this step is saved already (e.g. a cancel right after a periodic save)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
              str(tmp / "lora.safetensors"))
    opt = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars = {str(i): _split_tensors(s, f"state.{i}.", tensors) for i, s in opt["state"].items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"loop": state.__dict__, "param_groups": opt["param_groups"], "scalars": scalars,
            "python_rng": random.getstate(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    (tmp / "state.json").write_text(json.dumps(meta))
    for path in tmp.iterdir():
        _fsync(path)
    (tmp / COMPLETE).touch()  # written last: a checkpoint without it is never loaded
    _fsync(tmp / COMPLETE)
    if final.exists() and exchange(tmp, final):  # the same step saved again (an owed eval done)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    fsync_dir(final.parent)
    for old in complete_checkpoints(work)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _saved_loop(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((path / "state.json").read_text())["loop"])
    except (OSError, ValueError, KeyError):
        return None


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def complete_checkpoints(work: Path) -> list[Path]:
    return sorted(p for p in (work / "checkpoints").glob("step-???????") if (p / COMPLETE).exists())


def latest_checkpoint(work: Path) -> Path | None:
    found = complete_checkpoints(work)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scaler: Any = None) -> LoopState:
    import torch
    from safetensors.torch import load_file

    lora = load_file(str(path / "lora.safetensors"))
    params = _trainable(model)
    if set(lora) != set(params):
        raise ApplianceError(f"{path} does not match this run's LoRA layout",
                             title="Checkpoint mismatch")
    with torch.no_grad():
        for name, value in lora.items():
            params[name].copy_(value)
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    state: dict[int, dict[str, Any]] = {int(i): s for i, s in meta["scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, i, *parts = key.split(".")
            node = state.setdefault(int(i), {})
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                                      if f"rng.cuda.{i}" in tensors])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return LoopState(**meta["loop"])


# -- the loop ----------------------------------------------------------------------------------
def evaluate(model: Any, examples: list[Example], cfg: TrainConfig, pad_id: int, device: str,
             rank: distributed.Rank | None = None, *,
             on_batch: Callable[[int, int], None] | None = None,
             cancelled: Callable[[], bool] | None = None) -> float:
    """Token-weighted mean loss over the eval split (assistant tokens only); with several ranks,
    each scores a share of the batches and the sums are combined.

    `on_batch(done, total)` hears about each round of batches (one batch per rank), from (0, total)
    on; `cancelled` is asked before each round, by every rank together, and a yes raises
    JobCancelled there (the model back in training mode)."""
    rank = rank or distributed.Rank()
    import torch

    if cfg.eval_batches:  # a seeded random subset, not the shortest conversations
        pick = random.Random(cfg.seed).sample(range(len(examples)),
                                              min(len(examples), cfg.eval_batches * cfg.batch_size))
        examples = [examples[i] for i in sorted(pick)]
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # little padding
    batches = [ordered[i:i + cfg.batch_size] for i in range(0, len(ordered), cfg.batch_size)]
    rounds = -(-len(batches) // rank.world)  # every rank takes part in each round's collectives
    total, count = 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for r in range(rounds):
                if on_batch is not None:
                    on_batch(r, rounds)
                if cancelled is not None and distributed.all_sum([float(cancelled())], device)[0]:
                    raise JobCancelled()
                if (i := r * rank.world + rank.rank) < len(batches):
                    inputs = {k: v.to(device) for k, v in collate(batches[i], pad_id).items()}
                    loss_sum, n = causal_lm_loss(model, inputs)
                    total += float(loss_sum)
                    count += n
        if on_batch is not None:
            on_batch(rounds, rounds)
    finally:
        model.train()
    total_sum, count_sum = distributed.all_sum([total, count], device)
    return total_sum / max(count_sum, 1)


def train_stages(ctx: JobContext, run: str, max_steps: int) -> Stages:
    """The stage events of a training attempt: `appliance.progress`'s, about the run being made,
    each also carrying `max_steps`."""
    def progress(done: float, total: float, **fields: Any) -> None:
        ctx.progress(done, total, max_steps=max_steps, **fields)

    return Stages(progress, artifacts_total=1, artifact=run)


class Trainer:
    def __init__(self, ctx: JobContext, model_record: ArtifactRecord, data_record: ArtifactRecord,
                 cfg: TrainConfig, stages: Stages | None = None) -> None:
        import torch

        from appliance.hfmodel import load_tokenizer

        self.ctx, self.cfg, self.model_record, self.data_record = ctx, cfg, model_record, data_record
        self.stages = stages or Stages()
        self.work = ctx.dir / "work"
        self.step_seconds, self.steps_timed = 0.0, 0
        self.eval_seconds: float | None = None  # how long the last evaluation took
        tokenizer = load_tokenizer(model_record.path)
        info = manifest.read(model_record.path)["info"]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else info["stop_token_ids"][0]
        stops = info["stop_tokens"]
        train_rows = datasets.load_rows(data_record, "train")
        eval_rows = datasets.load_rows(data_record, "eval")
        rows = len(train_rows) + len(eval_rows)
        count = self.stages.counter("tokenize", f"tokenizing {rows} conversations", "conversations", rows)
        self.train_set, dropped = encode(tokenizer, train_rows, stops, cfg.max_seq_len,
                                         on_row=lambda n: count(n, rows))
        self.eval_set, _ = encode(tokenizer, eval_rows, stops, cfg.max_seq_len,
                                  on_row=lambda n: count(len(train_rows) + n, rows))
        if dropped:
            ctx.log(f"{dropped} training conversation(s) had no assistant tokens within "
                    f"max_seq_len={cfg.max_seq_len} and were left out")
        if not self.train_set:
            raise ApplianceError(
                f"no training conversation has assistant tokens within max_seq_len={cfg.max_seq_len}"
                f" ({dropped} dropped)", title="Nothing to train on",
                hint="raise max_seq_len (appliance plan shows what fits) or use shorter prompts")
        self.rank = distributed.current()
        self.device, self.dtype = pick_device(cfg, ctx.log)
        if self.device == "cuda":
            self.device = f"cuda:{self.rank.local_rank}"
        loading = (f"loading {model_record.name} ({cfg.quantization}, compute "
                   f"{str(self.dtype).removeprefix('torch.')}) on {self.device}")
        self.stages.emit("load-model", loading)  # printed as a line in every log (no ctx.log copy)
        self.model = load_model(model_record.path, cfg, self.device, self.dtype)
        ctx.log(self.model.appliance_kernels)
        if cfg.offload_activations:
            ctx.log(self._reserve_offload())
        self.loss = _loss_module(self.model)
        if self.rank.world > 1:  # LoRA is initialised from the seed: identical on every rank
            from torch.nn.parallel import DistributedDataParallel

            self.loss = DistributedDataParallel(
                self.loss, device_ids=[self.rank.local_rank] if self.device != "cpu" else None,
                broadcast_buffers=False, init_sync=False)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        ctx.log(f"optimizer {type(self.optimizer).__name__}")
        # fp16 (a T4 has no bf16) needs loss scaling; bf16 and fp32 do not
        fp16 = self.device.startswith("cuda") and self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.lengths = [len(e.input_ids) for e in self.train_set]
        self._epoch_cache: tuple[int, list[list[int]]] = (-1, [])
        self.graphs = self._graphs()

    def _reserve_offload(self) -> str:
        """The host buffers of activation offload, made up front for the longest batch (a padded
        one under graphs); what the job log says about it."""
        if not self.device.startswith("cuda"):
            return "activation offload: nothing to move on the CPU (the inputs are in host memory)"
        from appliance.stages.train import graphed, offload

        length = self.cfg.max_seq_len
        if self.cfg.cuda_graphs == "on":
            length = graphed.bucket(length)
        pinned = offload.reserve(self.model, self.cfg.batch_size * length, self.dtype)
        return (f"activation offload: each checkpointed layer's input waits in host memory "
                f"({pinned / 2**30:.2f} GiB pinned for batches of {self.cfg.batch_size} x {length})")

    def _graphs(self) -> Any:
        """The CUDA-graphed micro-batch (graphed.Steps) when cuda_graphs is on, else None."""
        from appliance.stages.train import fastlora

        fastlora.DEVICE_DROPOUT["on"] = False  # torch's generator, unless a graph is captured
        if self.cfg.cuda_graphs != "on":
            return None
        if not self.device.startswith("cuda"):
            self.ctx.log("cuda_graphs: nothing to capture on the CPU: steps run eagerly")
            return None
        from appliance.stages.train import graphed

        if unseeded := graphed.unseeded_dropout(self.model):
            self._eager(f"this model draws random numbers a graph cannot draw again ({unseeded[0]})")
            return None
        self.ctx.log("CUDA graphs on: each batch shape's forward and backward captured once and "
                     "replayed (batches padded to the batch size and a length bucket)")
        return graphed.Steps(self.model, self.cfg.batch_size, self.pad_id, head_chunk(self.model),
                             log=self.ctx.log)

    def _eager(self, why: str) -> None:
        """Train without graphs from here, with checkpointing's RNG stash back on (load_model turned
        it off for the graphs) and torch's generator for the LoRA dropout."""
        from appliance.stages.train import fastlora

        self.ctx.log(f"CUDA graphs off: {why}; training eagerly")
        self.graphs = None
        fastlora.DEVICE_DROPOUT["on"] = False
        if self.cfg.gradient_checkpointing:
            enable_checkpointing(self.model, self.cfg, graphs=False)

    def _micro(self, batch: dict[str, Any], trained: float, world: int, last: bool) -> Any:
        """One micro-batch's forward and backward; its summed loss (a tensor)."""
        import torch

        inputs = {k: v.to(self.device) for k, v in batch.items()}
        if self.graphs is not None:
            weight = self.scaler.scale(torch.full((), 1 / max(trained, 1), device=self.device))
            try:
                return self.graphs(inputs["input_ids"], inputs["labels"], weight)[0]
            except ValueError as exc:  # refused before any capture (a failed one stops the job)
                self._eager(str(exc))
        with contextlib.nullcontext() if last or world == 1 else self.loss.no_sync():
            loss_sum, _ = self.loss(**inputs)
            self.scaler.scale(loss_sum * world / max(trained, 1)).backward()
        return loss_sum

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache[0] != epoch:
            batches = epoch_batches(self.lengths, self.cfg.batch_size, self.cfg.seed, epoch)
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def _next_batch(self, state: LoopState) -> list[Example]:
        if state.batch_index >= len(self._epoch(state.epoch)):
            state.epoch, state.batch_index = state.epoch + 1, 0
        batch = [self.train_set[i] for i in self._epoch(state.epoch)[state.batch_index]]
        state.batch_index += 1
        return batch

    def _eval(self, state: LoopState, label: str) -> bool:
        """Evaluate, keep the best adapter; True when early stopping says stop. A cancel stops it
        between batches (JobCancelled, `state` untouched)."""
        count: Callable[[int, int], None] | None = None

        def on_batch(done: int, total: int) -> None:
            nonlocal count
            if count is None:
                count = self.stages.counter("evaluate", label, "batches", total)
            else:
                count(done, total)

        started = time.monotonic()
        loss = evaluate(self.model, self.eval_set, self.cfg, self.pad_id, self.device, self.rank,
                        on_batch=on_batch, cancelled=self.ctx.cancel_requested)
        self.eval_seconds = time.monotonic() - started
        state.last_eval = loss
        if state.first_eval is None:
            state.first_eval = loss
        improved = state.best_eval is None or loss < state.best_eval
        if improved:
            state.best_eval, state.evals_without_improvement = loss, 0
            if state.step > 0 and self.rank.main:
                tmp = self.work / "best.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                self.model.save_pretrained(str(tmp), safe_serialization=True)
                shutil.rmtree(self.work / "best", ignore_errors=True)
                tmp.rename(self.work / "best")
        else:
            state.evals_without_improvement += 1
        self.ctx.emit("eval", step=state.step, eval_loss=round(loss, 5),
                      perplexity=round(math.exp(min(loss, 50)), 3), best=improved)
        patience = self.cfg.early_stopping_patience
        return bool(patience) and state.evals_without_improvement >= patience

    def _step(self, state: LoopState) -> dict[str, Any]:
        import torch

        from appliance.stages.train import fastlora

        # Every trained token of the step weighs the same, whichever micro-batch it is in (length-
        # grouped micro-batches differ a lot in trained tokens), so the step is the same as one
        # big batch and grad_accum really trades memory for nothing else.
        # With several ranks, every rank draws the step's grad_accum x world micro-batches in the
        # same order and trains on its own share; DDP averages gradients, hence the x world.
        ga, world = self.cfg.grad_accum, self.rank.world
        torch.manual_seed(step_seed(self.cfg.seed, state.step, self.rank.rank))  # dropout: resumable
        drawn = [self._next_batch(state) for _ in range(ga * world)]
        micro = [collate(b, self.pad_id) for b in drawn[self.rank.rank * ga:(self.rank.rank + 1) * ga]]
        trained, tokens = distributed.all_sum(
            [sum(int((m["labels"][:, 1:] != chat.IGNORE_INDEX).sum()) for m in micro),
             sum(int(m["attention_mask"].sum()) for m in micro)], self.device)
        total = 0.0
        for i, batch in enumerate(micro):
            total += float(self._micro(batch, trained, world, i == len(micro) - 1).detach())
        total = distributed.all_sum([total], self.device)[0] / max(trained, 1)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf")))
        lr = lr_at(state.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.step(self.optimizer)  # skipped (and the scale lowered) if fp16 grads overflowed
        self.scaler.update()
        # a graph accumulates into the gradients it captured: zeroed in place, never replaced
        self.optimizer.zero_grad(set_to_none=self.graphs is None)
        fastlora.weights_changed()
        state.step += 1
        return {"loss": total, "lr": lr, "grad_norm": norm, "tokens": tokens}

    def _save(self, state: LoopState) -> None:
        if self.rank.main:  # every rank holds the same LoRA weights and optimizer state
            self.stages.emit("save-checkpoint", f"saving checkpoint step-{state.step:07d}")
            save_checkpoint(self.work, self.model, self.optimizer, state, self.scaler)

    def _save_and_stop(self, state: LoopState) -> None:
        self._save(state)
        distributed.all_sum([0.0], self.device)  # no rank leaves before the checkpoint is written
        raise JobCancelled()

    def fit(self) -> LoopState:
        from appliance.stages.train import fastlora

        state = LoopState()
        checkpoint = latest_checkpoint(self.work)
        if checkpoint is not None:
            self.stages.emit("load-checkpoint", f"loading checkpoint {checkpoint.name}")
            state = load_checkpoint(checkpoint, self.model, self.optimizer, self.scaler)
            fastlora.weights_changed()
            self.ctx.log(f"resumed from {checkpoint.name} (step {state.step})"
                         + (", its evaluation still to run" if state.pending_eval else ""))
        with self.ctx.cooperative():  # cancels are checked here, and stop at a safe point
            if checkpoint is None and self.eval_set:
                self._eval(state, "evaluating before training")  # perplexity before training
            return self._loop(state)

    def _loop(self, state: LoopState) -> LoopState:
        import torch

        self.model.train()
        patience = self.cfg.early_stopping_patience
        stop = self._after_step(state) if state.pending_eval else \
            bool(patience) and state.evals_without_improvement >= patience
        while state.step < self.cfg.max_steps and not stop:
            if distributed.all_sum([float(self.ctx.cancel_requested())], self.device)[0]:
                self._save_and_stop(state)
            t0 = time.monotonic()
            m = self._step(state)
            took = time.monotonic() - t0
            self.step_seconds, self.steps_timed = self.step_seconds + took, self.steps_timed + 1
            event = {"step": state.step, "loss": round(m["loss"], 5), "lr": m["lr"],
                     "grad_norm": round(m["grad_norm"], 4),
                     "tokens_per_s": round(m["tokens"] / took, 1), "eta_s": self._eta(state)}
            if self.device.startswith("cuda"):
                event["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            self.ctx.progress(state.step, self.cfg.max_steps, **event)
            stop = self._after_step(state)
        return state

    def _eta(self, state: LoopState) -> float:
        """Seconds left: the remaining steps at this attempt's pace, and the evaluations still due
        (this step's included) at the last one's duration once one was timed."""
        left = (self.cfg.max_steps - state.step) * self.step_seconds / max(self.steps_timed, 1)
        if self.eval_set and self.eval_seconds is not None:
            left += evals_from(state.step, self.cfg) * self.eval_seconds
        return round(left, 2)

    def _after_step(self, state: LoopState) -> bool:
        """The evaluation and checkpoint due after a step; True when early stopping says stop. A
        cancel during the evaluation saves the checkpoint with the evaluation owed, then stops."""
        cfg, stop = self.cfg, False
        if self.eval_set and (state.step % cfg.eval_every == 0 or state.step == cfg.max_steps):
            label = f"final evaluation (step {state.step})" if state.step == cfg.max_steps \
                else f"evaluating at step {state.step}"
            state.pending_eval = True
            try:
                stop = self._eval(state, label)
            except JobCancelled:
                self._save_and_stop(state)
            state.pending_eval = False
        if state.step % cfg.save_every == 0 or state.step == cfg.max_steps or stop:
            self._save(state)
        if stop:
            self.ctx.log(f"early stop at step {state.step}: no eval improvement in "
                         f"{cfg.early_stopping_patience} evaluations")
        return stop

    def publish(self, state: LoopState, name: str, config_source: str) -> ArtifactRecord:
        """Write the finished run as a `runs/<name>` artifact: adapter (best, else last)."""
        ws = self.ctx.ws
        self.stages.emit("publish", f"publishing run {name}")
        with ws.writer("run", name) as w:
            best = self.work / "best"
            if best.is_dir():
                shutil.copytree(best, w.path / "adapter")
            else:
                self.model.save_pretrained(str(w.path / "adapter"), safe_serialization=True)
            shutil.copy(self.ctx.dir / "events.jsonl", w.path / "events.jsonl")
            metrics = {"steps": state.step, "eval_loss_before": state.first_eval,
                       "eval_loss_after": state.last_eval, "best_eval_loss": state.best_eval}
            metrics |= {f"perplexity_{k}": round(math.exp(min(v, 50)), 4) for k, v in
                        (("before", state.first_eval), ("after", state.last_eval)) if v is not None}
            (w.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.ctx.finishing()  # committed from here: a cancel now would only lose the run
            w.commit(parents=[parent_ref(self.model_record), parent_ref(self.data_record)],
                     config={"train": self.cfg.as_dict(), "source": config_source,
                             "device": self.device.split(":")[0], "devices": self.rank.world,
                             "compute_dtype": str(self.dtype),
                             "job": self.ctx.job.id},
                     metrics=metrics,
                     info={"licenses": licences.carry(
                               ws, [parent_ref(self.model_record), parent_ref(self.data_record)],
                               w.path),
                           "summary": {"model": self.model_record.name, "dataset": self.data_record.name,
                                       "steps": state.step, **{k: metrics.get(k) for k in (
                                           "perplexity_before", "perplexity_after")}}})
        return ws.get("run", name)


def run_training(ctx: JobContext) -> dict[str, Any]:
    """The `train` job: params {model, dataset, config (dict), source, name}."""
    # As the memory planner was calibrated: reserved memory stays close to allocated.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    p = ctx.params
    model = ctx.ws.get("model", p["model"])
    data = ctx.ws.get("dataset", p["dataset"])
    cfg = validate(p["config"], source=p.get("source", "config"),
                   context_length=model.summary.get("context_length"))
    if not distributed.in_worker():  # once per attempt: the runner of a data-parallel job says it
        checkpoint = latest_checkpoint(ctx.dir / "work")
        ctx.emit("train-start", attempt=ctx.attempt, max_steps=cfg.max_steps, run=p["name"],
                 step=(_saved_loop(checkpoint) or {}).get("step", 0) if checkpoint else 0)
    stages = train_stages(ctx, p["name"], cfg.max_steps)
    stages.emit("check-inputs", f"checking {model.name} and {data.name} against their manifests")
    manifest.verify(model.path)
    manifest.verify(data.path)
    _same_inputs_as_first_attempt(ctx, model, data)
    existing = _published_by_this_job(ctx, p["name"])
    if existing is not None:  # killed between publishing and being marked done
        return {"run": existing.name, "path": str(existing.path)}
    if cfg.devices > 1 and not distributed.in_worker():
        stages.emit("launch-workers", f"starting {cfg.devices} data-parallel workers")
        return distributed.launch(ctx, cfg.devices)
    try:
        trainer = Trainer(ctx, model, data, cfg, stages)
        state = trainer.fit()
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            last = latest_checkpoint(ctx.dir / "work")
            raise ApplianceError(
                f"out of memory with batch_size {cfg.batch_size} x max_seq_len {cfg.max_seq_len}; "
                f"the last checkpoint is kept ({last.name if last else 'none written yet'})",
                title="Out of memory",
                hint="start a new run with a smaller batch_size or max_seq_len (raise grad_accum to "
                     "keep the effective batch; `appliance plan` shows what fits); `appliance jobs "
                     "resume` retries these settings from the checkpoint, which helps only if "
                     "something else was using the GPU") from None
        raise
    if not trainer.rank.main:
        return {"rank": trainer.rank.rank}
    record = trainer.publish(state, p["name"], p.get("source", "config"))
    return {"run": record.name, "steps": state.step, "path": str(record.path)}


def _same_inputs_as_first_attempt(ctx: JobContext, model: ArtifactRecord, data: ArtifactRecord) -> None:
    """A resumed job must train on the very model and dataset it started with, not on artifacts
    re-imported under the same names."""
    path = ctx.dir / "inputs.json"
    now = {"model": model.manifest_sha256, "dataset": data.manifest_sha256}
    if not path.exists():
        atomic_write_text(path, json.dumps(now))
        return
    first = json.loads(path.read_text())
    changed = [k for k in now if first.get(k) != now[k]]
    if changed:
        raise ApplianceError(f"the {' and '.join(changed)} changed since this job started (same name, "
                             "different manifest)", title="Inputs changed",
                             hint="start a new training run; this job's checkpoints belong to the old inputs")


def _published_by_this_job(ctx: JobContext, name: str) -> ArtifactRecord | None:
    try:
        record = ctx.ws.get("run", name)
    except ApplianceError:
        return None
    if manifest.read(record.path)["config"].get("job") == ctx.job.id:
        return record
    raise AlreadyExistsError(f"run {name!r} already exists (made by another job)",
                             hint="start a new run with another --name; remove the old one first with "
                                  f"`appliance runs rm {name}` if it should be replaced")
