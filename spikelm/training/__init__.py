"""Training recipes: pretraining (with its presets and firing-rate monitor) and task fine-tuning."""
