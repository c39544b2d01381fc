"""The `bundle-create` and `bundle-import` jobs: progress, cancel, and the result for the CLI."""

from __future__ import annotations

from typing import Any

from appliance.jobs import JobContext
from appliance.stages.bundle import create, importer
from appliance.stages.bundle.request import BundleCreateRequest, BundleImportRequest


def run_create(ctx: JobContext) -> dict[str, Any]:
    made = create.create(ctx.ws, BundleCreateRequest.from_params(ctx.params), ctx)
    ctx.log(f"wrote {made.path} ({made.size / 2**20:.1f} MiB): {', '.join(made.artifacts)}, "
            + (f"signed by key {made.key_id}" if made.key_id else "UNSIGNED"))
    return {"bundle": made.name, "path": str(made.path), "size": made.size,
            "exports": made.artifacts, "key_id": made.key_id, "doc_sha256": made.doc_sha256}


def run_import(ctx: JobContext) -> dict[str, Any]:
    done = importer.import_bundle(ctx.ws, BundleImportRequest.from_params(ctx.params), ctx)
    ctx.log(f"imported {', '.join(done.imported) or 'nothing new'}"
            + (f" (already here, identical: {', '.join(done.already)})" if done.already else ""))
    return {"bundle": done.bundle, "imported": done.imported, "already": done.already,
            "key_id": done.key_id, "trusted_as": done.trusted_as}
