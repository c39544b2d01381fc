"""The verify stage: an export measured against the model it came from (`parity`: per-type
thresholds on perplexity, KL and top-1 agreement); its job is `job.run` (kind `verify`)."""
