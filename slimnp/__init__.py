"""slimnp: compact recurrent neural language models with slim embeddings."""

__version__ = "0.1.0"
