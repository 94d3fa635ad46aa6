import importlib
import json
import sys
import types

import jax
import numpy as np
import pytest

from jaxllm import checkpoint
from jaxllm.cli import main
from jaxllm.config import PRESETS
from jaxllm.model import init_params

CFG = PRESETS["tiny"]  # byte vocabulary: 256 bytes + end-of-text


def _byte_tokenizer() -> types.ModuleType:
    """jaxllm.data if it is installed, else a stand-in with its names (encode, decode, EOT)."""
    try:
        return importlib.import_module("jaxllm.data")
    except ModuleNotFoundError:
        shim = types.ModuleType("jaxllm.data")
        shim.EOT = 256  # pyright: ignore[reportAttributeAccessIssue]
        shim.encode = lambda text: np.frombuffer(text.encode(), np.uint8).astype(np.int32)  # pyright: ignore[reportAttributeAccessIssue]
        shim.decode = lambda ids: bytes(i for i in ids if i < 256).decode(errors="replace")  # pyright: ignore[reportAttributeAccessIssue]
        return shim


@pytest.fixture(autouse=True)
def tokenizer(monkeypatch):
    module = _byte_tokenizer()
    monkeypatch.setitem(sys.modules, "jaxllm.data", module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    params = init_params(CFG, jax.random.key(0))
    checkpoint.save(checkpoint.manager(path), 1, params, None, CFG)
    return str(path)


def _generate(capsys, *argv) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_prompts_file_batch_equals_each_prompt_alone(run_dir, tmp_path, capsys, tokenizer):
    prompts = ["Hello", "Hi, you"]  # 5 and 7 bytes: one bucket, so the alone runs share a program
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n")
    common = ["--checkpoint", run_dir, "--max-new-tokens", "5", "--temperature", "0"]
    batch = _generate(capsys, *common, "--prompts-file", str(file))
    alone = [_generate(capsys, *common, "--prompt", p)["results"][0] for p in prompts]
    assert [r["tokens"] for r in batch["results"]] == [r["tokens"] for r in alone]
    for result, prompt in zip(batch["results"], prompts, strict=True):
        assert result["prompt"] == prompt
        assert result["text"] == tokenizer.decode(result["tokens"])
        assert len(result["tokens"]) == 5 or result["stopped"]
    timing = batch["timing"]
    assert timing["prefill_s"] > 0 and timing["decode_s"] > 0 and timing["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_plain_output_and_seeded_sampling(run_dir, capsys):
    argv = ["--checkpoint", run_dir, "--prompt", "Hi", "--max-new-tokens", "4", "--top-k", "5"]
    first = _generate(capsys, *argv, "--seed", "1")["results"][0]["tokens"]
    assert _generate(capsys, *argv, "--seed", "1")["results"][0]["tokens"] == first
    assert main(["generate", *argv]) == 0
    assert capsys.readouterr().out.count("\n") >= 1


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "x", "--max-new-tokens", "64"], "beyond the model's context"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--top-k", "0"], "top_k"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["--prompt", "x", "--prompts-file", "f"], "not allowed with"),
        (["--prompts-file", "/nonexistent/prompts.txt"], "No such file"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(run_dir, extra, word, capsys):
    assert main(["generate", "--checkpoint", run_dir, *extra]) != 0
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_or_foreign_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"]) != 0
    assert "no checkpoint directory" in capsys.readouterr().err
    (tmp_path / "foreign" / "3" / "meta").mkdir(parents=True)
    (tmp_path / "foreign" / "3" / "meta" / "metadata").write_text('{"config": {"d": 1}}')
    assert main(["generate", "--checkpoint", str(tmp_path / "foreign"), "--prompt", "x"]) != 0
    err = capsys.readouterr().err
    assert "jaxllm: error:" in err and err.count("\n") == 1
