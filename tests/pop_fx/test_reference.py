"""The eager POP reference on tiny random models of every family."""

import pytest
import torch

from pop_fx import PopConfig, reference
from pop_fx.tools.agreement import decode_logits
from pop_fx.tools.models import tiny_model
from pop_fx.partition import importance, partition_sizes, split, top_k, weight_only_scores
from pop_fx.sites import find_module_sites

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3", "phi3", "gpt2", "opt", "mixtral", "qwen2_moe"]

# (kind, count) per family: 2 layers; MoE families have 4 experts per layer.
EXPECTED_SITES = {
    "llama": {"gated": 2},
    "qwen2": {"gated": 2},
    "qwen3": {"gated": 2},
    "mistral": {"gated": 2},
    "gemma": {"gated": 2},
    "gemma3": {"gated": 2},
    "phi3": {"fused_gated": 2},
    "gpt2": {"plain": 2},
    "opt": {"plain": 2},
    "mixtral": {"expert": 8},
    "qwen2_moe": {"expert": 8, "shared_expert": 2},
    "qwen3_moe": {"expert": 8},
    "olmoe": {"expert": 8},
}

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_model(family)
        return cache[family]

    return get


def prompts(n=2, length=7, seed=0):
    return torch.randint(3, 200, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(EXPECTED_SITES))
def test_sites_kinds_and_counts(models, family):
    sites, skipped = find_module_sites(models(family))
    counts = {}
    for s in sites:
        counts[s.kind] = counts.get(s.kind, 0) + 1
        assert s.down_weight.shape[s.channel_dim] == s.d_ff
        assert all(w.shape[0] == s.d_ff for w in s.in_weights)
    assert counts == EXPECTED_SITES[family]
    assert skipped == []
    assert not any(p.endswith(("gate", "router", "shared_expert_gate")) for p in (s.path for s in sites))


def test_vision_tower_is_skipped(models):
    model = torch.nn.Module()
    model.vision_tower = torch.nn.Module()
    model.vision_tower.mlp = models("llama").model.layers[0].mlp
    model.lm = models("llama").model.layers[1]
    sites, skipped = find_module_sites(model)
    assert [s.path for s in sites] == ["lm.mlp"]
    assert skipped == [("vision_tower.mlp", "vision tower runs only in prefill")]


def test_shape_disagreement_is_reported_not_a_site():
    block = torch.nn.Module()
    block.gate_proj, block.up_proj, block.down_proj = torch.nn.Linear(8, 16), torch.nn.Linear(8, 12), torch.nn.Linear(16, 8)
    sites, skipped = find_module_sites(block)
    assert sites == [] and len(skipped) == 1 and "shapes disagree" in skipped[0][1]


@pytest.mark.parametrize("family", FAMILIES)
def test_r0_generate_is_dense_bit_for_bit(models, family):
    model = models(family)
    ids = prompts()
    dense = model.generate(ids, **GEN)
    dense_logits = decode_logits(model, ids, 4)
    with reference.pruned(model, sparsity=0.0):
        assert torch.equal(model.generate(ids, **GEN), dense)
        assert torch.equal(decode_logits(model, ids, 4), dense_logits)


def _count_decode_channels(model, cfg, ids):
    """Nonzero channels of H per row at every decode step, seen after the reference's own hook."""
    counts = []
    with reference.pruned(model, cfg) as policy:
        handles = []
        for s in find_module_sites(model)[0]:
            if s.down is not None:
                handles.append(s.down.register_forward_pre_hook(
                    lambda m, a, p=s.path: counts.append((p, (a[0].reshape(-1, a[0].shape[-1]) != 0).sum(-1)))
                    if a[0].reshape(-1, a[0].shape[-1]).shape[0] == ids.shape[0] else None))
        logits = decode_logits(model, ids, 5)
        for h in handles:
            h.remove()
    return counts, logits, policy


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_half_sparsity_prunes_and_restores(models, family, scope):
    model = models(family)
    ids = prompts(length=9)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = decode_logits(model, ids, 5)
    cfg = PopConfig(sparsity=0.5, scope=scope)
    counts, logits, policy = _count_decode_channels(model, cfg, ids)
    assert not torch.equal(logits, dense)
    sites = find_module_sites(model)[0]
    for s in sites:
        n_keep = partition_sizes(s.d_ff, 0.5, 0.1).n_keep
        st = policy.states[s.path]
        if s.kind != "expert":
            assert st.steps == ids.shape[1] - 5
            assert st.last_keep.sum(-1).eq(n_keep).all()
    dense_paths = {s.path: partition_sizes(s.d_ff, 0.5, 0.1).n_keep for s in sites if s.down is not None}
    assert {p for p, _ in counts} == set(dense_paths)
    for path, c in counts:
        # ReLU (OPT) can zero a kept channel by itself; with any other activation exactly n_keep are nonzero.
        assert (c <= dense_paths[path]).all() if family == "opt" else c.eq(dense_paths[path]).all()
    # restored: same outputs, same weights, no hooks or patches left behind
    assert torch.equal(decode_logits(model, ids, 5), dense)
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    for m in model.modules():
        assert not m._forward_pre_hooks and "forward" not in m.__dict__


def test_prefill_mask_is_keep_set_of_eq3_importance(models):
    model = models("llama")
    ids = prompts(length=6)
    site = find_module_sites(model)[0][0]
    seen = []
    handle = site.down.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))  # runs before POP's hook
    with reference.pruned(model, sparsity=0.5) as policy:
        model(ids)
    handle.remove()
    sizes = partition_sizes(site.d_ff, 0.5, 0.1)
    wd = site.down_weight.norm(dim=0)
    expected = top_k(importance(seen[0], wd), sizes.n_keep)
    assert policy.states[site.path].last_keep.nonzero().flatten().tolist() == expected.tolist()
    R, C, _ = split(importance(seen[0], wd), sizes)
    assert torch.equal(policy.states[site.path].R, R) and torch.equal(policy.states[site.path].C, C)


def test_prefill_dense_keeps_prefill_exact(models):
    model = models("qwen2")
    ids = prompts(length=8)
    with torch.no_grad():
        dense = model(ids).logits
        with reference.pruned(model, sparsity=0.5, prefill="dense"):
            assert torch.equal(model(ids).logits, dense)
        with reference.pruned(model, sparsity=0.5, prefill="pruned"):
            assert not torch.equal(model(ids).logits, dense)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_padding_excluded_sequence_scope_matches_alone(models, family):
    model = models(family)
    long, short = prompts(1, 9, seed=1), prompts(1, 5, seed=2)
    pad = model.config.pad_token_id
    ids = torch.cat([long, torch.cat([torch.full((1, 4), pad), short], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)]).long()
    gen = dict(GEN, pad_token_id=pad)
    with reference.pruned(model, sparsity=0.5, scope="sequence"):
        batched = model.generate(ids, attention_mask=mask, **gen)
        alone_long = model.generate(long, **gen)
        alone_short = model.generate(short, **gen)
    assert torch.equal(batched[0], alone_long[0])
    assert torch.equal(batched[1, 4:], alone_short[0])


def test_padding_tokens_do_not_shape_the_partition(models):
    model = models("llama")
    site = find_module_sites(model)[0][0]
    ids = prompts(1, 6, seed=3)
    states = []
    for junk in (7, 150):  # different padding token values, same real tokens
        padded = torch.cat([torch.full((1, 3), junk), ids], 1)
        mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
        with reference.pruned(model, sparsity=0.5) as policy:
            model(padded, attention_mask=mask)
        states.append((policy.states[site.path].R, policy.states[site.path].C))
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])


def test_sequence_and_batch_scope_differ(models):
    model = models("llama")
    ids = torch.cat([prompts(1, 8, seed=4), prompts(1, 8, seed=5)])
    out = {}
    for scope in ("batch", "sequence"):
        with reference.pruned(model, sparsity=0.5, scope=scope) as policy:
            out[scope] = decode_logits(model, ids, 5)
        site_state = policy.states["model.layers.0.mlp"]
        assert site_state.R.dim() == (1 if scope == "batch" else 2)
    assert not torch.equal(out["batch"], out["sequence"])


def test_gamma_zero_decode_mask_is_the_prefill_mask(models):
    model = models("qwen3")
    ids = prompts(length=8)
    with reference.pruned(model, PopConfig.static(0.5)) as policy:
        model(ids[:, :5])
        prefill_keep = {p: s.last_keep.clone() for p, s in policy.states.items()}
        decode_logits(model, ids, 5)
        for p, s in policy.states.items():
            assert torch.equal(s.last_keep, prefill_keep[p]) and s.steps == 3


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_masked_equals_zeroed_down_columns(models, family):
    model = models(family)
    ids = prompts(length=6)
    sites = find_module_sites(model)[0]
    g = torch.Generator().manual_seed(0)
    masks = {s.path: torch.rand(s.d_ff, generator=g) > 0.5 for s in sites}
    with torch.no_grad():
        with reference.masked(model, masks):
            got = model(ids).logits
        saved = {s.path: s.down_weight.clone() for s in sites}
        for s in sites:
            shape = [1] * s.down_weight.dim()
            shape[s.channel_dim] = -1
            s.down_weight.mul_(masks[s.path].view(shape).to(s.down_weight.dtype))
        try:
            want = model(ids).logits if family != "mixtral" else None
        finally:
            for s in sites:
                s.down_weight.copy_(saved[s.path])
        dense = model(ids).logits
    assert not torch.allclose(got, dense, atol=1e-4)
    if want is not None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_masked_rejects_unknown_paths_and_bad_masks(models):
    model = models("llama")
    with pytest.raises(ValueError, match="model.layers.0.mlp"):
        with reference.masked(model, {"nope": torch.ones(128, dtype=torch.bool)}):
            pass
    with pytest.raises(ValueError, match=r"\(128,\)"):
        with reference.masked(model, {"model.layers.0.mlp": torch.ones(5, dtype=torch.bool)}):
            pass


def _starve_expert(model, expert):
    """Route every token away from ``expert`` (returns the function removing the hooks)."""

    def hook(router, args, out):
        logits, scores, idx = out
        idx = idx.clone()
        for row in range(idx.shape[0]):
            for k in range(idx.shape[1]):
                if idx[row, k] == expert:
                    idx[row, k] = next(e for e in range(router.num_experts) if e != expert and e not in idx[row])
        return logits, scores, idx

    handles = [l.mlp.gate.register_forward_hook(hook) for l in model.model.layers]
    return lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("empty_expert", ["weights", "dense"])
def test_expert_without_prefill_tokens_uses_the_fallback(models, empty_expert):
    model = models("mixtral")
    restore = _starve_expert(model, 3)
    try:
        with reference.pruned(model, sparsity=0.5, empty_expert=empty_expert) as policy:
            decode_logits(model, prompts(length=7), 5)
    finally:
        restore()
    site = next(s for s in find_module_sites(model)[0] if s.path == "model.layers.0.mlp.experts.3")
    st = policy.states[site.path]
    if empty_expert == "dense":
        assert st.dense is True and st.R is None
    else:
        sizes = partition_sizes(site.d_ff, 0.5, 0.1)
        R, C, _ = split(weight_only_scores(site.down_weight.norm(dim=0), site.in_weights), sizes)
        assert torch.equal(st.R, R) and torch.equal(st.C, C)
    other = policy.states["model.layers.0.mlp.experts.0"]
    assert other.dense is False and other.R is not None


def test_one_token_prompt_is_a_prefill(models):
    model = models("llama")
    with reference.pruned(model, sparsity=0.5) as policy:
        model.generate(prompts(1, 1), **GEN)
    assert all(s.steps == GEN["max_new_tokens"] - 1 for s in policy.states.values())


# Layer-adaptive budgets (PopConfig.budget, pop_fx/allocation.py): the prefill runs with the uniform sizes and
# scores every site; once the forward is done each site gets its bucket, and decode runs with it.


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_adaptive_budget_keeps_the_total_per_decode_step(models, family, scope):
    model = models(family)
    ids = prompts(n=3, length=9, seed=6)
    with reference.pruned(model, PopConfig(sparsity=0.5, budget="mass", scope=scope)) as policy:
        model(ids[:, :5])
        prefill_keep = {p: s.last_keep.sum(-1) for p, s in policy.states.items()}
        decode_logits(model, ids, 5)
    rows = 3 if scope == "sequence" else 1
    groups: dict[int, list] = {}
    for p, st in policy.states.items():
        uniform = partition_sizes(st.site.d_ff, 0.5, 0.1)
        assert prefill_keep[p].eq(uniform.n_keep).all()  # the prefill itself: the uniform sizes (one pass)
        if st.site.kind == "expert":
            assert st.allocated is None  # experts keep the uniform budget
            continue
        assert len(st.allocated) == rows
        keep = st.last_keep.reshape(-1, st.site.d_ff).sum(-1)
        assert keep.tolist() == [s.n_keep for s in st.allocated] * (3 // rows if rows == 1 and st.last_keep.dim() == 2 else 1)
        groups.setdefault(st.site.d_ff, []).append([s.n_keep for s in st.allocated])
    for d_ff, per_site in groups.items():  # the total per sequence (one d_ff group) is the uniform one
        totals = torch.tensor(per_site).sum(0)
        assert totals.eq(len(per_site) * partition_sizes(d_ff, 0.5, 0.1).n_keep).all()


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_adaptive_budget_with_no_room_is_uniform_bit_for_bit(models, scope, monkeypatch):
    from pop_fx import allocation

    model = models("qwen3")
    ids = prompts(n=3, length=9, seed=7)
    with reference.pruned(model, PopConfig(sparsity=0.5, scope=scope)):
        uniform = decode_logits(model, ids, 5)
    monkeypatch.setattr(allocation, "MAX_STEPS", 0)  # one bucket: the adaptive path must reproduce uniform POP
    with reference.pruned(model, PopConfig(sparsity=0.5, budget="mass", scope=scope)) as policy:
        adaptive = decode_logits(model, ids, 5)
    assert torch.equal(adaptive, uniform)
    assert all(st.allocated is not None for st in policy.states.values())


def test_adaptive_decode_mask_is_R_and_the_best_candidates(models):
    model = models("llama")
    ids = prompts(n=2, length=8, seed=8)
    site = find_module_sites(model)[0][1]
    seen = []
    handle = site.down.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))  # before POP's hook
    with reference.pruned(model, PopConfig(sparsity=0.5, budget="mass", scope="sequence")) as policy:
        decode_logits(model, ids, 5)
    handle.remove()
    st = policy.states[site.path]
    wd = site.down_weight.norm(dim=0)
    prompt_scores = importance(seen[0], wd, per_sequence=True)
    for b in range(2):
        sizes = st.allocated[b]
        R, C, _ = split(prompt_scores[b], sizes)
        assert st.R[b].nonzero().flatten().tolist() == R.tolist() and torch.equal(st.C[b], C)
        step = seen[-1][b, 0]  # the last decode step's H of sequence b
        chosen = C[top_k(step[C].abs() * wd[C], sizes.n_select)]
        want = torch.zeros(site.d_ff, dtype=torch.bool)
        want[R] = True
        want[chosen] = True
        assert torch.equal(st.last_keep[b], want)
