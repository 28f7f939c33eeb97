"""Evaluation: GLUE and the offline GLUE-style suite, causal-LM perplexity, energy counting and its report."""
