"""``jaxllm train --mesh``: refused meshes, training on 8 simulated devices equal to one device,
and checkpoints that restore onto another mesh or onto one device.

The 8-device runs happen in a subprocess (tests/train_mesh_worker.py): the device count is fixed when
JAX starts, and the rest of the suite runs on one device. This process (one device) then loads and
resumes what the 8-device mesh saved.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import pytest

from jaxllm import checkpoint, loop
from jaxllm.cli import main

WORKER = Path(__file__).with_name("train_mesh_worker.py")
# f32 sums in another order on a mesh (measured up to 1.4e-6): AdamW's update lr * m / sqrt(v)
# magnifies that for near-zero gradients (as in tests/test_mesh.py); 1e-5 is 1/300 of lr.
TOL = 1e-5


def _worker(check: str, corpus: str, work: Path) -> dict:
    work.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, str(WORKER), check, corpus, str(work)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_mesh_that_does_not_fit_is_refused_in_one_line_before_anything_is_made(tmp_path, corpus):
    got = _worker("refusals", corpus, tmp_path)
    expected = {
        "batch": "mesh axis data x fsdp=8 does not divide batch=4",
        "micro_batch": "data x fsdp=4 does not divide the micro-batch batch/accum=8/4=2",
        "heads": "mesh axis tensor=8 does not divide n_heads=4",
        "devices": "has 2 devices; there are 8",
    }
    for name, words in expected.items():
        case = got[name]
        assert case["status"] == 2 and words in case["err"], case
        assert case["err"].count("\n") == 1 and not case["created"], case


def test_a_state_saved_on_one_mesh_loads_onto_another_and_onto_one_device(tmp_path, corpus):
    for name, case in _worker("layouts", corpus, tmp_path).items():
        assert case == {"diff": 0.0, "placed": True}, name


@pytest.mark.slow  # 4 runs compiled in an 8-device process
def test_training_on_a_mesh_equals_one_device(tmp_path, corpus):
    for accum, case in _worker("cli", corpus, tmp_path).items():
        assert case["steps"] == 2, accum
        assert case["params"] <= TOL and case["loss"] <= TOL, (accum, case)


@pytest.mark.slow  # 4 runs compiled in an 8-device process, then a resume here
def test_a_run_saved_on_one_mesh_resumes_on_another(tmp_path, corpus):
    got = _worker("reshard", corpus, tmp_path)
    assert all(got["placed"].values()), got["placed"]
    assert got["restored"] == {"data=8": 0.0, "one device": 0.0}
    for name, case in got["resumed"].items():
        assert case["step"] == 4 and case["params"] <= TOL, (name, case)
    # This process has one device: the step saved on fsdp=4,tensor=2 resumes here from the command.
    run = tmp_path / "here"
    shutil.copytree(tmp_path / "fsdp4_tensor2", run)
    shutil.rmtree(run / "4")
    assert main(["train", "--resume", "--out", str(run), "--data", corpus]) == 0
    chex.assert_trees_all_close(
        checkpoint.load_params(run)[1],
        checkpoint.load_params(tmp_path / "straight")[1],
        atol=TOL,
        rtol=0,
    )
    assert json.loads((run / loop.SUMMARY_FILE).read_text())["step"] == 4
