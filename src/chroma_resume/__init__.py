"""chroma-resume: crash-safe, incremental builds of Chroma indexes with FlagEmbedding."""

__version__ = "0.1.0"
