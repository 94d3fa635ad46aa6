import json
import shutil
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from jaxllm import checkpoint
from jaxllm.config import LATER_FIELDS, PRESETS, ModelConfig
from jaxllm.model import Transformer, init_params

# Saved by the code of commit 60bcecc, before the LATER_FIELDS existed (fixtures/make_old_checkpoint.py).
OLD_RUN = Path(__file__).parent / "fixtures" / "ckpt-60bcecc"


def test_params_round_trip_with_config(tmp_path):
    cfg = PRESETS["tiny"].replace(n_kv_heads=2)
    params = init_params(cfg, jax.random.key(1))
    checkpoint.save(checkpoint.manager(tmp_path), 7, params, None, cfg, {"note": "x"})
    assert checkpoint.latest_step(tmp_path) == 7
    assert checkpoint.load_meta(tmp_path)["note"] == "x"
    loaded_cfg, loaded = checkpoint.load_params(tmp_path)
    assert loaded_cfg == cfg
    chex.assert_trees_all_equal(loaded, params)


def test_missing_and_foreign_checkpoints_are_named(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint directory"):
        checkpoint.load_params(tmp_path / "absent")
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.load_params(tmp_path)
    (tmp_path / "3" / "meta").mkdir(parents=True)
    (tmp_path / "3" / "_CHECKPOINT_METADATA").write_text("{}")
    (tmp_path / "3" / "commit_success.txt").write_text("")
    (tmp_path / "3" / "meta" / "metadata").write_text('{"config": {"width": 3}}')
    with pytest.raises(checkpoint.CheckpointError, match="not a jaxllm checkpoint"):
        checkpoint.load_params(tmp_path)


def test_checkpoint_saved_before_later_fields_loads_with_their_defaults(tmp_path):
    run = shutil.copytree(OLD_RUN, tmp_path / "run")
    saved = json.loads((run / "3" / "meta" / "metadata").read_text())["config"]
    assert not set(LATER_FIELDS) & set(saved)  # the fixture predates them
    config, params = checkpoint.load_params(run)
    assert config == ModelConfig(**saved)
    assert {f: getattr(config, f) for f in LATER_FIELDS} == {
        f: getattr(ModelConfig(), f) for f in LATER_FIELDS
    }
    ref = np.load(run / "reference.npz")
    positions = np.arange(ref["tokens"].shape[1])[None]
    logits = Transformer(config).apply({"params": params}, ref["tokens"], positions)[0]
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("change", ["drop d_ff", "add width"])
def test_config_missing_an_original_field_or_with_an_unknown_one_is_foreign(tmp_path, change):
    run = shutil.copytree(OLD_RUN, tmp_path / "run")
    meta_file = run / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    if change == "drop d_ff":
        del meta["config"]["d_ff"]
    else:
        meta["config"]["width"] = 3
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="not a jaxllm checkpoint"):
        checkpoint.load_params(run)
