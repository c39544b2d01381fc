"""The verify stage: an export measured against the model it came from.

- `parity`: the measures (perplexity, KL, top-1 agreement) and their per-type thresholds;
- `scoring`: the held-out conversations, the scorers (the merged model as the reference, the
  adapter model as trained) and one job's scoring (the reference scored once per job);
- `gate`: the parity gate an export's artifacts pass before they are committed (`Gate`), and
  `verify`, the gate run again on an existing export;
- `job`: its job function `job.run` (kind `verify`); `request`: its typed request.
"""
