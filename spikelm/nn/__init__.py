"""The spiking building blocks: the neuron (and its kernels), spiking layers, firing-rate statistics."""
