"""Training recipes: pretraining (with its presets and firing-rate monitor), task fine-tuning (optionally with
knowledge distillation from a teacher) and distillation of a (spiking) causal LM student from a teacher."""
