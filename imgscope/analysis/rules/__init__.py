"""Each format's own check rules: `rules/<format>.py` exposes `check(ctx)`.

Module flags read by the engine (analysis/check.py):
  counts_parse_findings  False when the rules count the driver's findings themselves
  counts_generic         False when the generic layout rules must not add to the counters
  shares_host_data       True when guest ranges may legally share host bytes (qcow2)
  uses_layout            False when the rules need neither the resolved chain nor the host
                         layout (then no generic layout rules; qcow2: refcounts cover them)
  unreferenced_is_suspect True when host bytes owned by no structure are worth a finding
                         (formats whose writers leave no gaps; default False)
"""
