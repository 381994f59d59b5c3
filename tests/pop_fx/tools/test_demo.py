"""pop-fx demo: its pieces without a compile (the whole demo is examples/run.sh demo)."""

import types

import pytest
import torch

from pop_fx import PopConfig
from pop_fx.tools import cli
from pop_fx.tools.demo import SENSIBLE, format_rows, generate_timed, parse_also
from pop_fx.tools.models import tiny_model


def test_demo_rate_is_decode_tokens_per_second():
    tok = lambda text, return_tensors=None: types.SimpleNamespace(input_ids=torch.tensor([[5, 6, 7, 8]]))  # noqa: E731
    ids, rate = generate_timed(tiny_model("llama"), tok, "x", 4)
    assert ids.shape == (8,) and rate > 0 and rate == rate


def test_demo_lines_align_every_setting_label():
    setting = lambda label, tps: dict(label=label, tokens_per_s=tps, agreement=0.5, greedy_tokens_equal=0.25,  # noqa: E731
                                      text=" x")
    rows = [dict(prompt="p", dense_tokens_per_s=20.0, dense=" d",
                 settings=[setting("r=0.5 γ=0.1", 25.0), setting("r=0.5 γ=2 int8-values", 24.0)])]
    lines = [line for line in format_rows(rows) if line.startswith("  ")]
    assert len(lines) == 3
    assert len({line.index("[") for line in lines}) == 1  # one column for every bracket
    assert "1.25x dense" in lines[1] and "1.20x dense" in lines[2]


def test_demo_also_setting():
    base = PopConfig(sparsity=0.5, candidate_ratio=0.1)
    assert parse_also("0.2:0", base) == base.replace(sparsity=0.2, candidate_ratio=0.0)
    assert parse_also("0.3", base) == base.replace(sparsity=0.3)
    assert parse_also("none", base) is None
    assert parse_also("0.5:2:int8-values", base) == base.replace(candidate_ratio=2.0, candidate_proxy="int8-values")
    assert parse_also(SENSIBLE, base).candidate_proxy == "int8-values"  # the frontier's pick (docs/choosing.md)
    for bad in ("x:1", "1.5:0.1", "0.5:2:int4", "0.5:2:int8:x"):
        with pytest.raises(ValueError):
            parse_also(bad, base)


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_a_model_without_a_tokenizer_is_refused_before_it_is_loaded(family, monkeypatch, capsys):
    import pop_fx.tools.models as models

    def load_model(*a, **k):
        raise AssertionError("the demo loaded a model it cannot show")

    monkeypatch.setattr(models, "load_model", load_model)
    assert cli.main(["demo", "--model", family]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and f"pop-fx inspect {family}" in err


def test_demo_help_does_not_offer_the_tiny_families():
    demo = cli.build_parser()._subparsers._group_actions[0].choices["demo"]
    model = next(a for a in demo._actions if "--model" in a.option_strings)
    assert "tiny family" not in model.help and "tokenizer" in model.help
