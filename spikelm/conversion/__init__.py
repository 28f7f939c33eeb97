"""Conversion of pretrained Hugging Face models into spiking ones: exact weight transforms, calibration."""
