"""The evaluation harness on a tiny random Llama and a byte-level "tokenizer" (about 30 s on 2 cores)."""

import argparse
import csv
import io
import json
import math
import random

import pytest
import torch

from pop_fx.tools import evaluation as ev

P, T = 6, 5


ByteTokenizer = ev.ByteTokenizer


class NoOffsetsTokenizer(ev.ByteTokenizer):
    """Like a slow HF tokenizer: no character offsets."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available")
        return super().__call__(text, add_special_tokens)


def _tiny_llama():
    try:
        from pop_fx.tools.models import tiny_model

        model = tiny_model("llama", seed=0)
    except ImportError:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        )
    assert model.config.vocab_size >= 128
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def text():
    rnd = random.Random(0)
    words = ["the", "and", "of", "lord", "said", "unto", "him", "land", "went", "came", "day", "son", "people"]
    return "\n".join(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 12))) for _ in range(300)) + "\n"


@pytest.fixture(scope="module")
def result(model, text):
    return ev.evaluate(
        model, ByteTokenizer(), text, methods=ev.DEFAULT_METHODS, sparsities=[0.0, 0.5], gammas=[0.1],
        n_windows=3, prompt_len=P, cont_len=T, batch_size=4, calib_windows=2, check_agreement=0, progress=False,
    )


def test_structure(result):
    names = ["dense", "static", "pop-0.1", "full", "wanda-sp", "random"]
    assert [r.method for r in result.rows] == ["dense"] + names[1:] * 2
    assert [r.sparsity for r in result.rows[1:]] == [0.0] * 5 + [0.5] * 5
    assert result.row("pop-0.1", 0.5).gamma == 0.1 and result.row("full", 0.5).gamma == 2.0 and result.row("static", 0.5).gamma == 0.0
    assert all(r.n_tokens == 3 * T for r in result.rows)
    assert len(result.windows) == 3 and len(result.calibration) == 2
    assert result.settings["scope"] == "sequence" and "own partition" in result.settings["scope_note"]
    assert "own partition" in result.table() and "pop-0.1" in result.table()


def test_metrics_are_sane(result):
    for r in result.rows:
        assert math.isfinite(r.perplexity) and r.perplexity > 0, r
        for v in (r.top1, r.agreement, r.greedy_match):
            assert 0.0 <= v <= 1.0
        assert 0 <= r.greedy_prefix <= T


def test_dense_agrees_with_itself(result):
    d = result.row("dense")
    assert d.agreement == 1.0 and d.greedy_match == 1.0 and d.greedy_prefix == T


@pytest.mark.parametrize("method", ["static", "pop-0.1", "full"])
def test_pop_at_r0_is_dense_exactly(result, method):
    d, p = result.row("dense"), result.row(method, 0.0)
    assert p.perplexity == d.perplexity and p.top1 == d.top1
    assert p.agreement == 1.0 and p.greedy_match == 1.0


@pytest.mark.parametrize("method", ["wanda-sp", "random"])
def test_masks_at_r0_keep_everything(result, method):
    assert result.row(method, 0.0).perplexity == pytest.approx(result.row("dense").perplexity, rel=1e-5)
    assert result.row(method, 0.0).agreement == 1.0


@pytest.mark.parametrize("method", ["static", "pop-0.1", "full", "wanda-sp", "random"])
def test_pruning_half_changes_the_model(result, method):
    assert result.row(method, 0.5).perplexity != result.row("dense").perplexity


def test_decode_steps_are_decode_steps(result):
    # Were every one-token step taken for a prefill, static, POP and full re-evaluation would coincide.
    static, pop, full = (result.row(m, 0.5) for m in ("static", "pop-0.1", "full"))
    assert len({static.perplexity, pop.perplexity, full.perplexity}) == 3


def test_calibration_slice_is_disjoint_from_eval_windows(result, text):
    split = result.text["calibration_split"]
    assert 0 < split < len(text) and text[split - 1] == "\n"
    spans = [(w["char_start"], w["char_end"]) for w in result.windows + result.calibration]
    assert all(w["char_end"] <= split for w in result.windows)
    assert all(w["char_start"] >= split for w in result.calibration)
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert result.text["sha256"] and result.text["chars"] == len(text)


def test_windows_hold_the_stated_text(text):
    tok = ByteTokenizer()
    evals, calib, split = ev.make_windows(tok, text, n_windows=4, length=P + T, calib_windows=2)
    for w in evals + calib:
        assert bytes(w.token_ids).decode() == text[w.char_start : w.char_end]
    # Without offsets the end is an upper bound and the windows are the same tokens.
    evals2, _, _ = ev.make_windows(NoOffsetsTokenizer(), text, n_windows=4, length=P + T, calib_windows=2)
    assert [w.token_ids for w in evals2] == [w.token_ids for w in evals]
    assert all(b.char_end >= a.char_end for a, b in zip(evals, evals2))


def test_teacher_forced_decode_matches_one_full_forward(model, text):
    # Step t of the cached decode predicts continuation token t, exactly like a full-sequence forward.
    evals, _, _ = ev.make_windows(ByteTokenizer(), text, n_windows=2, length=P + T)
    ids = torch.tensor([w.token_ids for w in evals])
    out = ev.decode_rows(model, ids[:, :P], ids[:, P:], torch.ones(2, dtype=torch.bool))
    with torch.no_grad():
        logp = model(input_ids=ids).logits[:, P - 1 : -1].double().log_softmax(-1)
    nll = -logp.gather(2, ids[:, P:, None]).squeeze(2)
    torch.testing.assert_close(out.nll, nll, atol=1e-4, rtol=1e-4)


def test_batched_windows_keep_their_own_partition(model, text, result):
    # batch 1 and batch 4 (scope="sequence") must give the same numbers: no window shapes another's pruning.
    alone = ev.evaluate(
        model, ByteTokenizer(), text, methods=["pop"], sparsities=[0.5], gammas=[0.1],
        n_windows=3, prompt_len=P, cont_len=T, batch_size=1, calib_windows=2, check_agreement=0, progress=False,
    )
    assert alone.settings["scope"] == "batch"
    assert alone.row("pop-0.1", 0.5).perplexity == pytest.approx(result.row("pop-0.1", 0.5).perplexity, rel=1e-4)
    assert alone.row("pop-0.1", 0.5).greedy_match == result.row("pop-0.1", 0.5).greedy_match


def test_masks_keep_n_keep_best_channels():
    scores = {"a": torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1]), "b": torch.arange(10.0)}
    masks = ev.masks_from_scores(scores, 0.4)
    assert masks["a"].tolist() == [False, True, True, True, False]
    assert masks["b"].sum() == 6 and masks["b"][4:].all()


def test_wanda_sp_scores_follow_the_formula(model, text):
    from pop_fx.sites import find_module_sites

    sites = find_module_sites(model)[0]
    _, calib, _ = ev.make_windows(ByteTokenizer(), text, n_windows=1, length=P + T, calib_windows=2)
    scores = ev.wanda_sp_scores(model, sites, calib, batch_size=1)
    site = sites[0]
    seen = []
    h = site.down.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double().reshape(-1, site.d_ff)))
    with torch.no_grad():
        model(input_ids=torch.tensor([w.token_ids for w in calib]))
    h.remove()
    x = torch.cat(seen)
    w = site.down.weight.detach().double()
    expect = x.norm(dim=0) * w.abs().sum(0)
    # The activations are fp32 and this forward batches the windows differently from wanda_sp_scores (a
    # different GEMM summation order): fp32's tolerance, which a wrong norm (L1 vs L2, no sqrt) still breaks.
    torch.testing.assert_close(scores[site.path], expect, rtol=1e-5, atol=1e-8)
    assert set(scores) == {s.path for s in sites}


def test_files_written_and_parseable(result, tmp_path):
    files = result.write(tmp_path / "out")
    rows = list(csv.DictReader(io.StringIO(files["csv"].read_text())))
    assert len(rows) == len(result.rows) and float(rows[0]["perplexity"]) == result.rows[0].perplexity
    data = json.loads(files["json"].read_text())
    assert data["results"][3]["method"] == result.rows[3].method
    assert data["text"]["calibration_split"] == result.text["calibration_split"] and len(data["windows"]) == 3
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_run_json(monkeypatch, tmp_path, text, capsys, model):
    import pop_fx.tools.models

    monkeypatch.setattr(pop_fx.tools.models, "load_model", lambda name=None, **kw: (model, ByteTokenizer()))
    path = tmp_path / "t.txt"
    path.write_text(text)
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args([
        "--text", str(path), "--methods", "static,random", "--sparsities", "0.3", "--windows", "2",
        "--prompt-len", str(P), "--cont-len", str(T), "--batch-size", "2", "--out", str(tmp_path / "o"), "--json", "--no-progress",
    ])
    assert ev.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in out["results"]] == ["dense", "static", "random"]
    assert out["text"]["path"] == str(path) and (tmp_path / "o" / "eval.png").is_file()


@pytest.mark.parametrize(
    "kwargs, err, needle",
    [
        (dict(methods=["dense", "magic"]), ValueError, "magic"),
        (dict(sparsities=[1.0]), ValueError, "sparsity"),
        (dict(gammas=[3.0], methods=["pop"]), ValueError, "candidate_ratio"),
        (dict(n_windows=0), ValueError, "n_windows"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(backend="fast"), ValueError, "backend"),
        (dict(n_windows=500), ValueError, "too short"),
    ],
)
def test_bad_input(model, text, kwargs, err, needle):
    base = dict(methods=["dense"], sparsities=[0.5], n_windows=2, prompt_len=P, cont_len=T, calib_windows=0, progress=False, check_agreement=0)
    with pytest.raises(err, match=needle):
        ev.evaluate(model, ByteTokenizer(), text, **{**base, **kwargs})


def test_compiled_backend_hook(model, text):
    torch._dynamo.reset()  # earlier compiles of this model class must not push it past the recompile limit
    kwargs = dict(methods=["pop"], gammas=[0.1], sparsities=[0.5], n_windows=2, prompt_len=P, cont_len=T, calib_windows=0, progress=False)
    res = ev.evaluate(model, ByteTokenizer(), text, check_agreement=2, **kwargs)
    assert res.agreement_check["status"] == "ran" and res.agreement_check["max_abs_logit_diff"] < 1e-3


def test_greedy_windows_and_progressive_rows(model, text):
    seen = []
    res = ev.evaluate(
        model, ByteTokenizer(), text, methods=["static", "random"], sparsities=[0.5], n_windows=3, greedy_windows=1,
        prompt_len=P, cont_len=T, batch_size=2, calib_windows=0, check_agreement=0, progress=False,
        on_row=lambda partial: seen.append([r.method for r in partial.rows]),
    )
    assert seen == [["dense"], ["dense", "static"], ["dense", "static", "random"]]
    assert res.settings["greedy_windows"] == 1 and res.row("dense").greedy_prefix == T
    assert all(0 <= r.greedy_match <= 1 for r in res.rows)
    with pytest.raises(ValueError, match="greedy_windows"):
        ev.evaluate(model, ByteTokenizer(), text, methods=["dense"], sparsities=[0.5], n_windows=2, greedy_windows=3, prompt_len=P, cont_len=T, calib_windows=0, progress=False)


def test_pop_fx_eval_subcommand(tmp_path, text, capsys):
    # Through the real console-script dispatch; a tiny family has no tokenizer, so bytes are tokens.
    from pop_fx.tools.cli import main

    path = tmp_path / "t.txt"
    path.write_text(text)
    rc = main([
        "eval", "--model", "llama", "--text", str(path), "--methods", "dense,pop", "--gammas", "0.1", "--sparsities", "0.0,0.4",
        "--windows", "2", "--prompt-len", str(P), "--cont-len", str(T), "--batch-size", "4", "--check-agreement", "0", "--no-progress", "--json",
    ])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["method"], r["sparsity"]): r for r in out["results"]}
    assert rows[("pop-0.1", 0.0)]["perplexity"] == rows[("dense", 0.0)]["perplexity"]
    assert main(["eval", "--model", "llama", "--text", str(path), "--methods", "bogus", "--no-progress"]) == 2
    assert "bogus" in capsys.readouterr().err
