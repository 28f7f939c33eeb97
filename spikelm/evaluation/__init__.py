"""Evaluating language models: perplexity on the Brown evaluation text and zero-shot tasks through lm-eval."""
