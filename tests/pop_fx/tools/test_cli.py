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


class _Stop(Exception):
    """Raised by a stub where the command would start measuring: the test has seen what it needed."""


@pytest.mark.parametrize("command", ["eval", "frontier"])
@pytest.mark.parametrize("flag", [["--scope", "sequence"], ["--candidate-ratio", "0.2"]])
def test_eval_and_frontier_do_not_offer_flags_they_would_ignore(command, flag, capsys):
    # eval's γ comes from its methods and --gammas, frontier's from --settings/--methods; both take the scope
    # from --batch-size. A flag that is shown and then ignored is refused instead.
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([command, *flag])
    assert "unrecognized arguments" in capsys.readouterr().err
    help_text = cli.build_parser()._subparsers._group_actions[0].choices[command].format_help()
    assert "--scope" not in help_text and "--candidate-ratio" not in help_text


def test_eval_sparsity_runs_that_sparsity_only(monkeypatch):
    import pop_fx.tools.evaluation.cli as eval_cli

    seen = {}

    def evaluate(model, tokenizer, text, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(eval_cli, "evaluate", evaluate)
    with pytest.raises(_Stop):
        cli.main(["eval", "--model", "llama", "--sparsity", "0.3", "--no-progress"])
    assert seen["sparsities"] == [0.3]


def test_frontier_sparsity_measures_that_sparsity_only(monkeypatch):
    import pop_fx.tools.frontier.cli as frontier_cli

    seen = {}

    def frontier(model, tokenizer, text, settings, budget, **kw):
        seen["settings"] = settings
        raise _Stop

    monkeypatch.setattr(frontier_cli, "frontier", frontier)
    with pytest.raises(_Stop):
        cli.main(["frontier", "--model", "llama", "--sparsity", "0.3", "--methods", "static,pop-0.1", "--no-cache",
                  "--no-progress"])
    assert [(s.method, s.sparsity) for s in seen["settings"]] == [("dense", 0.0), ("static", 0.3), ("pop-0.1", 0.3)]


def test_every_option_of_every_subcommand_has_help():
    parser = cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"pop-fx {name} {'/'.join(action.option_strings) or action.dest} has no help text"


def test_shared_flags_are_checked():
    import argparse

    with pytest.raises(ValueError, match="unknown"):
        cli.add_shared_arguments(argparse.ArgumentParser(), flags=("model", "spars"))
