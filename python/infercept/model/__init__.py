"""Model definitions (torch) over the paged KV cache, configs, loaders and tokenizer."""

from infercept.model.attention import PagedAttentionMetadata
from infercept.model.config import ModelConfig, RopeScaling
from infercept.model.llama import LlamaForCausalLM
from infercept.model.loader import load_model, load_weights
from infercept.model.paged_cache import KVCache
from infercept.model.tokenizer import Tokenizer

__all__ = ["KVCache", "LlamaForCausalLM", "ModelConfig", "PagedAttentionMetadata", "RopeScaling",
           "Tokenizer", "load_model", "load_weights"]
