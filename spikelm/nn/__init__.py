"""Neurons and spiking layers (the neuron family: SpikeLM's elastic bi-spiking neuron, SpikeLLM's GIF neuron)."""
