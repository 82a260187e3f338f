"""embedtune: find the best fine-tuned sentence-embedding model for a retrieval job, and prove it."""

__version__ = "0.1.0"
