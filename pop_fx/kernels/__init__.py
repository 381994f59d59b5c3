"""Kernels of the decode path, one op per file: the Triton kernel, its launcher and a pure-torch reference.

* ``candidate_topk``  — per-step candidate scores and top-k
* ``decode_down``     — ``pop::decode``: down projection over R ∪ selected (batch scope)
* ``decode_seq``      — ``pop::decode_seq``: per-sequence selection and masked down (scope="sequence")
* ``layout``          — the prefill-time R ∪ C layout copy
"""
