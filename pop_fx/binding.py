"""A compiled graph finds its sites' state from the weights it is called with.

Dynamo compiles a graph once and calls it for every module instance whose code and guards match, with that
instance's weights as inputs: two models of one class, a deepcopy, a model whose weights were reloaded. So a
rewritten graph holds no state. It holds a ``Slot`` per site — which of its inputs are the site's weights, and
how to make the site's state from them — and a ``Binder`` resolves the slots at every call: the state of the
weights it sees (created on first sight), refreshed when a weight changed in place (``state.stamp``), with
the report's notes recorded for every instance it serves. A call with the weights of the previous call costs
one identity and version check per weight.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from pop_fx import state as _state
from pop_fx.config import PopConfig


@dataclass(frozen=True)
class Slot:
    """One site's state placeholders in a rewritten graph."""

    config: PopConfig
    spec: _state.SiteSpec | None
    """a dense site's spec; None for a routed-experts module"""
    weights: tuple[tuple[str, int | None], ...]
    """(weight name, index of the graph input that carries it; None for a missing bias)"""
    names: tuple[str, ...]
    """the state tensors the slot's placeholders stand for, in placeholder order"""
    phase: str
    """"prefill" or "decode": the graph kind, for the report"""
    info: dict = field(default_factory=dict, compare=False)
    """pattern, activation and module path, for the report"""

    def weights_of(self, args: Sequence) -> dict:
        return {name: (None if i is None else args[i]) for name, i in self.weights}

    def resolve(self, args: Sequence) -> tuple[_state.State, list[torch.Tensor]]:
        w = self.weights_of(args)
        if self.spec is None:
            st = _state.get_or_create_experts(self.config, w)
        else:
            st = _state.get_or_create(self.spec, self.config, w)
        st.graphs.add(self.phase)
        st.info.update(self.info)
        return st, st.tensors_for(self.names, w)


@dataclass(frozen=True)
class Note:
    """What a graph did with one FFN-like block, recorded for the instance whose weight is input ``index``."""

    index: int
    kind: str | None
    reason: str
    path: str
    matched: bool
    graph: str


@dataclass
class _Bound:
    refs: list
    """weak references to the watched inputs (the weights), in ``Binder.watch`` order"""
    stamps: tuple
    states: list
    tensors: list[torch.Tensor]


class Binder:
    """The state tensors to append to a rewritten graph's inputs, found from the inputs of each call."""

    def __init__(self, slots: Sequence[Slot], notes: Sequence[Note], config: PopConfig, phase: str):
        self.slots, self.notes, self.config, self.phase = list(slots), list(notes), config, phase
        self.watch = sorted({i for s in self.slots for _, i in s.weights if i is not None} | {n.index for n in notes})
        self._bound: WeakIdKeyDictionary = WeakIdKeyDictionary()  # first watched weight -> _Bound

    def __call__(self, args: Sequence) -> list[torch.Tensor]:
        if not self.watch:
            return []
        b = self._bound.get(args[self.watch[0]])
        if b is None or not self._same(b, args):
            b = self._bind(args)
        if self.phase == "decode":
            for slot, st in zip(self.slots, b.states):
                if st.stale:  # reset (a new generate) or new weights, and no prefill since: the data-free partition
                    with _state._lock:
                        if st.stale:
                            st.initialize(slot.weights_of(args))
                            st.stale = False
        else:
            for st in b.states:
                st.stale = False  # the prefill writes the partition
        return b.tensors

    def _same(self, b: _Bound, args: Sequence) -> bool:
        for r, i in zip(b.refs, self.watch):
            if r() is not args[i]:
                return False
        return _state.stamp(args[i] for i in self.watch) == b.stamps

    def _bind(self, args: Sequence) -> _Bound:
        states, tensors = [], []
        for slot in self.slots:
            st, ts = slot.resolve(args)
            states.append(st)
            tensors.extend(ts)
        for n in self.notes:
            _state.note(args[n.index], self.config, n.kind, n.reason, path=n.path, matched=n.matched, graph=n.graph)
        b = _Bound([weakref.ref(args[i]) for i in self.watch], _state.stamp(args[i] for i in self.watch), states,
                   tensors)
        self._bound[args[self.watch[0]]] = b
        return b


__all__ = ["Binder", "Note", "Slot"]
