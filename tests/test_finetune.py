"""Fine-tuning a Hugging Face checkpoint (``jaxllm train --hf-dir``): the gpt2 fixture (the one with a
tokenizer.json) trained a few steps on text its tokenizer encodes."""

import json
import shutil
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

pytest.importorskip("safetensors")  # the `hf` extra
pytest.importorskip("tokenizers")
from tokenizers import Tokenizer

from jaxllm import checkpoint, data, finetune, hf, loop
from jaxllm.cli import main
from jaxllm.train import loss_fn, training_config

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
# Few small steps; the step-0 validation is the checkpoint's own loss.
ARGS = ["--steps", "8", "--batch", "4", "--seq", "32", "--lr", "1e-2", "--eval-every", "4"]
ARGS += ["--eval-batches", "1", "--ckpt-every", "4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """24 KB of Python source: text the fixture's byte-level BPE encodes."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(data.default_corpus_files()[0].read_bytes()[:24_000])
    return path


@pytest.mark.slow  # 15-35 s on the shared 2-core machine: compiles a train step
def test_fine_tuning_lowers_the_loss_and_resumes_exactly(tmp_path, corpus, capsys):
    """8 steps from a copy of the gpt2 fixture: step 0 is the checkpoint's own loss, the loss falls,
    the run records where it came from, and steps 5-8 again from step 4, after the checkpoint is
    moved away, give the same parameters bit for bit. (One test: the run is the costly part.)"""
    source = Path(shutil.copytree(FIXTURES / "gpt2", tmp_path / "gpt2"))
    run = tmp_path / "run"
    argv = ["train", "--hf-dir", str(source), "--data", str(corpus), "--out", str(run), *ARGS]
    assert main(argv) == 0
    summary = json.loads((run / loop.SUMMARY_FILE).read_text())
    assert summary["step"] == 8 and summary["unit"] == "token"
    # Step 0's validation loss is the checkpoint's own, computed here from its files directly.
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    stream = np.asarray([*tok.encode(corpus.read_text()).ids, 0])  # eos_token_id 0 ends it
    val = data.split(stream, 0.1)[1]
    config, params = hf.load(source)
    batch = data.eval_batches(val, 1, 4, 32)[0]
    assert summary["first_val_loss"] == pytest.approx(float(loss_fn(params, batch, config)), 1e-5)
    assert summary["last_val_loss"] < summary["first_val_loss"] - 0.5

    meta = checkpoint.load_meta(run)
    raw = json.loads((source / "config.json").read_text())
    assert meta["origin"] == {
        "hf_dir": str(source),
        "model_type": "gpt2",
        "bos_token_id": raw["bos_token_id"],
        "eos_token_id": raw["eos_token_id"],
    }
    # float32 master weights, scanned (unrolled on a CPU, as jaxllm train compiles them here)
    assert checkpoint.config_from_meta(meta, run) == training_config(config)
    assert (run / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()

    resumed = Path(shutil.copytree(run, tmp_path / "resumed"))
    shutil.rmtree(resumed / "8")
    shutil.move(source, tmp_path / "moved")
    capsys.readouterr()
    assert main(["train", "--out", str(resumed), "--resume"]) == 0
    assert "token-unigram entropy" in capsys.readouterr().out
    _, straight = checkpoint.load_params(run)
    _, again = checkpoint.load_params(resumed)
    chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(straight))


@pytest.mark.parametrize(
    ("origin", "word"),
    [
        (FIXTURES / "gpt2", "was fine-tuned from " + str(FIXTURES / "gpt2")),
        (None, "it was trained from a preset"),
    ],
)
def test_resume_with_another_hf_dir_is_refused(tmp_path, origin, word):
    """--hf-dir given with --resume must name where the run started."""
    run = tmp_path / "run"
    meta = {"origin": finetune.Origin.read(origin).to_dict()} if origin else {}
    config = hf.load_config(FIXTURES / "gpt2")
    checkpoint.save(checkpoint.manager(run), 4, {"w": np.zeros(2)}, None, config, meta)
    with pytest.raises(checkpoint.CheckpointError, match=word):
        loop.train(run, resume=True, hf_dir=str(FIXTURES / "qwen2"))


def _copy_with_tokenizer(tmp_path: Path, name: str) -> Path:
    """A fixture without a tokenizer of its own, given the gpt2 fixture's (288 tokens)."""
    path = Path(shutil.copytree(FIXTURES / name, tmp_path / name))
    shutil.copyfile(FIXTURES / "gpt2" / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.mark.parametrize(
    ("hf_dir", "extra", "word"),
    [
        ("gpt2", ["--override", "n_layers=3"], "--override n_layers=3 would change the architecture"),
        ("gpt2", ["--override", "max_len=32"], "overrides of dtype, param_dtype, scan_layers, scan_unroll, remat"),
        ("gpt2", ["--seq", "65"], "seq 65 exceeds the model's context max_len=64"),
        ("gpt2", ["--data", "SHORT"], "fewer than seq_len + 1 = 33"),
        ("gpt2", ["--data", "BINARY"], "is not UTF-8 text (byte 1)"),
        ("gpt2", ["--preset", "tiny"], "not allowed with argument --hf-dir"),
        ("llama", [], "tokenizer.json: missing; fine-tuning reads the checkpoint's tokenizer"),
        ("LLAMA+TOKENIZER", [], "288 tokens, more than the model's vocab_size=256"),
        ("qwen2", ["--override", "positions=learned"], "would change the architecture"),
    ],
)  # fmt: skip
def test_bad_fine_tuning_input_is_one_line_before_anything_runs(
    tmp_path, corpus, monkeypatch, capsys, hf_dir, extra, word
):
    monkeypatch.setattr(loop, "Run", lambda *a: pytest.fail("traced before checking input"))
    (tmp_path / "short.txt").write_text("def f(): pass\n" * 4)
    (tmp_path / "binary.txt").write_bytes(b"a\xff\xfe")
    files = {"SHORT": tmp_path / "short.txt", "BINARY": tmp_path / "binary.txt"}
    extra = [str(files.get(a, a)) for a in extra]
    if hf_dir == "LLAMA+TOKENIZER":
        source = _copy_with_tokenizer(tmp_path, "llama")
    else:
        source = FIXTURES / hf_dir
    out = tmp_path / "run"
    argv = ["train", "--hf-dir", str(source), "--data", str(corpus), "--out", str(out), *ARGS]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err, err
    assert not out.exists()


def test_the_corpus_is_each_document_then_eos(tmp_path):
    source = FIXTURES / "gpt2"
    origin = finetune.Origin.read(source)
    tokenizer = finetune.CorpusTokenizer.load(source, hf.load_config(source), origin)
    reference = Tokenizer.from_file(str(source / "tokenizer.json"))
    texts = ["The quick brown fox", "", "jumps over\nthe lazy dog"]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    expected = [t for text in texts if text for t in [*reference.encode(text).ids, 0]]
    stream = tokenizer.corpus(tmp_path)  # the empty document adds nothing, as with bytes
    assert stream.dtype == np.uint16 and stream.tolist() == expected
