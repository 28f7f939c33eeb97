"""Source architectures as descriptions (docs/CONVERSION.md): where spikify places neurons in each family."""
