"""Weight loaders: Hugging Face directories, GGUF files and the embedded default model."""

from infercept.weights.errors import InvalidWeightsError, WeightsNotFoundError

__all__ = ["InvalidWeightsError", "WeightsNotFoundError"]
