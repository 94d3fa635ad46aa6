"""Export to the Hugging Face layout (``jaxllm.export``, ``jaxllm export``): the inverse of jaxllm.hf.

The independent truth is the fixtures transformers wrote (tests/fixtures/hf/): exporting an imported
fixture must give back its tensors bit for bit and its config.json fields. That transformers loads
an export and computes jaxllm's logits is checked by tests/fixtures/make_hf_fixtures.py, which needs
torch.
"""

import itertools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")  # the `hf` extra
pytest.importorskip("tokenizers")
from safetensors import safe_open
from tokenizers import Tokenizer

from jaxllm import checkpoint, data, export, finetune, hf
from jaxllm.cli import main
from jaxllm.config import PRESETS, ModelConfig
from jaxllm.model import Params, count_params, param_shapes
from jaxllm.tokenizer import EOT_TOKEN, load_hf_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ["gpt2", "llama", "llama-sharded-bf16", "llama3-scaled", "qwen2"]
SHARD_BYTES = {"llama-sharded-bf16": 20_000}  # the fixture's max_shard_size="20KB"
# config.json fields transformers needs, by family: each must be written and equal the fixture's.
NEEDED = {
    "gpt2": ["n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon",
             "activation_function"],
    "llama": ["max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
              "attention_bias", "mlp_bias"],
    "qwen2": ["max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
              "use_sliding_window", "sliding_window"],
}  # fmt: skip
COMMON = ["architectures", "model_type", "vocab_size", "tie_word_embeddings", "bos_token_id",
          "eos_token_id", "dtype"]  # fmt: skip
# Fields written that transformers 5 (which wrote the fixtures) no longer writes, for transformers 4.
OLDER_LAYOUT = {"torch_dtype", "rope_theta", "rope_scaling"}


def read_file(path: Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file, in their stored dtype."""
    with safe_open(str(path), framework="flax") as f:  # numpy cannot read bfloat16
        return {name: np.asarray(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of every safetensors file in ``directory``, each stored once."""
    tensors: dict[str, np.ndarray] = {}
    for path in sorted(directory.glob("*.safetensors")):
        ours = read_file(path)
        assert not set(ours) & set(tensors), f"{path}: tensors stored twice"
        tensors |= ours
    return tensors


def random_params(config: ModelConfig, seed: int = 0) -> Params:
    """Parameters of ``config``'s shapes, every leaf (norm scales and biases too) drawn N(0, 1) on the
    host: nothing is compiled."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), param_shapes(config))


def save_fixture(name: str, out: Path, scan: bool) -> tuple[ModelConfig, dict]:
    """Import fixture ``name`` (scanned or unrolled) and export it into ``out`` as it was stored."""
    config, params = hf.load(FIXTURES / name, [f"scan_layers={scan}"])
    raw = json.loads((FIXTURES / name / "config.json").read_text())
    out.mkdir()
    export.save(out, config, params, dtype=raw["dtype"], bos=raw["bos_token_id"],
                eos=raw["eos_token_id"], max_shard_bytes=SHARD_BYTES.get(name, export.MAX_SHARD_BYTES))  # fmt: skip
    return config, params


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_exporting_a_fixture_reproduces_its_tensors(tmp_path, name, scan):
    save_fixture(name, tmp_path / "out", scan)
    ours, theirs = read_tensors(tmp_path / "out"), read_tensors(FIXTURES / name)
    assert sorted(ours) == sorted(theirs)
    for key, expected in theirs.items():
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        np.testing.assert_array_equal(ours[key].view(np.uint8), expected.view(np.uint8), key)


@pytest.mark.parametrize("name", NAMES)
def test_exporting_a_fixture_reproduces_its_config(tmp_path, name):
    save_fixture(name, tmp_path / "out", scan=True)
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    theirs = json.loads((FIXTURES / name / "config.json").read_text())
    for key in COMMON + NEEDED[theirs["model_type"]]:
        assert key in ours and key in theirs and ours[key] == theirs[key], key
    assert {k: ours[k] for k in ours if k in theirs} == {k: theirs[k] for k in ours if k in theirs}
    assert set(ours) - set(theirs) <= OLDER_LAYOUT
    # The rotary settings, written in the older layout, read as the fixture's newer one does.
    assert hf.load_config(tmp_path / "out") == hf.load_config(FIXTURES / name)


# One config of each family and head layout, with every rope scaling jaxllm implements.
_LLAMA = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", use_bias=False, norm_eps=1e-6)
FAMILIES = {
    "gpt2-tied": PRESETS["tiny"],
    "gpt2-untied": PRESETS["tiny"].replace(tie_embeddings=False, d_ff=96),
    "llama-gqa-llama3": PRESETS["tiny"].replace(
        **_LLAMA, n_kv_heads=2, tie_embeddings=False, rope_base=500.0, rope_scaling="llama3",
        rope_factor=4.0, rope_low_freq_factor=1.5, rope_high_freq_factor=6.0, rope_original_len=16),
    "qwen2-mqa-linear": PRESETS["tiny"].replace(
        **_LLAMA, qkv_bias=True, n_kv_heads=1, rope_scaling="linear", rope_factor=2.0),
}  # fmt: skip


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_then_import_gives_identical_parameters(tmp_path, name, scan):
    config = FAMILIES[name].replace(scan_layers=scan)
    params = random_params(config)
    export.save(tmp_path, config, params)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == name.split("-")[0]
    loaded_config, loaded = hf.load(tmp_path, [f"scan_layers={scan}"])
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_bfloat16_export_rounds_once(tmp_path):
    """--dtype bfloat16 stores each float32 weight rounded to bfloat16: importing gives the rounded
    values exactly."""
    config = FAMILIES["llama-gqa-llama3"]
    params = random_params(config)
    export.save(tmp_path, config, params, dtype="bfloat16")
    assert {a.dtype for a in read_tensors(tmp_path).values()} == {np.dtype(jnp.bfloat16)}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, loaded = hf.load(tmp_path)
    rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params)
    jax.tree.map(np.testing.assert_array_equal, loaded, rounded)


def test_shards_and_their_index(tmp_path):
    """A max shard size of a few KB cuts the tiny model into many files; the index lists each tensor
    in the one file that holds it and totals what count_params counts."""
    config = FAMILIES["llama-gqa-llama3"]
    params = random_params(config)
    max_bytes = 6_000
    export.save(tmp_path, config, params, max_shard_bytes=max_bytes)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "model.safetensors").exists()
    total = count_params(config)["total"]
    assert index["metadata"] == {"total_size": 4 * total, "total_parameters": total}
    sizes = []
    for name in files:
        tensors = read_file(tmp_path / name)
        assert {k for k, f in index["weight_map"].items() if f == name} == set(tensors)
        sizes.append(sum(a.nbytes for a in tensors.values()))
        assert sizes[-1] <= max_bytes or len(tensors) == 1
    assert all(a + b > max_bytes for a, b in itertools.pairwise(sizes))  # no two could merge
    # Every file as readable as config.json (safetensors alone would write its own 0600).
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {modes["config.json"]}, modes
    _, loaded = hf.load(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_a_config_of_no_family_is_refused():
    config = PRESETS["tiny"].replace(positions="rotary")
    with pytest.raises(export.ExportError, match=r"positions=rotary.* no Hugging Face family"):
        export.family(config)
    with pytest.raises(export.ExportError, match="n_kv_heads=2"):  # GPT-2 has no GQA
        export.family(PRESETS["tiny"].replace(n_kv_heads=2))


# --- the byte-level tokenizer ------------------------------------------------------------------


def _random_texts(n: int) -> list[str]:
    """Texts from ASCII, controls, Latin-1, CJK and emoji, with runs of spaces and line breaks."""
    rng = np.random.default_rng(0)
    pools = [range(0, 128), range(128, 256), range(0x4E00, 0x4E80), range(0x1F600, 0x1F650)]
    chars = [chr(c) for pool in pools for c in pool] + [" ", "  ", "\n", "\r\n", "\t"] * 20
    return ["".join(rng.choice(chars, size=rng.integers(0, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    export.write_byte_tokenizer(out, PRESETS["tiny"])
    return out


def test_byte_tokenizer_json_encodes_and_decodes_as_jaxllm(byte_tokenizer):
    tok = Tokenizer.from_file(str(byte_tokenizer / "tokenizer.json"))
    assert tok.get_vocab_size() == data.VOCAB_SIZE and tok.token_to_id(EOT_TOKEN) == data.EOT
    texts = [
        "",
        " leading  spaces ",
        "naïve café — 日本語 🙂",
        "a\x00b\x1f\x7f",
        *_random_texts(200),
    ]
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == data.encode(text).tolist(), text
        assert tok.decode(ids) == text
    # Any ids, even bytes that are not UTF-8 and EOT, decode as jaxllm decodes them.
    rng = np.random.default_rng(1)
    for _ in range(200):
        ids = rng.integers(0, data.VOCAB_SIZE, size=rng.integers(1, 20)).tolist()
        assert tok.decode(ids) == data.decode(ids), ids


def test_the_end_of_text_token_text_is_the_documented_difference(byte_tokenizer):
    tok = Tokenizer.from_file(str(byte_tokenizer / "tokenizer.json"))
    assert tok.encode(f"a{EOT_TOKEN}b").ids == [97, data.EOT, 98]
    assert data.encode(f"a{EOT_TOKEN}b").tolist() == list(f"a{EOT_TOKEN}b".encode())


def test_jaxllm_reads_its_own_byte_tokenizer(byte_tokenizer):
    tok = load_hf_tokenizer(byte_tokenizer, data.VOCAB_SIZE)
    assert tok is not None and tok.encode("héllo").tolist() == data.encode("héllo").tolist()
    settings = json.loads((byte_tokenizer / "tokenizer_config.json").read_text())
    assert settings["eos_token"] == EOT_TOKEN and settings["clean_up_tokenization_spaces"] is False


# --- the command ---------------------------------------------------------------------------------


def make_run(run: Path, config: ModelConfig, origin: finetune.Origin | None = None) -> dict:
    """A run directory holding step 3 of random parameters (what export reads of a trained run)."""
    params = random_params(config)
    meta = {"step": 3} | ({"origin": origin.to_dict()} if origin else {})
    checkpoint.save(checkpoint.manager(run), 3, params, None, config, meta)
    return params


def test_export_command_writes_a_byte_level_run(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "exported"
    params = make_run(run, PRESETS["tiny"])
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert capsys.readouterr().out.strip() == f"{out}: {', '.join(files)}"
    assert sorted(p.name for p in out.iterdir()) == files
    raw = json.loads((out / "config.json").read_text())
    assert raw["bos_token_id"] == raw["eos_token_id"] == data.EOT
    assert raw["architectures"] == ["GPT2LMHeadModel"] and raw["dtype"] == "float32"
    config, loaded = hf.load(out)
    assert config == PRESETS["tiny"]
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_export_of_a_fine_tuned_run_carries_its_tokenizer(tmp_path):
    run, out = tmp_path / "run", tmp_path / "empty"
    source = FIXTURES / "gpt2"
    config = hf.load_config(source)
    params = make_run(run, config, finetune.Origin.read(source))
    finetune.copy_tokenizer(source, run)
    out.mkdir()  # an existing empty directory is taken
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", "float16"]) == 0
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (out, source))
    assert (ours["bos_token_id"], ours["eos_token_id"]) == (
        theirs["bos_token_id"],
        theirs["eos_token_id"],
    )
    assert ours["torch_dtype"] == "float16"
    _, loaded = hf.load(out)
    rounded = jax.tree.map(lambda p: p.astype(jnp.float16).astype(jnp.float32), params)
    jax.tree.map(np.testing.assert_array_equal, loaded, rounded)


@pytest.mark.parametrize(
    ("case", "word"),
    [
        ("out-not-empty", "is not empty; export writes a new or empty directory"),
        ("out-is-a-file", "cannot be a directory: it is a file"),
        ("no-run", "no checkpoint directory at"),
        ("hf-dir-as-run", "no complete checkpoint in"),
        ("no-family", "no Hugging Face family"),
        ("no-tokenizer-copy", "tokenizer.json: missing (the run's copy of its tokenizer)"),
        ("bad-dtype", "argument --dtype: invalid choice: 'int8'"),
    ],
)
def test_export_errors_are_one_line_and_write_nothing(tmp_path, capsys, case, word):
    run, out = tmp_path / "run", tmp_path / "out"
    config = PRESETS["tiny"].replace(positions="rotary") if case == "no-family" else PRESETS["tiny"]
    if case == "no-tokenizer-copy":
        make_run(run, hf.load_config(FIXTURES / "gpt2"), finetune.Origin.read(FIXTURES / "gpt2"))
    elif case == "hf-dir-as-run":
        run = Path(shutil.copytree(FIXTURES / "llama", tmp_path / "llama"))
    elif case != "no-run":
        make_run(run, config)
    if case == "out-not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    if case == "out-is-a-file":
        out.write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    dtype = ["--dtype", "int8"] if case == "bad-dtype" else []
    assert main(["export", "--checkpoint", str(run), "--out", str(out), *dtype]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left


def test_an_interrupted_export_leaves_no_directory(tmp_path, monkeypatch, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    make_run(run, PRESETS["tiny"])

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write_shard", disk_full)
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
