import chex
import jax
import pytest

from jaxllm import checkpoint
from jaxllm.config import PRESETS
from jaxllm.model import init_params


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
