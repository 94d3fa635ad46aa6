import json
import subprocess
import sys

import pytest

from jaxllm import analytic
from jaxllm.cli import main
from jaxllm.config import PRESETS


def test_info_json_has_config_and_published_count(capsys):
    assert main(["info", "--preset", "gpt2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "gpt2"
    assert out["config"]["d_model"] == 768
    assert out["params"]["total"] == 124_439_808


def test_info_overrides_change_the_config(capsys):
    assert (
        main(
            [
                "info",
                "--preset",
                "tiny",
                "--override",
                "n_layers=3",
                "--override",
                "norm=rmsnorm",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["n_layers"] == 3 and out["config"]["norm"] == "rmsnorm"


def test_info_table(capsys):
    assert main(["info", "--preset", "small"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "preset small" in lines and f"  {'d_model':<21} 256" in lines
    total = analytic.param_counts(PRESETS["small"])["total"]  # the closed form, not the model's
    assert f"  {'total':<14} {total:>15,}" in lines
    # K and V, float32, 4 layers of 4 key/value heads 64 wide: 2 * 4 * 4 * 4 * 64 bytes.
    assert f"kv bytes/token {8192:>15,}" in lines


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["info", "--preset", "gpt5"], "unknown preset"),
        (["info", "--override", "n_layer=2"], "unknown ModelConfig field"),
        (["info", "--override", "n_layers=two"], "integer"),
        (["info", "--override", "n_heads=5"], "divisible"),
        (["info", "--bogus"], "unrecognized"),
        (["info", "--override", "vocab_size=2147483648"], "vocab_size must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(argv, word, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_value_error_that_is_not_bad_input_keeps_its_traceback(monkeypatch):
    """Only the project's input errors are one line and exit 2; a ValueError from a bug (JAX raises
    them too) propagates."""

    def bug(*_):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(analytic, "train_memory", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["info", "--preset", "tiny"])


def test_console_entry_point_runs_as_module():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm", "info", "--preset", "gpt5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("jaxllm: error:")
    assert "Traceback" not in proc.stderr


def test_bench_checks_every_preset_before_measuring(monkeypatch, capsys):
    from jaxllm import hardware

    monkeypatch.setattr(hardware, "calibrate", lambda **_: pytest.fail("measured first"))
    assert main(["bench", "--presets", "tiny", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nosuch'" in err and err.count("\n") == 1


def test_bench_checks_every_row_fits_before_measuring(monkeypatch, capsys):
    """A decode row too big for memory is refused before the rows ahead of it are measured."""
    from types import SimpleNamespace

    from jaxllm import bench, hardware, memory

    def compile_phase(config, phase, batch, seq):  # a footprint of 1 GB per row of the batch
        program = SimpleNamespace(phase=phase, batch=batch, seq=seq)
        return SimpleNamespace(program=program, xla=SimpleNamespace(footprint_bytes=10**9 * batch))

    monkeypatch.setattr(bench, "compile_phase", compile_phase)
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**11)
    monkeypatch.setattr(hardware, "calibrate", lambda **_: pytest.fail("measured first"))
    assert main(["bench", "--presets", "tiny", "--batches", "1", "101", "--quick"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "measuring decode at B=101 T=64 needs 101.00 GB" in captured.err
    assert "the device has 100.00 GB available" in captured.err
    assert "lower --batches" in captured.err and "--measure" not in captured.err


@pytest.mark.parametrize(
    ("command", "extra", "word"),
    [
        ("serve-bench", ["--preset", "gpt2"], "--preset: not allowed with argument --checkpoint"),
        ("serve-bench", ["--hf-dir", "hf"], "--hf-dir: not allowed with argument --checkpoint"),
        ("serve-bench", ["--override", "n_layers=1"], "--override does not apply to --checkpoint"),
        ("generate", ["--preset", "gpt2", "--prompt", "a"], "unrecognized arguments: --preset"),
        ("serve", ["--preset", "gpt2"], "unrecognized arguments: --preset"),
    ],
)
def test_a_checkpoint_keeps_its_model(tmp_path, monkeypatch, capsys, command, extra, word):
    """--checkpoint names the model: another source or a changed config is refused, not ignored."""
    from jaxllm import checkpoint

    monkeypatch.setattr(checkpoint, "load_params", lambda *_, **__: pytest.fail("loaded"))
    assert main([command, "--checkpoint", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1
