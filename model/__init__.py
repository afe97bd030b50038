"""kiln's model: a Llama-style causal LM that knows nothing about parallelism or data."""

from model.llama import KVCache, ModelConfig, Transformer, flops_per_token, generate, param_count

__all__ = ["KVCache", "ModelConfig", "Transformer", "flops_per_token", "generate", "param_count"]
