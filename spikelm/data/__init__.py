"""Data: tokenized corpora, pretraining objectives, labelled tasks."""
