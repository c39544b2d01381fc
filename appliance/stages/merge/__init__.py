"""The merge stage: a run's adapter folded into its base weights, streamed tensor by tensor
(`weights`); its job is `job.run` (kind `merge`)."""
