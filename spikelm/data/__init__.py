"""Data: fetched sources, pretraining corpora and their splits, pretraining objectives, tokenizers."""
