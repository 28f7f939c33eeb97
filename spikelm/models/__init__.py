"""The SpikeLM models, as transformers models: the config, the encoder (BERT-shaped) and the causal decoder."""
