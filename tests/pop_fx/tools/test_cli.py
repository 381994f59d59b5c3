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
