import pytest

from pop_fx import PopConfig

from pop_fx.tools import cli


def test_shared_flags_build_the_config():
    args = cli.build_parser().parse_args(["demo", "--sparsity", "0.3", "--candidate-ratio", "0", "--scope", "sequence", "--prefill", "dense"])
    assert cli.config_from_args(args) == PopConfig(sparsity=0.3, candidate_ratio=0.0, scope="sequence", prefill="dense")
    assert args.model == "smollm2" and args.dtype == "float32" and args.json is False


def test_missing_modules_are_not_offered(monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "bench", "pop_fx.does_not_exist")
    assert "bench" not in cli.available_subcommands() and "demo" in cli.available_subcommands()


def test_bad_value_is_one_clear_error(capsys):
    assert cli.main(["demo", "--model", "llama", "--sparsity", "1.5"]) == 2
    assert "sparsity" in capsys.readouterr().err


def test_unknown_dtype_rejected():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--dtype", "float64"])


def test_demo_rate_is_decode_tokens_per_second():
    import types

    import torch

    from pop_fx.tools.demo import _generate
    from pop_fx.tools.models import tiny_model

    tok = lambda text, return_tensors=None: types.SimpleNamespace(input_ids=torch.tensor([[5, 6, 7, 8]]))  # noqa: E731
    ids, rate = _generate(tiny_model("llama"), tok, "x", 4)
    assert ids.shape == (8,) and rate > 0 and rate == rate


def test_demo_lines_align_every_setting_label():
    from pop_fx.tools.demo import format_rows

    setting = lambda label, tps: dict(label=label, tokens_per_s=tps, agreement=0.5, greedy_tokens_equal=0.25,  # noqa: E731
                                      text=" x")
    rows = [dict(prompt="p", dense_tokens_per_s=20.0, dense=" d",
                 settings=[setting("r=0.5 γ=0.1", 25.0), setting("r=0.5 γ=2 int8-values", 24.0)])]
    lines = [line for line in format_rows(rows) if line.startswith("  ")]
    assert len(lines) == 3
    assert len({line.index("[") for line in lines}) == 1  # one column for every bracket
    assert "1.25x dense" in lines[1] and "1.20x dense" in lines[2]
