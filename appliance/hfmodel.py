"""An HF model folder's tokenizer, stop tokens and probe conversation.

The lowest layer's view of a model folder, shared by the model import stage (which checks them),
training, the export stage and the file-format converters in `export/` (which check a GGUF or an
ONNX graph against them): kept here so that none of those imports a stage to read a tokenizer.
transformers is imported only when a tokenizer is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.errors import ValidationError

# A short conversation every chat template must render faithfully (checked at import, and by
# llama.cpp against a GGUF's template at export).
PROBE = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, like grass."},
]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError(f"{path} must hold a JSON object")
    return data


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise ValidationError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False,
                                             local_files_only=True)
    except Exception as exc:
        raise ValidationError(f"{folder}: the tokenizer does not load: {exc}") from exc


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def stop_token_ids(folder: Path, config: dict[str, Any], tokenizer: Any) -> list[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, deduplicated."""
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.exists():
        ids += _ids(read_json(gen).get("eos_token_id"))
    ids += _ids(config.get("eos_token_id")) + _ids(tokenizer.eos_token_id)
    unique = sorted(set(ids))
    bad = [i for i in unique if not 0 <= i < len(tokenizer)]
    if bad or not unique:
        raise ValidationError(
            f"{folder}: EOS/stop token ids {bad or 'missing'} are not in the vocabulary "
            f"({len(tokenizer)} tokens)", hint="fix eos_token_id in generation_config.json")
    return unique
