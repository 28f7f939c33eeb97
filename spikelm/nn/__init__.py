"""The spiking building blocks: the neurons (SpikeLM's elastic bi-spiking neuron and its kernels, SpikeLLM's GIF
neuron), spiking layers, firing-rate statistics."""
