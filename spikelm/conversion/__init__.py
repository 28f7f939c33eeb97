"""Checkpoints from elsewhere turned into SpikeLM models: the authors' released checkpoints (``official``)."""
