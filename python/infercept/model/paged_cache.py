"""Device tensors that hold the paged KV cache of every layer."""

from __future__ import annotations

import torch

from infercept.model.config import ModelConfig


class KVCache:
    """Per-layer key and value caches, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    Only tensors live here; which block belongs to which request is the C++ KV cache manager's
    bookkeeping, passed in per step as block tables.

    Attributes:
        key_caches: One key cache tensor per layer.
        value_caches: One value cache tensor per layer.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        """Allocates zeroed caches.

        Args:
            config: The model whose layers and KV heads the cache serves.
            num_blocks: Blocks per layer.
            block_size: Tokens per block.
            dtype: Element type of K and V.
            device: Where the caches live.

        Raises:
            ValueError: ``num_blocks`` or ``block_size`` is not positive.
        """
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.key_caches = [torch.zeros(shape, dtype=dtype, device=device)
                           for _ in range(config.num_layers)]
        self.value_caches = [torch.zeros(shape, dtype=dtype, device=device)
                             for _ in range(config.num_layers)]

    @property
    def num_layers(self) -> int:
        """Number of layers cached."""
        return len(self.key_caches)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies over all layers, K and V together."""
        cache = self.key_caches[0]
        return 2 * self.num_layers * cache[0].numel() * cache.element_size()
