import json

import jax
import jax.numpy as jnp
import pytest

from jaxllm import checkpoint, cli, data
from jaxllm import generate as generation
from jaxllm.cli import main
from jaxllm.config import PRESETS
from jaxllm.model import init_params

CFG = PRESETS["tiny"]  # byte vocabulary: 256 bytes + end-of-text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    params = init_params(CFG, jax.random.key(0))
    checkpoint.save(checkpoint.manager(path), 1, params, None, CFG)
    return str(path)


def _generate(capsys, *argv) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_prompts_file_batch_equals_each_prompt_alone(run_dir, tmp_path, capsys):
    prompts = ["Hello", "Hi, you"]  # 5 and 7 bytes: one bucket, so the alone runs share a program
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts) + "\n")
    common = ["--checkpoint", run_dir, "--max-new-tokens", "5", "--temperature", "0"]
    batch = _generate(capsys, *common, "--prompts-file", str(file))
    alone = [_generate(capsys, *common, "--prompt", p)["results"][0] for p in prompts]
    assert [r["tokens"] for r in batch["results"]] == [r["tokens"] for r in alone]
    for result, prompt in zip(batch["results"], prompts, strict=True):
        assert result["prompt"] == prompt
        assert result["text"] == data.decode(result["tokens"])
        assert len(result["tokens"]) == 5 or result["stopped"]
    timing = batch["timing"]
    assert timing["prefill_s"] > 0 and timing["decode_s"] > 0 and timing["decode_tokens_per_s"] > 0


def test_top_k_1_at_a_huge_temperature_is_greedy(run_dir, capsys):
    argv = ["--checkpoint", run_dir, "--prompt", "Hi", "--max-new-tokens", "4"]
    greedy = _generate(capsys, *argv, "--temperature", "0")["results"][0]["tokens"]
    huge = _generate(capsys, *argv, "--temperature", "1e38", "--top-k", "1")["results"][0]
    assert huge["tokens"] == greedy  # every logit / 1e38 rounds to 0 in float32


@pytest.mark.slow  # the mesh path runs fast in tests/test_mesh_serving.py
def test_a_one_device_mesh_generates_what_one_device_does(run_dir, capsys):
    argv = ["--checkpoint", run_dir, "--prompt", "Hi", "--max-new-tokens", "4", "--seed", "2"]
    plain = _generate(capsys, *argv)["results"][0]["tokens"]
    assert _generate(capsys, *argv, "--mesh", "data=1,tensor=1")["results"][0]["tokens"] == plain


@pytest.mark.slow
def test_plain_output_and_seeded_sampling(run_dir, capsys):
    argv = ["--checkpoint", run_dir, "--prompt", "Hi", "--max-new-tokens", "4", "--top-k", "5"]
    first = _generate(capsys, *argv, "--seed", "1")["results"][0]
    assert _generate(capsys, *argv, "--seed", "1")["results"][0]["tokens"] == first["tokens"]
    assert main(["generate", *argv, "--seed", "1"]) == 0  # plain: the same text, on one line
    assert capsys.readouterr().out == cli.one_line(data.decode(first["tokens"])) + "\n"


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        (["--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "x", "--max-new-tokens", "64"], "beyond the model's context"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--temperature", "1e39"], "temperature must be a number in [0, 3.4"),
        (["--prompt", "x", "--top-k", "0"], "top_k"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["--prompt", "x", "--prompts-file", __file__], "not allowed with"),
        (["--prompts-file", "/nonexistent/prompts.txt"], "no file at '/nonexistent/prompts.txt'"),
        (["--prompts-file", "/"], "'/' is not a file"),
        (["--prompt", "x", "--seed", str(2**64)], "expected a seed in [0, 4294967295]"),
        (["--prompt", "x", "--seed", "-1"], "expected a seed in [0, 4294967295]"),
        (["--prompt", "x", "--mesh", "data=2"], "has 2 devices; there are 1"),
        (["--prompt", "x", "--mesh", "pipe=1"], "'pipe=1' is unknown"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(run_dir, extra, word, capsys):
    assert main(["generate", "--checkpoint", run_dir, *extra]) == 2
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1 and "Traceback" not in err


def test_prompts_that_are_not_utf8_text_are_refused_in_one_line(run_dir, tmp_path, capsys):
    file = tmp_path / "prompts.txt"
    file.write_bytes(b"ok\nab\xff\n")
    for source, message in [
        (["--prompts-file", str(file)], f"--prompts-file {file} is not UTF-8 text: byte 0xff at offset 5"),
        (["--prompt", "ab\udcffcd"], "--prompt is not UTF-8 text: byte 0xff at offset 2"),  # argv's b"ab\xffcd"
        (["--prompt", "a\ud800"], "--prompt is not text: lone surrogate U+D800 at character 1"),
    ]:  # fmt: skip
        assert main(["generate", "--checkpoint", run_dir, *source]) == 2
        assert capsys.readouterr().err == f"jaxllm: error: {message}\n"


def test_missing_or_foreign_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "x"]) != 0
    assert "no checkpoint directory" in capsys.readouterr().err
    (tmp_path / "foreign" / "3" / "meta").mkdir(parents=True)
    (tmp_path / "foreign" / "3" / "meta" / "metadata").write_text('{"config": {"d": 1}}')
    assert main(["generate", "--checkpoint", str(tmp_path / "foreign"), "--prompt", "x"]) != 0
    err = capsys.readouterr().err
    assert "jaxllm: error:" in err and err.count("\n") == 1


def test_prompts_split_on_newlines_only_and_plain_output_is_one_line_each(
    run_dir, tmp_path, capsys
):
    file = tmp_path / "prompts.txt"
    file.write_bytes("a\x0cb\r\nc\u2028d\re\n".encode())
    common = ["--checkpoint", run_dir, "--max-new-tokens", "3", "--temperature", "0"]
    results = _generate(capsys, *common, "--prompts-file", str(file))["results"]
    assert [r["prompt"] for r in results] == ["a\x0cb", "c\u2028d", "e"]
    assert cli.one_line("x\ny\\n\u2028") == "x\\ny\\\\n\\u2028"
    texts = [r["text"] for r in results]
    assert main(["generate", *common, "--prompts-file", str(file)]) == 0
    assert capsys.readouterr().out == "".join(cli.one_line(t) + "\n" for t in texts)


def test_ctrl_c_during_generate_exits_130_without_a_traceback(run_dir, monkeypatch, capsys):
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation, "generate", interrupted)
    argv = ["generate", "--checkpoint", run_dir, "--prompt", "x", "--max-new-tokens", "2"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err == "jaxllm: interrupted\n"


def _save(path, step, params):
    checkpoint.save(checkpoint.manager(path), step, params, None, CFG)


def test_non_finite_or_damaged_checkpoints_are_refused_or_skipped(tmp_path, capsys):
    params = init_params(CFG, jax.random.key(0))
    nan = jax.tree.map(lambda p: p.at[0].set(jnp.nan) if p.ndim else p, params)
    _save(tmp_path / "nan", 1, nan)
    argv = ["--prompt", "x", "--max-new-tokens", "2", "--temperature", "0"]
    assert main(["generate", "--checkpoint", str(tmp_path / "nan"), *argv]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "NaN or infinite" in err and err.count("\n") == 1
    _save(tmp_path / "mixed", 1, params)
    _save(tmp_path / "mixed", 2, nan)
    assert main(["generate", "--checkpoint", str(tmp_path / "mixed"), *argv]) == 0
    err = capsys.readouterr().err
    assert err.startswith("jaxllm: warning:") and "skipped step 2" in err
