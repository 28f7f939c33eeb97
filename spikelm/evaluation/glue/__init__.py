"""Fine-tuning and evaluation on GLUE, GLUE-format folders and the offline GLUE-style suite.

Reading order: ``tasks`` (task specs and readers), ``metrics``, ``models`` (which model and
tokenizer a run starts from, the baselines), ``finetune`` (the training loop), ``report`` (the
paper's table), ``sources`` and ``offline`` (building the offline suite from packages).
"""
