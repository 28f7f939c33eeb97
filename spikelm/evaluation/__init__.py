"""Evaluation: GLUE and the offline GLUE-style suite, causal-LM perplexity (also on the Brown evaluation text),
zero-shot tasks through lm-eval, energy counting and its report."""
