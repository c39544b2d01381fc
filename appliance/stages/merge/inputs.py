"""What the merge starts from and what it makes: a finished run with its base model and dataset
(`run_inputs`, checked against their manifests), the merged model's name (`merged_name`), and an
earlier artifact found again only if it still matches its manifest (`existing`).

The verify and export stages use these too (the reference of an export is its run's merged model),
so this module imports no other stage.
"""

from __future__ import annotations

from appliance import manifest
from appliance.errors import ApplianceError
from appliance.workspace import ArtifactRecord, Workspace


def merged_name(run: str) -> str:
    return f"{run}-merged"


def existing(ws: Workspace, name: str) -> ArtifactRecord | None:
    """The export artifact `name` if there is one, checked against its manifest (a tampered one
    raises `IntegrityError` rather than being reused)."""
    try:
        record = ws.get("export", name)
    except ApplianceError:
        return None
    manifest.verify(record.path)
    return record


def run_inputs(ws: Workspace, run: str, *, hash_model: bool = True
               ) -> tuple[ArtifactRecord, ArtifactRecord, ArtifactRecord]:
    """The run, its base model and its dataset, checked against their manifests (the model's
    weights by size only when `hash_model` is off: the gate reads its manifest, not its weights)."""
    try:
        record = ws.get("run", run)
    except ApplianceError:
        raise ApplianceError(f"no finished run named {run!r}", title="Not found",
                             hint="`appliance runs list` shows finished runs; a run that is still "
                                  "training or failed has no adapter to export yet") from None
    data = manifest.verify(record.path)
    parents = {p["kind"]: p for p in data["parents"]}
    found = []
    for kind in ("model", "dataset"):
        try:
            parent = ws.get(kind, parents[kind]["name"])
        except (KeyError, ApplianceError):
            raise ApplianceError(f"run {run!r} was trained on {kind} "
                                 f"{parents.get(kind, {}).get('name')!r}, which is no longer in the "
                                 "workspace", title=f"Missing base {kind}",
                                 hint=f"import it again under the same name (appliance {kind}s import)"
                                 ) from None
        manifest.verify(parent.path, full=hash_model or kind != "model")
        found.append(parent)
    return record, found[0], found[1]
