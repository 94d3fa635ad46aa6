import dataclasses

import numpy as np
import pytest

from jaxllm import analytic
from jaxllm.config import PRESETS, ModelConfig, apply_overrides, get_preset, parse_override
from jaxllm.errors import InputError, positive_int
from jaxllm.model import count_params


def test_presets_are_valid_and_gpt2_shapes_match_openai():
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        cfg = PRESETS[name]
        assert (cfg.vocab_size, cfg.max_len) == (50257, 1024)
        assert (cfg.norm, cfg.positions, cfg.mlp) == ("layernorm", "learned", "gelu")
        assert cfg.use_bias and cfg.tie_embeddings and cfg.d_ff == 4 * cfg.d_model
    assert PRESETS["llama3-8b"].groups == 4
    assert PRESETS["gpt2-xl"].head_dim == 64


@pytest.mark.parametrize(
    ("name", "published"),
    [
        # The released safetensors: model.safetensors.index.json's total_size / 2 bytes (bfloat16).
        ("llama3.1-8b", 8_030_261_248),
        ("llama3.1-70b", 70_553_706_496),
        ("qwen2.5-7b", 7_615_616_512),  # model card: 7.61B, 6.53B without embedding and head
    ],
)
def test_new_presets_have_the_published_parameter_counts(name, published):
    counts = count_params(PRESETS[name])
    assert counts["total"] == published
    assert analytic.param_counts(PRESETS[name]) == counts


def test_qwen_preset_has_biases_on_q_k_v_only():
    counts = count_params(PRESETS["qwen2.5-7b"])
    assert round((counts["total"] - counts["embedding"] - counts["head"]) / 1e9, 2) == 6.53
    assert count_params(PRESETS["qwen2.5-7b"].replace(qkv_bias=False))["attention"] == (
        counts["attention"] - 28 * (3584 + 2 * 4 * 128)
    )


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"d_model": 30, "n_heads": 4}, ["d_model=30", "n_heads=4"]),
        ({"n_heads": 4, "n_kv_heads": 3}, ["n_heads=4", "n_kv_heads=3"]),
        ({"n_layers": 0}, ["n_layers", "positive"]),
        ({"d_ff": -1}, ["d_ff", "positive"]),
        ({"vocab_size": 2**31}, ["vocab_size", "2147483647", "2147483648"]),
        ({"rope_base": float("inf")}, ["rope_base", "finite"]),
        ({"norm": "batchnorm"}, ["norm", "layernorm", "rmsnorm"]),
        ({"remat": "some"}, ["remat", "dots"]),
        ({"dtype": "int8"}, ["dtype", "bfloat16"]),
        ({"rope_scaling": "yarn"}, ["rope_scaling", "linear", "llama3", "'yarn'"]),
        ({"rope_factor": 0.0}, ["rope_factor", "positive"]),
        ({"rope_original_len": 0}, ["rope_original_len", "positive"]),
        ({"n_layers": 4, "scan_unroll": 5}, ["scan_unroll", "n_layers=4", "<= 4", "got 5"]),
        ({"scan_unroll": 0}, ["scan_unroll", "positive", "got 0"]),
        (
            {"rope_scaling": "llama3", "rope_low_freq_factor": 4.0, "rope_high_freq_factor": 4.0},
            ["rope_high_freq_factor=4.0", "rope_low_freq_factor=4.0"],
        ),
    ],
)
def test_bad_config_names_field_and_allowed_values(changes, words):
    with pytest.raises(InputError) as err:
        ModelConfig(**changes)
    for word in words:
        assert word in str(err.value)


def test_overrides_parse_to_field_types():
    overrides = [
        "n_layers=3",
        "rope_base=5e5",
        "use_bias=false",
        "norm=rmsnorm",
        "positions=rotary",
    ]
    overrides += ["rope_scaling=linear", "rope_factor=2", "rope_original_len=512", "qkv_bias=true"]
    cfg = apply_overrides(get_preset("tiny"), overrides)
    assert cfg.n_layers == 3 and cfg.rope_base == 500000.0 and cfg.use_bias is False
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_len) == ("linear", 2.0, 512)
    assert cfg.qkv_bias is True
    assert (cfg.norm, cfg.positions) == ("rmsnorm", "rotary")
    assert dataclasses.replace(cfg) == cfg  # still frozen and comparable


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("n_layer=3", "unknown"),
        ("n_layers=three", "integer"),
        ("use_bias=maybe", "true"),
        ("n_layers", "FIELD=VALUE"),
        ("norm_eps=small", "number"),
    ],
)
def test_bad_overrides_raise(text, word):
    with pytest.raises(ValueError, match=word):
        parse_override(text)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="gpt2-medium"):
        get_preset("gpt5")


@pytest.mark.parametrize("value", [0, -1, 1.0, True, "3", None, 11])
def test_positive_int_refuses_what_is_not_an_int_in_range(value):
    with pytest.raises(
        InputError, match=rf"^size must be a positive integer <= 10, got {value!r}$"
    ):
        positive_int("size", value, 10)


def test_positive_int_returns_ints_in_range():
    assert [positive_int("n", v, 10) for v in (1, 10)] == [1, 10]
    assert positive_int("n", 2**40) == 2**40  # no bound by default
    numpy_int = positive_int("n", np.int64(3))
    assert numpy_int == 3 and type(numpy_int) is int


def test_an_integer_bound_other_than_one_is_named():
    assert positive_int("queue", 0, least=0) == 0
    with pytest.raises(InputError, match=r"^queue must be an integer >= 0, got -1$"):
        positive_int("queue", -1, least=0)
