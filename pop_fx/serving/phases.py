"""What each row of a ragged serving step is: one small int per token row (``phase [T]``).

    PREFILL  a prompt chunk before the last: dense; its h² adds to the slot's running Σh²
    LAST     the prompt's last chunk (or the whole prompt): dense; adds to Σh², then fixes the partition
    DECODE   a generated token: R ∪ the step's top candidates of the slot's partition
    DENSE    dense and stateless: a preempted request's prompt recomputed (its partition was kept)

A chunk before the last must run dense: its partition is not known yet (docs/spec.md's prefill="dense").
"""

PREFILL, LAST, DECODE, DENSE = 0, 1, 2, 3

__all__ = ["DECODE", "DENSE", "LAST", "PREFILL"]
