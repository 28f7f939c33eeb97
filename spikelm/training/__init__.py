"""Training recipes: pretraining, task fine-tuning and distillation of a (spiking) student from a teacher."""
