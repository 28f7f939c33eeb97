"""Constants of the neuron's arithmetic, shared by the PyTorch paths (``neuron.py``) and the Triton kernels."""

ALPHA_FLOOR = 1e-5  # alpha is floored here where it divides or scales; the stored value is untouched
LEAK = 0.25  # membrane decay of the released code

# int8 codes saved for backward: the spike q in {-1, 0, 1}, plus OUTSIDE when the straight-through
# window |u / alpha| <= 1 is left (no gradient passes there).
OUTSIDE = 4
