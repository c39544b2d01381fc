"""Teacher-forced logits from a llama.cpp context at chosen positions only.

llama-cpp-python's `Llama.eval` asks for every position's logits (`logits_all`) or only the last;
scoring a reference answer needs the rows after the answer's positions. Flagging just those in the
batch lets llama.cpp skip the output layer (a fifth of SmolLM2's compute) for the prompt and keeps
no [n_ctx, vocab] buffer; and a context that already holds the prompt (the engine that just
answered it) evaluates only the answer. Shared by the engine (`LlamaEngine.logits_at`) and the
export stage's scorer (`export.gguf.GgufLM`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from appliance.errors import ValidationError


def decode_at(llm: Any, ids: Sequence[int], start: int, want: Sequence[int]) -> Any:
    """Evaluate `ids` at positions start.. of `llm`'s context (its cache keeps what precedes
    `start` and drops the rest); float32 rows of the logits after each position in `want`
    (absolute positions, ascending, within the evaluated ones). Keeps `llm`'s token record in step
    with its cache, so its own prefix reuse stays right."""
    import numpy as np

    if not ids:
        raise ValidationError("no tokens to evaluate")
    n_ctx = llm.n_ctx()
    if start + len(ids) > n_ctx:
        raise ValidationError(f"{start + len(ids)} tokens do not fit the context of {n_ctx}",
                              hint="open the model with a larger context")
    wanted = set(want)
    if len(wanted) != len(want) or list(want) != sorted(wanted) or any(
            not start <= p < start + len(ids) for p in wanted):
        raise ValidationError(f"positions must ascend within {start}..{start + len(ids) - 1}")
    n_vocab = llm.n_vocab()
    ctx, batch, step = llm._ctx, llm._batch, llm.n_batch
    ctx.kv_cache_seq_rm(-1, start, -1)
    llm.n_tokens = start
    out = np.empty((len(want), n_vocab), dtype=np.float32)
    row = 0
    for lo in range(0, len(ids), step):
        chunk, flagged, b = ids[lo:lo + step], [], batch.batch
        b.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            pos = start + lo + i
            b.token[i], b.pos[i], b.n_seq_id[i] = int(token), pos, 1
            b.seq_id[i][0] = 0
            b.logits[i] = pos in wanted
            if pos in wanted:
                flagged.append(i)
        ctx.decode(batch)
        llm.input_ids[start + lo:start + lo + len(chunk)] = chunk
        llm.n_tokens = start + lo + len(chunk)
        for i in flagged:
            out[row] = np.ctypeslib.as_array(ctx.get_logits_ith(i), shape=(n_vocab,))
            row += 1
    return out
