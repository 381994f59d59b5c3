"""A small continuous-batching engine over a Hugging Face Llama-family model: the contract POP must keep.

    eng = Engine(model, PopConfig(sparsity=0.5), max_slots=4)
    results = run_schedule(eng, [Spec(prompt, max_new=8, arrival=0), ...], random.Random(0))

What it does with each step, as vLLM does: requests arrive, are admitted into free slots, have their prompts
cut into chunks (chunked prefill) and decode one token per step, all packed into ONE flat batch of T token
rows with a token→slot map and a phase per row; they finish, or are preempted (their KV cache dropped and
recomputed on resume, their POP state kept: n_R + n_C indices per layer).

What it does differently: attention stays per request (each request owns a ``DynamicCache`` and its rows
attend only to it); the rest of every decoder layer — norms, residuals and the FFN where POP's state
lives — runs once over the flat batch. That is the part the ragged ops are about; a paged flat attention
would change no FFN row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

from pop_fx.config import PopConfig
from pop_fx.serving.ffn import StepInfo, reset_slot, wrap_mlps
from pop_fx.serving.phases import DECODE, DENSE, LAST, PREFILL


@dataclass
class Spec:
    prompt: list[int]
    max_new: int
    arrival: int = 0
    """the step at which the request arrives"""


@dataclass
class Request:
    rid: int
    spec: Spec
    out: list[int] = field(default_factory=list)
    slot: int | None = None
    cache: object | None = None
    feed: list[int] = field(default_factory=list)
    """tokens to prefill: the prompt, or on resume the prompt and every generated token (recompute)"""
    fed: int = 0
    recompute: bool = False
    chunks: int = 0
    """chunks the prompt was prefilled in (fresh prefills only)"""
    saved: list | None = None
    """the POP state of each layer while preempted"""
    preemptions: int = 0

    @property
    def done(self) -> bool:
        return len(self.out) >= self.spec.max_new

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.feed)


class Engine:
    """Runs ragged steps of a Llama-family model with POP's FFNs per request slot (see the module doc)."""

    def __init__(self, model: nn.Module, config: PopConfig | None = None, *, max_slots: int, layouts: bool = False):
        self.model = model
        self.step_info = StepInfo()
        self.ffns = wrap_mlps(model, config, max_slots=max_slots, step=self.step_info, layouts=layouts)
        self.free = list(range(max_slots))

    # ---- slots --------------------------------------------------------------------------------------
    def admit(self, req: Request) -> None:
        from transformers import DynamicCache

        req.slot = self.free.pop(0)
        req.cache = DynamicCache(config=self.model.config)
        req.fed = 0
        if req.saved is not None:  # resume: recompute the KV cache, keep the partition
            for f, saved in zip(self.ffns, req.saved):
                f.import_slot(req.slot, saved)
            req.feed, req.recompute, req.saved = req.spec.prompt + req.out, True, None
        else:
            reset_slot(self.ffns, req.slot)
            req.feed, req.recompute, req.out, req.chunks = list(req.spec.prompt), False, [], 0

    def release(self, req: Request, *, keep_state: bool = False) -> None:
        """Finish (or preempt, ``keep_state``: its partition is kept if it has one) and free the slot."""
        if keep_state and req.out:
            req.saved = [f.export_slot(req.slot) for f in self.ffns]
        else:
            req.saved = None  # preempted mid-prompt: it starts again from scratch
        reset_slot(self.ffns, req.slot)
        self.free.append(req.slot)
        req.slot, req.cache = None, None

    # ---- one step ---------------------------------------------------------------------------------
    def rows(self, req: Request, n: int) -> tuple[list[int], list[int]]:
        """The next ``n`` token ids of ``req`` and their phases."""
        if not req.prefilling:
            return [req.out[-1]], [DECODE]
        a, b = req.fed, req.fed + n
        ids = req.feed[a:b]
        if req.recompute:
            P = len(req.spec.prompt)
            return ids, [DENSE if i < P else DECODE for i in range(a, b)]
        return ids, [LAST if b == len(req.feed) else PREFILL] * len(ids)

    @torch.no_grad()
    def forward(self, items: list[tuple[Request, list[int], list[int]]]) -> list[torch.Tensor]:
        """One flat step: ``items`` = (request, token ids, phases) each; returns each item's last-row logits."""
        m = self.model
        inner = m.model
        ids, slot, phase, pos, spans = [], [], [], [], []
        for req, tok, ph in items:
            past = req.cache.get_seq_length()
            spans.append((len(ids), len(ids) + len(tok), past))
            ids += tok
            slot += [req.slot] * len(tok)
            phase += ph
            pos += range(past, past + len(tok))
        dev = m.lm_head.weight.device
        x = inner.embed_tokens(torch.tensor([ids], device=dev))
        cos, sin = inner.rotary_emb(x, torch.tensor([pos], device=dev))
        self.step_info.set(torch.tensor(slot, device=dev), torch.tensor(phase, device=dev))
        masks = [_chunk_mask(b - a, past, x.dtype, dev) for a, b, past in spans]
        for layer, ffn in zip(inner.layers[: m.config.num_hidden_layers], self.ffns):
            hn = layer.input_layernorm(x)
            att = [layer.self_attn(hidden_states=hn[:, a:b], position_embeddings=(cos[:, a:b], sin[:, a:b]),
                                   attention_mask=mask, cache=req.cache)[0]
                   for (a, b, _), mask, (req, _, _) in zip(spans, masks, items)]
            x = x + torch.cat(att, dim=1)
            x = x + ffn(layer.post_attention_layernorm(x))
        x = inner.norm(x)
        last = torch.tensor([b - 1 for _, b, _ in spans], device=dev)
        return list(m.lm_head(x[0, last]))


def _chunk_mask(L: int, past: int, dtype, device) -> torch.Tensor | None:
    """Additive causal mask [1, 1, L, past + L] of a chunk on a cache of ``past`` tokens (None for one token)."""
    if L == 1:
        return None
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(past + L, device=device)[None, :]
    return torch.where(j <= past + i, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


@dataclass
class Policy:
    """How a randomized schedule packs steps (the harness draws these)."""

    token_budget: int = 16
    """token rows per step at most"""
    max_chunk: int = 8
    """a prefill chunk is 1..max_chunk tokens (drawn per chunk)"""
    p_preempt: float = 0.0
    """chance per step that one running request is preempted"""
    shuffle: bool = True
    """pack the step's requests in a random order"""


def run_schedule(engine: Engine, specs: list[Spec], rng: random.Random, policy: Policy | None = None,
                 max_steps: int = 10_000) -> list[Request]:
    """Admit, chunk, batch, preempt and finish ``specs`` (FIFO admission); returns the finished requests."""
    policy = policy or Policy()
    reqs = [Request(i, s) for i, s in enumerate(specs)]
    pending = sorted(reqs, key=lambda r: (r.spec.arrival, r.rid))
    waiting: list[Request] = []
    running: list[Request] = []
    for step in range(max_steps):
        while pending and pending[0].spec.arrival <= step:
            waiting.append(pending.pop(0))
        # Preempt only decoding requests, each at most twice: preempting mid-prompt (which restarts the prompt)
        # or without bound can starve a request forever under a small token budget.
        victims = [r for r in running if not r.prefilling and r.preemptions < 2]
        if victims and policy.p_preempt and rng.random() < policy.p_preempt:
            victim = rng.choice(victims)
            running.remove(victim)
            engine.release(victim, keep_state=True)
            victim.preemptions += 1
            waiting.insert(0, victim)
        while waiting and engine.free:
            req = waiting.pop(0)
            engine.admit(req)
            running.append(req)
        order = list(running)
        if policy.shuffle:
            rng.shuffle(order)
        budget, items = policy.token_budget, []
        for req in order:
            if budget == 0:
                break
            n = 1 if not req.prefilling else min(len(req.feed) - req.fed, rng.randint(1, policy.max_chunk), budget)
            ids, ph = engine.rows(req, n)
            items.append((req, ids, ph))
            budget -= len(ids)
        if not items:
            if not pending and not waiting:
                return reqs
            continue
        logits = engine.forward(items)
        for (req, ids, _), lg in zip(items, logits):
            if req.prefilling:
                req.fed += len(ids)
                req.chunks += not req.recompute
                if req.prefilling:
                    continue  # a chunk before the last: no token yet
                # (after a preemption's recompute, the last row is the latest generated token: its logits give
                # the next one, as for any finished prompt)
            req.out.append(int(lg.argmax()))
            if req.done:
                running.remove(req)
                engine.release(req)
    raise RuntimeError(f"schedule did not finish in {max_steps} steps")


@torch.no_grad()
def solo(model: nn.Module, prompt: list[int], max_new: int, config: PopConfig) -> list[int]:
    """The oracle: ``reference.pruned`` (scope="sequence", prefill="dense") on this one request, its whole
    prompt in one forward, greedy."""
    from transformers import DynamicCache

    from pop_fx.reference import pruned

    cfg = config.replace(scope="sequence", prefill="dense")
    dev = model.lm_head.weight.device
    out: list[int] = []
    with pruned(model, cfg):
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([prompt], device=dev)
        while len(out) < max_new:
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
            out.append(int(logits.argmax()))
            ids = torch.tensor([[out[-1]]], device=dev)
    return out


__all__ = ["Engine", "Policy", "Request", "Spec", "run_schedule", "solo"]
