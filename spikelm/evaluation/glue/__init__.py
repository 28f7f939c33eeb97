"""GLUE, GLUE-format folders and the offline GLUE-style suite: what a fine-tuning run is evaluated on.

Reading order: ``tasks`` (task specs and readers), ``metrics``, ``models`` (which model and tokenizer a
run starts from, the baselines), ``report`` (the paper's table) and ``offline`` (building the offline
suite from packages, with ``spikelm.data.sources``). The fine-tuning loop is ``spikelm.training.finetune``.
"""
