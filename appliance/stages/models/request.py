"""What an `import-model` job is asked to do: a local HF folder or GGUF file, or the embedded default.

The CLI's `models import --detach` and the TUI's Models screen build an `ImportModelRequest`
(`for_path` resolves the paths the way the job must see them: absolute, `~` expanded);
`problems()` is checked before the job is queued (`appliance.api`), so a missing file or a bad name
is a refusal naming the field. `to_params()` / `from_params()` are the job row's JSON (unknown keys
of older rows are ignored). Only the standard library and the core at module scope.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from appliance.errors import ValidationError
from appliance.workspace import check_name


@dataclass(frozen=True)
class ImportModelRequest:
    """`default`: the embedded default model (no path); else `path`, an HF folder (safetensors) or
    a .gguf file, with an optional artifact `name` and `chat_template` file."""

    path: str | None = None
    name: str | None = None
    chat_template: str | None = None
    default: bool = False

    kind: ClassVar[str] = "import-model"

    @classmethod
    def for_path(cls, path: str | Path, name: str | None = None,
                 chat_template: str | Path | None = None) -> ImportModelRequest:
        """A path import, its paths absolute (the job runs in its own process)."""
        return cls(path=_absolute(path) if str(path).strip() else None, name=name or None,
                   chat_template=_absolute(chat_template) if chat_template else None)

    def problems(self) -> dict[str, str]:
        """Field -> what is wrong with it; empty when the request can be queued."""
        found: dict[str, str] = {}
        if self.default and self.path:
            found["path"] = "give either a path or the default model, not both"
        elif not self.default and not self.path:
            found["path"] = "give a path: an HF model folder or a .gguf file"
        elif self.path and not Path(self.path).exists():
            found["path"] = f"{self.path} does not exist; pick an HF model folder or a .gguf file"
        if self.name:
            try:
                check_name(self.name, "model name")
            except ValidationError as exc:
                found["name"] = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
        if self.chat_template and not self.default and not Path(self.chat_template).is_file():
            found["chat_template"] = f"{self.chat_template} is not a file"
        return found

    def to_params(self) -> dict[str, Any]:
        return {"default": self.default, "path": self.path, "name": self.name,
                "chat_template": self.chat_template}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ImportModelRequest:
        return cls(path=_text(params.get("path")), name=_text(params.get("name")),
                   chat_template=_text(params.get("chat_template")),
                   default=bool(params.get("default")))


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _text(value: Any) -> str | None:
    return str(value) if value else None
