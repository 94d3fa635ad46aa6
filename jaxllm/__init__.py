"""jaxllm: a GPT-style decoder in JAX/XLA with compiled, measured training and serving phases.

The names below load on first use, so that ``jaxllm.launch`` (the command's entry point) can run
before JAX is imported."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxllm.config import PRESETS, ModelConfig, get_preset

__all__ = ["PRESETS", "ModelConfig", "get_preset"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from jaxllm import config

        return getattr(config, name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
