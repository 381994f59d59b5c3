import dataclasses

import pytest

import pop_fx
from pop_fx import PopConfig

BAD_VALUES = [
    ("sparsity", -0.1),
    ("sparsity", 1.0),
    ("sparsity", float("nan")),
    ("sparsity", "0.5"),
    ("sparsity", True),
    ("candidate_ratio", -0.01),
    ("candidate_ratio", 2.5),
    ("candidate_ratio", None),
    ("scope", "token"),
    ("scope", 1),
    ("prefill", "skip"),
    ("empty_expert", "zero"),
    ("lowering", "aot"),
    ("mode", "fast"),
    ("max_batch_size", 0),
    ("max_batch_size", 2.0),
    ("debug", "yes"),
    ("inductor", {"no_such_setting": 1}),
    ("inductor", {"cpp_wrapper": [True]}),
    ("inductor", 3),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PopConfig(**{field: value})


def test_every_field_has_a_default_and_a_docstring_line():
    cfg = PopConfig()
    assert (cfg.sparsity, cfg.candidate_ratio, cfg.scope, cfg.prefill) == (0.5, 0.1, "batch", "pruned")
    src = open(pop_fx.config.__file__).read()
    for f in dataclasses.fields(PopConfig):
        assert f'{f.name}:' in src and f.default is not dataclasses.MISSING


def test_unknown_option_key_names_it():
    with pytest.raises(ValueError, match="sparsty"):
        PopConfig.from_options({"sparsty": 0.3})


def test_from_options_accepts_dict_config_and_none():
    assert PopConfig.from_options(None) == PopConfig()
    assert PopConfig.from_options({"sparsity": 0.3}).sparsity == 0.3
    assert PopConfig.from_options(PopConfig(scope="sequence"), sparsity=0.2) == PopConfig(scope="sequence", sparsity=0.2)
    with pytest.raises(ValueError, match="options"):
        PopConfig.from_options([("sparsity", 0.3)])


def test_presets_are_the_ablation_baselines():
    assert PopConfig.static(0.4) == PopConfig(sparsity=0.4, candidate_ratio=0.0)
    assert PopConfig.full_reevaluation(0.4) == PopConfig(sparsity=0.4, candidate_ratio=2.0)
    assert PopConfig.static(0.3, scope="sequence").scope == "sequence"


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PopConfig().sparsity = 0.1


def test_inductor_settings_are_kept_as_sorted_pairs_so_equal_configs_hash_equal():
    a = PopConfig(inductor={"freezing": True, "cpp_wrapper": True})
    b = PopConfig(inductor=[("cpp_wrapper", True), ("freezing", True)])
    assert a.inductor == (("cpp_wrapper", True), ("freezing", True))
    assert a == b and hash(a) == hash(b)
    assert PopConfig().inductor == ()
