"""Checkpoints in the Hugging Face layout (GPT-2, Llama and Qwen2 families) as a ModelConfig and jaxllm
params.

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Only local files are read. ``load_config`` maps config.json to a
``ModelConfig``; ``load_params`` reads the tensors one at a time, converts each to jaxllm's layout and
``param_dtype`` on the host, writes it into its (layer-stacked, when scanned) host buffer, and moves
buffers to the device one by one, so a model is never held twice. Anything jaxllm does not implement
(another family, rope scaling other than linear and llama3, biases Llama does not have, ...) is refused
with an ``HFError`` naming the file and the problem, before any tensor is read where the config alone
tells.

Layout notes. GPT-2 stores Conv1D weights as [in, out] (c_attn [D, 3D] holds q, k, v side by side); its
head is tied to wte. Llama stores torch Linear weights as [out, in], so they are transposed; its q/k
weights are already in the "halves" rotary layout (feature i pairs with i + H/2) that ``model.rope``
uses, so no permutation is needed (the golden tests check this against the reference logits). Qwen2
is the Llama layout plus biases on q_proj, k_proj and v_proj.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxllm.config import ModelConfig, apply_overrides
from jaxllm.errors import InputError
from jaxllm.finite import require_finite
from jaxllm.model import Params

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
LOADABLE_DTYPES = ("F32", "F16", "BF16")


class HFError(InputError):
    """A Hugging Face checkpoint jaxllm cannot load; the message names the file and the problem."""


def load(
    hf_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[ModelConfig, Params]:
    """The config (with ``FIELD=VALUE`` overrides) and parameters of the checkpoint in ``hf_dir``."""
    config = load_config(hf_dir, overrides)
    params = load_params(hf_dir, config)
    require_finite(params, f"{hf_dir}: the weights")
    return config, params


def load_config(hf_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """Map ``hf_dir/config.json`` to a ModelConfig; overrides may change numerics or layout
    (dtype, param_dtype, scan_layers, scan_unroll, remat, max_len for rotary models), while a changed shape is
    refused when the tensors are read."""
    path = Path(hf_dir) / CONFIG
    raw = read_json(path)
    family = raw.get("model_type")
    if family not in _CONFIGS:
        raise HFError(
            f"{path}: model_type {family!r} is not supported; jaxllm loads {', '.join(_CONFIGS)}"
        )
    try:
        return apply_overrides(_CONFIGS[family](raw, path), overrides)
    except HFError:
        raise
    except ValueError as err:
        raise HFError(f"{path}: {err}") from None


def model_type(hf_dir: str | Path) -> str:
    return read_json(Path(hf_dir) / CONFIG).get("model_type", "")


def eos_ids(hf_dir: str | Path, vocab_size: int) -> tuple[int, ...]:
    """The end-of-sequence ids of config.json's ``eos_token_id`` (an id or a list), those in the
    vocabulary; generation stops on them as transformers' does."""
    return ids_in_vocab(read_json(Path(hf_dir) / CONFIG).get("eos_token_id"), vocab_size)


def ids_in_vocab(value: Any, vocab_size: int) -> tuple[int, ...]:
    """The ids of a config.json token field (an id, a list of ids or null) in [0, vocab_size)."""
    ids = value if isinstance(value, list) else [] if value is None else [value]
    return tuple(int(i) for i in ids if isinstance(i, int) and 0 <= i < vocab_size)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HFError(f"{path}: missing (not a Hugging Face checkpoint directory?)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise HFError(f"{path}: expected a JSON object")
    return raw


def _field(raw: dict[str, Any], key: str, path: Path, default: Any = ...) -> Any:
    if key in raw and raw[key] is not None:
        return raw[key]
    if default is ...:
        raise HFError(f"{path}: missing {key!r}")
    return default


def _refuse(path: Path, what: str, value: Any, allowed: Any) -> None:
    if value != allowed:
        raise HFError(f"{path}: {what}={value!r} is not supported (jaxllm implements {allowed!r})")


def _gpt2_config(raw: dict[str, Any], path: Path) -> ModelConfig:
    act = raw.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFError(f"{path}: activation_function={act!r} is not supported (tanh GELU only)")
    _refuse(path, "scale_attn_weights", raw.get("scale_attn_weights", True), True)
    _refuse(
        path, "scale_attn_by_inverse_layer_idx", raw.get("scale_attn_by_inverse_layer_idx"), False
    )
    _refuse(path, "add_cross_attention", raw.get("add_cross_attention", False), False)
    d_model = _field(raw, "n_embd", path)
    n_heads = _field(raw, "n_head", path)
    return ModelConfig(
        vocab_size=_field(raw, "vocab_size", path),
        max_len=_field(raw, "n_positions", path),
        d_model=d_model,
        n_layers=_field(raw, "n_layer", path),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_ff=_field(raw, "n_inner", path, 4 * d_model),
        norm="layernorm",
        norm_eps=_field(raw, "layer_norm_epsilon", path, 1e-5),
        positions="learned",
        mlp="gelu",
        use_bias=True,
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
    )


_ROPE_TYPES = ("default", "linear", "llama3")


def _rope_spec(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The rotary settings of config.json: ``rope_parameters`` (transformers >= 5, ``rope_theta``
    inside) over the older ``rope_scaling`` (``rope_theta`` beside it); both are JSON objects or null,
    and when both name a rope type they must agree."""
    spec: dict[str, Any] = {}
    kinds = set()
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise HFError(f"{path}: {key} must be a JSON object, got {value!r}")
        if value:
            kinds.add(value.get("rope_type", value.get("type", "default")))
        spec.update(value)
    if len(kinds) > 1:
        raise HFError(f"{path}: rope_scaling and rope_parameters disagree: {sorted(kinds)}")
    spec["rope_type"] = kinds.pop() if kinds else "default"
    return spec


def _rope(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """ModelConfig's rotary fields (rope_base, rope_scaling, ...) from config.json; rope types other
    than default, linear and llama3 are refused."""
    spec = _rope_spec(raw, path)
    kind = spec["rope_type"]
    if kind not in _ROPE_TYPES:
        raise HFError(
            f"{path}: rope type {kind!r} is not supported (jaxllm implements {', '.join(_ROPE_TYPES)})"
        )

    def need(key: str) -> Any:
        if spec.get(key) is None:
            raise HFError(f"{path}: rope type {kind!r} needs {key!r}, which is missing")
        return spec[key]

    theta = spec.get("rope_theta", raw.get("rope_theta", 10000.0))
    fields: dict[str, Any] = {"rope_base": float(theta)}
    if kind == "default":
        return fields
    fields.update(rope_scaling=kind, rope_factor=float(need("factor")))
    if kind == "llama3":
        fields.update(
            rope_low_freq_factor=float(need("low_freq_factor")),
            rope_high_freq_factor=float(need("high_freq_factor")),
            rope_original_len=need("original_max_position_embeddings"),
        )
    return fields


def _llama_config(raw: dict[str, Any], path: Path, qkv_bias: bool = False) -> ModelConfig:
    """Llama (and, with ``qkv_bias``, Qwen2): Llama's ``attention_bias`` would put a bias on o too."""
    _refuse(path, "hidden_act", raw.get("hidden_act", "silu"), "silu")
    _refuse(path, "attention_bias", raw.get("attention_bias", False), False)
    _refuse(path, "mlp_bias", raw.get("mlp_bias", False), False)
    d_model = _field(raw, "hidden_size", path)
    n_heads = _field(raw, "num_attention_heads", path)
    if raw.get("head_dim") is not None and raw["head_dim"] * n_heads != d_model:
        raise HFError(
            f"{path}: head_dim={raw['head_dim']} with {n_heads} heads is not hidden_size={d_model}; "
            "jaxllm needs head_dim = hidden_size / num_attention_heads"
        )
    return ModelConfig(
        vocab_size=_field(raw, "vocab_size", path),
        max_len=_field(raw, "max_position_embeddings", path),
        d_model=d_model,
        n_layers=_field(raw, "num_hidden_layers", path),
        n_heads=n_heads,
        n_kv_heads=_field(raw, "num_key_value_heads", path, n_heads),
        d_ff=_field(raw, "intermediate_size", path),
        norm="rmsnorm",
        norm_eps=_field(raw, "rms_norm_eps", path, 1e-6),
        positions="rotary",
        mlp="swiglu",
        use_bias=False,
        qkv_bias=qkv_bias,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        **_rope(raw, path),
    )


def _qwen2_config(raw: dict[str, Any], path: Path) -> ModelConfig:
    """Qwen2: the Llama layout with biases on q, k and v; sliding-window attention is refused."""
    _refuse(path, "use_sliding_window", raw.get("use_sliding_window", False), False)
    kinds = sorted(set(raw.get("layer_types") or ["full_attention"]))
    _refuse(path, "layer_types", kinds, ["full_attention"])
    return _llama_config(raw, path, qkv_bias=True)


_CONFIGS: dict[str, Callable[[dict[str, Any], Path], ModelConfig]] = {
    "gpt2": _gpt2_config,
    "llama": _llama_config,
    "qwen2": _qwen2_config,
}


class Tensors:
    """The tensors of a checkpoint directory, read one at a time in the config's ``param_dtype``.

    ``get`` checks name, dtype and shape before reading; ``unused`` lists what was never asked for.
    """

    def __init__(self, hf_dir: str | Path, dtype: np.dtype) -> None:
        self.dir = Path(hf_dir)
        self.dtype = dtype
        self.files = self._locate()  # tensor name -> file holding it
        self.used: set[str] = set()

    def _locate(self) -> dict[str, Path]:
        single, index = self.dir / SINGLE, self.dir / INDEX
        if single.exists():
            with self._open(single) as f:
                return dict.fromkeys(f.keys(), single)
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFError(f"{index}: no 'weight_map' object")
            return {name: self.dir / shard for name, shard in weight_map.items()}
        raise HFError(f"{self.dir}: neither {SINGLE} nor {INDEX} is there")

    @staticmethod
    def _open(path: Path) -> Any:
        if not path.exists():
            raise HFError(f"{path}: missing (listed in {INDEX})")
        try:
            return safe_open(str(path), framework="flax")
        except (SafetensorError, OSError) as err:
            raise HFError(f"{path}: not a readable safetensors file ({err})") from None

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` as a host array in ``self.dtype``, after checking its dtype and shape."""
        if name not in self.files:
            raise HFError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        path = self.files[name]
        with self._open(path) as f:
            if name not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise HFError(f"{path}: tensor {name!r} is missing (the index lists it here)")
            info = f.get_slice(name)
            if info.get_dtype() not in LOADABLE_DTYPES:
                raise HFError(
                    f"{path}: tensor {name!r} has dtype {info.get_dtype()}; jaxllm loads "
                    f"{', '.join(LOADABLE_DTYPES)}"
                )
            if tuple(info.get_shape()) != shape:
                raise HFError(
                    f"{path}: tensor {name!r} has shape {list(info.get_shape())}, but {CONFIG} "
                    f"implies {list(shape)}"
                )
            # The numpy framework cannot represent bfloat16; flax's arrays can, and np.asarray brings
            # each one back to the host, where layout changes and the dtype cast happen.
            array = np.asarray(f.get_tensor(name))
        self.used.add(name)
        return array.astype(self.dtype)

    def unused(self) -> list[str]:
        return sorted(set(self.files) - self.used)


def _gpt2_layer(t: Tensors, prefix: str, cfg: ModelConfig) -> Params:
    """One GPT-2 block: Conv1D weights are [in, out], so only reshapes are needed."""
    D, N, H, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    qkv = t.get(prefix + "attn.c_attn.weight", (D, 3 * D))  # [D, 3D]: q, k, v side by side
    qkv_bias = t.get(prefix + "attn.c_attn.bias", (3 * D,))
    attn = {
        name: {
            "kernel": qkv[:, j * D : (j + 1) * D].reshape(D, N, H),
            "bias": qkv_bias[j * D : (j + 1) * D].reshape(N, H),
        }
        for j, name in enumerate("qkv")
    }
    attn["o"] = {
        "kernel": t.get(prefix + "attn.c_proj.weight", (D, D)).reshape(N, H, D),
        "bias": t.get(prefix + "attn.c_proj.bias", (D,)),
    }
    mlp = {
        "up": {
            "kernel": t.get(prefix + "mlp.c_fc.weight", (D, F)),
            "bias": t.get(prefix + "mlp.c_fc.bias", (F,)),
        },
        "down": {
            "kernel": t.get(prefix + "mlp.c_proj.weight", (F, D)),
            "bias": t.get(prefix + "mlp.c_proj.bias", (D,)),
        },
    }
    return {
        "attn_norm": _layernorm(t, prefix + "ln_1", D),
        "attn": attn,
        "mlp_norm": _layernorm(t, prefix + "ln_2", D),
        "mlp": mlp,
    }


def _layernorm(t: Tensors, name: str, d: int) -> Params:
    return {"scale": t.get(name + ".weight", (d,)), "bias": t.get(name + ".bias", (d,))}


def _gpt2_params(t: Tensors, cfg: ModelConfig) -> tuple[Params, Callable[[int], Params]]:
    # Checkpoints saved from GPT2LMHeadModel prefix "transformer."; the original release does not.
    pre = "transformer." if t.has("transformer.wte.weight") else ""
    D, V = cfg.d_model, cfg.vocab_size
    top: Params = {
        "embed": {"embedding": t.get(pre + "wte.weight", (V, D))},
        "pos_embed": {"embedding": t.get(pre + "wpe.weight", (cfg.max_len, D))},
        "final_norm": _layernorm(t, pre + "ln_f", D),
    }
    if not cfg.tie_embeddings:
        top["head"] = {"kernel": t.get("lm_head.weight", (V, D)).T}  # [V, D] -> [D, V]
    return top, lambda i: _gpt2_layer(t, f"{pre}h.{i}.", cfg)


def _llama_layer(t: Tensors, prefix: str, cfg: ModelConfig) -> Params:
    """One Llama (or Qwen2) block: torch Linear weights are [out, in], so each is transposed."""
    D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    a, m = prefix + "self_attn.", prefix + "mlp."

    def linear(name: str, out: int, into: int) -> np.ndarray:
        return t.get(name + ".weight", (out, into)).T  # [in, out]

    def projection(name: str, heads: int) -> Params:
        out: Params = {"kernel": linear(a + name, heads * H, D).reshape(D, heads, H)}
        if cfg.qkv_bias:
            out["bias"] = t.get(a + name + ".bias", (heads * H,)).reshape(heads, H)
        return out

    attn = {
        "q": projection("q_proj", N),
        "k": projection("k_proj", K),
        "v": projection("v_proj", K),
        "o": {"kernel": linear(a + "o_proj", D, N * H).reshape(N, H, D)},
    }
    mlp = {
        "gate": {"kernel": linear(m + "gate_proj", F, D)},
        "up": {"kernel": linear(m + "up_proj", F, D)},
        "down": {"kernel": linear(m + "down_proj", D, F)},
    }
    return {
        "attn_norm": {"scale": t.get(prefix + "input_layernorm.weight", (D,))},
        "attn": attn,
        "mlp_norm": {"scale": t.get(prefix + "post_attention_layernorm.weight", (D,))},
        "mlp": mlp,
    }


def _llama_params(t: Tensors, cfg: ModelConfig) -> tuple[Params, Callable[[int], Params]]:
    D, V = cfg.d_model, cfg.vocab_size
    top: Params = {
        "embed": {"embedding": t.get("model.embed_tokens.weight", (V, D))},
        "final_norm": {"scale": t.get("model.norm.weight", (D,))},
    }
    if not cfg.tie_embeddings:
        top["head"] = {"kernel": t.get("lm_head.weight", (V, D)).T}  # [V, D] -> [D, V]
    return top, lambda i: _llama_layer(t, f"model.layers.{i}.", cfg)


_PARAMS = {"gpt2": _gpt2_params, "llama": _llama_params, "qwen2": _llama_params}
# Tensors a checkpoint may carry that are not parameters: GPT-2's causal-mask buffers, rotary
# frequency buffers, and a saved copy of a tied head.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def load_params(hf_dir: str | Path, config: ModelConfig) -> Params:
    """The parameters of ``hf_dir`` in jaxllm's layout for ``config`` (from ``load_config``):
    layers under ``blocks`` with a leading L axis when ``config.scan_layers``, else ``block_i``."""
    t = Tensors(hf_dir, config.storage_dtype)
    top, layer = _PARAMS[model_type(hf_dir)](t, config)
    if config.scan_layers:
        layers = {"blocks": _stack(layer, config.n_layers)}
    else:
        layers = {f"block_{i}": layer(i) for i in range(config.n_layers)}
    extra = [
        n
        for n in t.unused()
        if not n.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_embeddings and n == "lm_head.weight")
    ]
    if extra:
        raise HFError(
            f"{t.files[extra[0]]}: unexpected tensor {extra[0]!r} "
            f"({len(extra)} in all): the checkpoint has parts jaxllm's model does not"
        )
    leaves, treedef = jax.tree.flatten({**top, **layers})
    del top, layers  # the leaves list is now the only holder of the host arrays
    return jax.tree.unflatten(treedef, _to_device(leaves))


def _stack(layer: Callable[[int], Params], n_layers: int) -> Params:
    """Layer trees stacked on a leading L axis, written into one host buffer per leaf."""
    first = layer(0)
    buffers = jax.tree.map(lambda a: np.empty((n_layers, *a.shape), a.dtype), first)
    for i in range(n_layers):
        jax.tree.map(
            lambda buf, a, i=i: buf.__setitem__(i, a), buffers, first if i == 0 else layer(i)
        )
    return buffers


def _to_device(leaves: list[np.ndarray]) -> list[jax.Array]:
    """Move host arrays to the default device one at a time, dropping each host copy once moved."""
    leaves.reverse()
    placed = []
    while leaves:
        placed.append(jax.device_put(leaves.pop()))
    return placed
