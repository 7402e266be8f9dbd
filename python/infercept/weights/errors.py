"""Typed errors of the weight loaders; each message names the path and what is wrong."""


class WeightsNotFoundError(FileNotFoundError):
    """A model path, its config.json, a weight shard or the embedded default model is missing."""


class InvalidWeightsError(ValueError):
    """A weight file exists but is malformed, truncated or does not fit the architecture."""
