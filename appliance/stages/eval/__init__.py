"""The eval stage: did the fine-tune help? Targets (a base model, a run's adapter model, its merged
model, its GGUF/ONNX exports) answer the same held-out conversations through their own runtimes,
and their answers are scored against the reference answers.

- `metrics`: the text metrics (ROUGE here, BLEU and chrF through sacrebleu) and how text in any
  script is tokenized for them;
- `targets`: what a target name means and the runtime that answers for it;
- `results`: the per-item answers written as they are made (a resumed job skips finished items),
  deltas to the first target, flips, the summary table and the Markdown report;
- `judge`: optionally, a local GGUF compares the base's answer with each target's, both orders,
  reading its verdict from next-token probabilities; `rubric`: the prompt it reads (shipped in
  `appliance/data/judge-rubric.md`, or the operator's file);
- `evaluate`: one evaluation end to end, writing the `evals/<name>/` artifact;
- `job`: its job function `job.run` (kind `eval`); `request`: its typed request.
"""
