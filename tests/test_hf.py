"""Hugging Face checkpoints against the reference implementation's own logits and greedy tokens.

The fixtures under tests/fixtures/hf/ were written by transformers (tests/fixtures/make_hf_fixtures.py):
random-weight GPT-2 (f32, tokenizer.json), Llama (f32, GQA 4/2, untied head, rope base 5000), a
Llama stored in bfloat16 across three shards (MQA, tied head), a Llama with llama3 rope scaling and a
Qwen2 (q/k/v biases, tied head), each with ``reference.npz`` holding the prompts, their logits and 8
greedy tokens computed by transformers from the saved files; ``rope_frequencies.npz`` holds
transformers' rotary frequencies of scaled rope types.
"""

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")  # the `hf` extra; absent from some GPU images
pytest.importorskip("tokenizers")
from safetensors.numpy import load_file, save_file

from jaxllm import hf, serve
from jaxllm.cache import KVCache
from jaxllm.cli import main
from jaxllm.config import PRESETS, ModelConfig
from jaxllm.finite import NonFiniteError
from jaxllm.model import Transformer, param_shapes, rope_frequencies, unstack_layers
from jaxllm.tokenizer import load_hf_tokenizer, parse_ids

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ["gpt2", "llama", "llama-sharded-bf16", "llama3-scaled", "qwen2"]
# (fixture, scan_layers) for the full forward pass; the prefill + decode test serves unrolled layers.
GOLDEN = [
    ("gpt2", True),
    ("llama", False),
    ("llama-sharded-bf16", True),
    ("llama3-scaled", True),
    ("qwen2", False),
]
TOL = 1e-4  # absolute, float32 logits


@functools.cache
def loaded(name: str, scan: bool = True) -> tuple[ModelConfig, dict]:
    return hf.load(FIXTURES / name, [f"scan_layers={scan}"])


@functools.cache
def reference(name: str) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(prompts, logits [T, V] of each prompt, greedy continuations) from transformers."""
    ref = np.load(FIXTURES / name / "reference.npz")
    n = sum(key.startswith("prompt_") for key in ref.files)
    prompts, logits, greedy = (
        [ref[f"{kind}_{i}"] for i in range(n)] for kind in ("prompt", "logits", "greedy")
    )
    return prompts, logits, greedy


def left_padded(prompts: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens [B, width] with each prompt right-aligned, pad [B], positions [B, width] (0 at the
    first real token)."""
    pad = np.array([width - len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), width), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, pad[b] :] = p
    positions = np.maximum(np.arange(width)[None, :] - pad[:, None], 0).astype(np.int32)
    return tokens, pad, positions


# --- config and parameter layout --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt2", dict(vocab_size=288, max_len=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                      d_ff=128, norm="layernorm", positions="learned", mlp="gelu", use_bias=True,
                      tie_embeddings=True, norm_eps=1e-5)),
        ("llama", dict(vocab_size=256, max_len=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_ff=64, norm="rmsnorm", positions="rotary", rope_base=5000.0, mlp="swiglu",
                       use_bias=False, tie_embeddings=False, norm_eps=1e-5)),
        ("llama-sharded-bf16", dict(vocab_size=192, max_len=32, n_heads=4, n_kv_heads=1, d_ff=48,
                                    rope_base=10000.0, tie_embeddings=True, norm_eps=1e-6)),
        ("llama3-scaled", dict(max_len=256, rope_base=100.0, rope_scaling="llama3", rope_factor=4.0,
                               rope_low_freq_factor=2.0, rope_high_freq_factor=8.0,
                               rope_original_len=64, qkv_bias=False, tie_embeddings=False)),
        ("qwen2", dict(vocab_size=96, n_kv_heads=2, d_ff=48, rope_base=20000.0, rope_scaling="none",
                       use_bias=False, qkv_bias=True, tie_embeddings=True, norm_eps=1e-6)),
    ],
)  # fmt: skip
def test_config_follows_config_json(name, expected):
    config = hf.load_config(FIXTURES / name)
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize("name", NAMES)
def test_params_have_the_model_layout_scanned_and_unrolled(name):
    config, scanned = loaded(name, scan=True)
    unrolled_config, unrolled = loaded(name, scan=False)
    for cfg, params in ((config, scanned), (unrolled_config, unrolled)):
        expected = jax.tree.map(lambda s: (s.shape, s.dtype), param_shapes(cfg))
        assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == expected
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(scanned, config.n_layers), unrolled)


def test_param_dtype_override_casts_on_load():
    config, params = hf.load(FIXTURES / "llama", ["param_dtype=bfloat16"])
    assert config.param_dtype == "bfloat16"
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


# --- golden: full forward pass and prefill + decode -------------------------------------------


@functools.cache
def forward_fn(name: str, scan: bool):
    config, params = loaded(name, scan)
    model = Transformer(config)
    return jax.jit(lambda tok, pos, pad: model.apply({"params": params}, tok, pos, pad=pad)[0])


@pytest.mark.parametrize(("name", "scan"), GOLDEN)
def test_full_forward_matches_reference_logits(name, scan):
    prompts, logits, _ = reference(name)
    width = max(map(len, prompts))
    tokens, pad, positions = left_padded(prompts, width)
    out = np.asarray(forward_fn(name, scan)(tokens, positions, pad))
    for b, ref in enumerate(logits):
        np.testing.assert_allclose(out[b, pad[b] :], ref, rtol=0, atol=TOL)


@pytest.mark.parametrize(("name", "scan"), GOLDEN)
def test_full_forward_greedy_matches_reference(name, scan):
    """Greedy decoding by re-running the full pass over a fixed-width buffer (causal: later slots
    do not affect earlier ones)."""
    prompts, _, greedy = reference(name)
    new, width = len(greedy[0]), max(map(len, prompts))
    tokens, pad, _ = left_padded(prompts, width)
    tokens = np.pad(tokens, ((0, 0), (0, new)))  # prompts end at column width - 1
    positions = np.maximum(np.arange(width + new)[None] - pad[:, None], 0).astype(np.int32)
    for s in range(new):
        logits = forward_fn(name, scan)(tokens, positions, pad)
        tokens[:, width + s] = np.asarray(jnp.argmax(logits[:, width - 1 + s], axis=-1))
    for b, ref in enumerate(greedy):
        np.testing.assert_array_equal(tokens[b, width:], ref)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_decode_matches_reference(name):
    """One left-padded batch of all prompts, through a KV cache (unrolled layers, as served): prefill
    logits match the reference, and decoding one token at a time reproduces every greedy
    continuation."""
    config, params = loaded(name, False)
    prompts, logits, greedy = reference(name)
    new, width = len(greedy[0]), max(map(len, prompts))
    tokens, pad, positions = left_padded(prompts, width)
    step = jax.jit(lambda c, tok, pos: serve.cached_forward(config, params, c, tok, pos))
    cache = KVCache.init(config, len(prompts), width + new).replace(pad=jnp.asarray(pad))
    out, cache = step(cache, tokens, positions)
    for b, ref in enumerate(logits):
        np.testing.assert_allclose(np.asarray(out[b, pad[b] :]), ref, rtol=0, atol=TOL)
    chosen = []
    for s in range(new):
        next_tok = jnp.argmax(out[:, -1], axis=-1)[:, None].astype(jnp.int32)
        chosen.append(np.asarray(next_tok[:, 0]))
        if s + 1 < new:
            out, cache = step(cache, next_tok, (width + s - pad)[:, None].astype(np.int32))
    for b, ref in enumerate(greedy):
        np.testing.assert_array_equal(np.stack(chosen, axis=1)[b], ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_serve_generate_matches_reference_greedy(name):
    """jaxllm.serve: one batched prefill, then the on-device decode loop (the generate CLI tests
    below run the same path for gpt2 and llama in the fast suite)."""
    from jaxllm.generate import generate
    from jaxllm.sampling import Sampler

    config, params = loaded(name, scan=True)
    prompts, _, greedy = reference(name)
    gen = generate(config, params, [p.tolist() for p in prompts], len(greedy[0]), Sampler(0.0))
    assert gen.tokens == [g.tolist() for g in greedy]


# --- rotary scaling -------------------------------------------------------------------------


def test_llama3_fixture_depends_on_its_rope_scaling():
    """The golden test of llama3-scaled would catch a model that ignored the scaling."""
    config, params = loaded("llama3-scaled")
    prompt, ref = reference("llama3-scaled")[0][0], reference("llama3-scaled")[1][0]
    positions = np.arange(len(prompt))[None]
    plain = Transformer(config.replace(rope_scaling="none"))
    logits = plain.apply({"params": params}, prompt[None], positions)[0][0]
    assert np.abs(np.asarray(logits) - ref).max() > 100 * TOL


@functools.cache
def transformers_frequencies() -> dict[str, tuple[dict, np.ndarray]]:
    """name -> (LlamaConfig keyword arguments, transformers' inv_freq [H/2])."""
    ref = np.load(FIXTURES / "rope_frequencies.npz")
    names = [key.removesuffix("_config") for key in ref.files if key.endswith("_config")]
    return {n: (json.loads(str(ref[f"{n}_config"])), ref[f"{n}_inv_freq"]) for n in names}


@pytest.mark.parametrize("name", ["linear", "llama3.1-8b"])
def test_rope_frequencies_match_transformers(tmp_path, name):
    kwargs, inv_freq = transformers_frequencies()[name]
    path = copy_fixture(tmp_path, "llama")
    edit_config(path, hidden_size=kwargs["hidden_size"], head_dim=None,
                num_attention_heads=kwargs["num_attention_heads"], num_key_value_heads=None,
                rope_parameters=kwargs["rope_parameters"])  # fmt: skip
    config = hf.load_config(path)
    assert config.rope_scaling == kwargs["rope_parameters"]["rope_type"]
    np.testing.assert_allclose(rope_frequencies(config), inv_freq, rtol=1e-6, atol=0)


def test_llama31_preset_has_the_released_rope_scaling(tmp_path):
    kwargs, _ = transformers_frequencies()["llama3.1-8b"]
    path = copy_fixture(tmp_path, "llama")
    edit_config(path, rope_parameters=kwargs["rope_parameters"])
    config, preset = hf.load_config(path), PRESETS["llama3.1-8b"]
    fields = [f for f in config.to_dict() if f.startswith("rope_")]
    assert {f: getattr(config, f) for f in fields} == {f: getattr(preset, f) for f in fields}
    assert preset.max_len == kwargs["max_position_embeddings"]


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_older_rope_scaling_key_reads_like_rope_parameters(tmp_path, type_key):
    """Checkpoints written by transformers < 5 keep rope_theta beside a rope_scaling object."""
    path = copy_fixture(tmp_path, "llama3-scaled")
    raw = json.loads((path / "config.json").read_text())
    scaling = dict(raw.pop("rope_parameters"))
    theta = scaling.pop("rope_theta")
    scaling[type_key] = scaling.pop("rope_type")
    (path / "config.json").write_text(
        json.dumps({**raw, "rope_theta": theta, "rope_scaling": scaling})
    )
    assert hf.load_config(path) == hf.load_config(FIXTURES / "llama3-scaled")


def test_info_shows_the_rope_scaling(capsys):
    assert main(["info", "--hf-dir", str(FIXTURES / "llama3-scaled")]) == 0
    out = capsys.readouterr().out
    for field, value in [
        ("rope_scaling", "llama3"),
        ("rope_factor", "4.0"),
        ("rope_original_len", "64"),
    ]:
        assert any(line.split()[:2] == [field, value] for line in out.splitlines()), out


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_json_encodes_like_the_reference():
    tok = load_hf_tokenizer(FIXTURES / "gpt2", vocab_size=288)
    assert tok is not None
    texts = json.loads((FIXTURES / "gpt2" / "prompts.json").read_text())
    for text, ids in zip(texts, reference("gpt2")[0], strict=True):
        np.testing.assert_array_equal(tok.encode(text), ids)
        assert tok.decode(ids) == text


def test_no_tokenizer_json_means_raw_ids():
    assert load_hf_tokenizer(FIXTURES / "llama", vocab_size=256) is None


def test_tokenizer_larger_than_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match=r"tokenizer.json: 288 tokens.*vocab_size=100"):
        load_hf_tokenizer(FIXTURES / "gpt2", vocab_size=100)


def test_parse_ids():
    np.testing.assert_array_equal(parse_ids("1, 2,3", 4), [1, 2, 3])
    with pytest.raises(ValueError, match=r"token id 4 is outside the vocabulary \[0, 4\)"):
        parse_ids("1,4", 4)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_ids("1,a", 4)


# --- refusals: one readable line naming the file and the problem ------------------------------


def copy_fixture(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, **changes}))


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_original_gpt2_release_names_load(tmp_path):
    """OpenAI's released GPT-2 safetensors name tensors without "transformer." and carry causal-mask
    buffers (h.i.attn.bias); both load to the same parameters."""
    path = copy_fixture(tmp_path, "gpt2")

    def rename(tensors: dict) -> None:
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))

    edit_tensors(path, rename)
    _, params = hf.load(path, ["scan_layers=true"])
    jax.tree.map(np.testing.assert_array_equal, params, loaded("gpt2", scan=True)[1])


def _refused(path: Path, *words: str) -> None:
    with pytest.raises(hf.HFError) as err:
        hf.load(path)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    ("name", "changes", "words"),
    [
        ("llama", {"model_type": "mistral"}, ["config.json", "model_type 'mistral'"]),
        ("llama", {"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
         ["config.json", "rope type 'llama3' needs 'low_freq_factor'"]),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1.0}},
         ["config.json", "rope type 'linear' needs 'factor'"]),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}},
         ["config.json", "rope type 'yarn' is not supported", "default, linear, llama3"]),
        ("llama", {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
         ["config.json", "'dynamic'"]),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
         ["config.json", "rope_scaling and rope_parameters disagree", "'default'", "'linear'"]),
        ("llama3-scaled", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                               "high_freq_factor": 1.0, "original_max_position_embeddings": 8}},
         ["config.json", "rope_high_freq_factor=1.0 above rope_low_freq_factor=4.0"]),
        ("qwen2", {"use_sliding_window": True}, ["config.json", "use_sliding_window=True"]),
        ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, ["config.json", "layer_types"]),
        ("llama", {"attention_bias": True}, ["config.json", "attention_bias=True"]),
        ("llama", {"hidden_act": "gelu"}, ["config.json", "hidden_act='gelu'"]),
        ("llama", {"num_key_value_heads": 3}, ["config.json", "divisible"]),
        ("llama", {"hidden_size": None}, ["config.json", "missing 'hidden_size'"]),
        ("gpt2", {"activation_function": "relu"}, ["config.json", "'relu'"]),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, ["config.json", "scale_attn_by_inverse"]),
    ],
)  # fmt: skip
def test_unsupported_config_is_refused(tmp_path, name, changes, words):
    path = copy_fixture(tmp_path, name)
    edit_config(path, **changes)
    _refused(path, *words)


def test_missing_files_are_refused(tmp_path):
    _refused(tmp_path, "config.json: missing")
    path = copy_fixture(tmp_path, "llama")
    (path / "model.safetensors").unlink()
    _refused(path, "neither model.safetensors nor model.safetensors.index.json")
    sharded = copy_fixture(tmp_path, "llama-sharded-bf16")
    (sharded / "model-00002-of-00003.safetensors").unlink()
    _refused(sharded, "model-00002-of-00003.safetensors: missing")


def test_shape_that_disagrees_with_the_config_is_refused(tmp_path):
    path = copy_fixture(tmp_path, "llama")
    edit_config(path, intermediate_size=80)
    _refused(path, "model.safetensors", "mlp.gate_proj.weight", "[64, 32]", "[80, 32]")


def test_unloadable_dtype_is_refused(tmp_path):
    path = copy_fixture(tmp_path, "gpt2")
    edit_tensors(path, lambda t: t.update({"transformer.ln_f.bias": np.zeros(32, np.int8)}))
    _refused(path, "model.safetensors", "ln_f.bias", "dtype I8")


def test_qwen2_without_its_qkv_biases_is_refused(tmp_path):
    path = copy_fixture(tmp_path, "qwen2")
    edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    _refused(path, "tensor 'model.layers.1.self_attn.k_proj.bias' is missing")


def test_tensor_the_model_lacks_is_refused(tmp_path):
    path = copy_fixture(tmp_path, "llama")
    edit_tensors(
        path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})
    )
    _refused(path, "model.safetensors", "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'")


def test_corrupt_safetensors_is_refused(tmp_path):
    path = copy_fixture(tmp_path, "gpt2")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    _refused(path, "model.safetensors: not a readable safetensors file")


def test_unreadable_safetensors_is_not_called_missing(tmp_path, monkeypatch):
    path = copy_fixture(tmp_path, "llama")

    def denied(name, framework):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(hf, "safe_open", denied)  # chmod 000 does not stop root
    _refused(path, "model.safetensors: not a readable safetensors file", "Permission denied")


def test_rope_parameters_that_are_not_an_object_are_refused(tmp_path):
    path = copy_fixture(tmp_path, "llama")
    edit_config(path, rope_parameters="default")
    _refused(path, "config.json", "rope_parameters must be a JSON object, got 'default'")


def test_non_finite_weights_are_refused_with_one_line(tmp_path, capsys):
    path = copy_fixture(tmp_path, "llama")

    def poison(tensors: dict) -> None:
        embedding = tensors["model.embed_tokens.weight"].copy()
        embedding[3, 1] = np.nan
        tensors["model.embed_tokens.weight"] = embedding

    edit_tensors(path, poison)
    with pytest.raises(NonFiniteError, match=r"1 NaN or infinite values in 1 arrays.*embed"):
        hf.load(path)
    assert (
        main(["generate", "--hf-dir", str(path), "--prompt-ids", "1,2", "--temperature", "0"]) == 1
    )
    err = capsys.readouterr().err
    assert "NaN" in err and err.count("\n") == 1


# --- CLI --------------------------------------------------------------------------------------


def test_info_hf_dir_prints_the_checkpoint_config(capsys):
    assert main(["info", "--hf-dir", str(FIXTURES / "llama"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hf_dir"] == str(FIXTURES / "llama") and out["preset"] is None
    assert out["config"]["n_kv_heads"] == 2 and out["config"]["tie_embeddings"] is False
    # 2 layers x (q 32x32 + k, v 32x16 + o 32x32 + 3 x 32x64 + 2 norms 32) + embed + head 256x32 + norm
    assert out["params"]["total"] == 2 * (1024 + 2 * 512 + 1024 + 3 * 2048 + 64) + 2 * 8192 + 32


def test_generate_hf_dir_text_prompt_matches_reference(capsys):
    argv = ["generate", "--hf-dir", str(FIXTURES / "gpt2"), "--temperature", "0"]
    text = json.loads((FIXTURES / "gpt2" / "prompts.json").read_text())[0]
    assert main([*argv, "--prompt", text, "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["tokens"] == reference("gpt2")[2][0].tolist()


def test_generate_hf_dir_prompt_ids_matches_reference(capsys):
    prompt, greedy = reference("llama")[0][0], reference("llama")[2][0]
    argv = ["generate", "--hf-dir", str(FIXTURES / "llama"), "--temperature", "0"]
    assert main([*argv, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, greedy))


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["--prompt", "hello"], "has no tokenizer.json: give the prompt as --prompt-ids"),
        (["--prompt-ids", "1,256"], "token id 256 is outside the vocabulary [0, 256)"),
        (["--prompt-ids", "1", "--override", "d_ff=80"], "has shape [64, 32]"),
    ],
)
def test_generate_hf_dir_errors_are_one_line(extra, word, capsys):
    assert main(["generate", "--hf-dir", str(FIXTURES / "llama"), *extra]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err, err


def test_info_hf_dir_error_is_one_line(tmp_path, capsys):
    assert main(["info", "--hf-dir", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: missing" in err
    assert main(["info", "--hf-dir", str(tmp_path), "--preset", "tiny"]) != 0
    assert "not allowed with" in capsys.readouterr().err
