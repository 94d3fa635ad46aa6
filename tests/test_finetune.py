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
from jaxllm.train import loss_fn

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


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """(run directory, the copy of the gpt2 fixture it was fine-tuned from), after 8 steps."""
    tmp = tmp_path_factory.mktemp("finetune")
    source = Path(shutil.copytree(FIXTURES / "gpt2", tmp / "gpt2"))
    run = tmp / "run"
    argv = ["train", "--hf-dir", str(source), "--data", str(corpus), "--out", str(run), *ARGS]
    assert main(argv) == 0
    return run, source


def _summary(run: Path) -> dict:
    return json.loads((run / loop.SUMMARY_FILE).read_text())


def test_fine_tuning_starts_from_the_checkpoint_and_lowers_its_loss(fine_tuned, corpus):
    run, source = fine_tuned
    summary = _summary(run)
    assert summary["step"] == 8 and summary["unit"] == "token"
    # Step 0's validation loss is the checkpoint's own, computed here from its files directly.
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    stream = np.asarray([*tok.encode(corpus.read_text()).ids, 0])  # eos_token_id 0 ends it
    val = data.split(stream, 0.1)[1]
    config, params = hf.load(source)
    batch = data.eval_batches(val, 1, 4, 32)[0]
    assert summary["first_val_loss"] == pytest.approx(float(loss_fn(params, batch, config)), 1e-5)
    assert summary["last_val_loss"] < summary["first_val_loss"] - 0.5


def test_the_run_records_its_origin_and_keeps_the_tokenizer(fine_tuned):
    run, source = fine_tuned
    meta = checkpoint.load_meta(run)
    raw = json.loads((source / "config.json").read_text())
    assert meta["origin"] == {
        "hf_dir": str(source),
        "model_type": "gpt2",
        "bos_token_id": raw["bos_token_id"],
        "eos_token_id": raw["eos_token_id"],
    }
    assert (run / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert checkpoint.config_from_meta(meta, run) == hf.load_config(source)


def test_resume_is_bit_exact_without_the_checkpoint_directory(tmp_path, fine_tuned, capsys):
    """Steps 5-8 again from step 4, after the source checkpoint is gone: the run's own records and
    copy of the tokenizer are enough, and the parameters are the uninterrupted run's."""
    run, source = fine_tuned
    resumed = Path(shutil.copytree(run, tmp_path / "run"))
    shutil.rmtree(resumed / "8")
    moved = Path(shutil.move(source, tmp_path / "moved"))
    try:
        assert main(["train", "--out", str(resumed), "--resume"]) == 0
    finally:
        shutil.move(moved, source)
    assert "token-unigram entropy" in capsys.readouterr().out
    config, straight = checkpoint.load_params(run)
    _, again = checkpoint.load_params(resumed)
    chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(straight))
    assert config.param_dtype == "float32"  # master weights, as for presets


def test_resume_with_another_hf_dir_is_refused(fine_tuned, capsys):
    run, _ = fine_tuned
    assert main(["train", "--out", str(run), "--resume", "--hf-dir", str(FIXTURES / "gpt2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was fine-tuned from" in err


def _copy_with_tokenizer(tmp_path: Path, name: str) -> Path:
    """A fixture without a tokenizer of its own, given the gpt2 fixture's (288 tokens)."""
    path = Path(shutil.copytree(FIXTURES / name, tmp_path / name))
    shutil.copyfile(FIXTURES / "gpt2" / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.mark.parametrize(
    ("hf_dir", "extra", "word"),
    [
        ("gpt2", ["--override", "n_layers=3"], "--override n_layers=3 would change the architecture"),
        ("gpt2", ["--override", "max_len=32"], "overrides of dtype, param_dtype, scan_layers, remat"),
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
