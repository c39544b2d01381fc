"""The merge stage: a run's adapter folded into its base weights, the `<run>-merged` artifact.

- `merged`: the stage's operation (`merge`; `merged_model` for the export stage, which merges first);
- `weights`: the merge itself, streamed tensor by tensor, and the merged-vs-adapter logits gap;
- `inputs`: a run's inputs checked against their manifests, the merged model's name, reuse of an
  existing artifact (shared with the verify and export stages);
- `job`: its job function `job.run` (kind `merge`); `request`: its typed request.

The merged model's informational `parity.json` (the adapter model as trained vs merged) is scored
with the verify stage's `scoring`.
"""
