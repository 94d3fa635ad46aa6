"""jaxllm: a GPT-style decoder in JAX/XLA with compiled, measured training and serving phases."""

from jaxllm.config import PRESETS, ModelConfig, get_preset

__all__ = ["PRESETS", "ModelConfig", "get_preset"]
