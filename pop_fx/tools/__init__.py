"""Tools around the runtime: none of them is imported by ``torch.compile(model, backend="pop")``.

* ``cli``        — the ``pop-fx`` console script (demo, eval, bench, inspect)
* ``demo``       — SmolLM2 dense vs POP, texts and decode speed
* ``bench``      — decode speed side by side with dense and the sliced ideal
* ``evaluation`` — decode-mode perplexity / agreement of POP, its ablations and static baselines
* ``agreement``  — decode-mode next-token agreement with the dense model
* ``inspect``, ``html_report`` — what the passes match and rewrite, as text, JSON or one HTML page
* ``costmodel``, ``budget`` — FLOPs/bytes per decode step as sympy expressions; total-budget → FFN sparsity
* ``models``     — SmolLM2 from its wheel, tiny random models per family
* ``capture``    — the FX graphs Dynamo hands a backend (tests, inspection)
"""
