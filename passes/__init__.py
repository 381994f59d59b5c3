"""FX graph passes of the ``pop`` backend, run in the order of ``passes.pipeline.PASSES`` (see README.md here).

    from passes.pipeline import run_passes
    rw = run_passes(gm, PopConfig(sparsity=0.5))   # rewritten copy, sites, skipped blocks, state tensors, counts
"""

DISTRIBUTION = "pop-fx"
"""the distribution this top-level package ships in (``pop_fx`` imports this one, by its location)"""
