"""The GIF recipe's (the default before the signed one) per-token code and its linear, written from the recipe's
definition in float64 (not through the model's modules), against the readable path, on SmolLM2-135M's shapes.

The recipe (docs/METHOD.md, docs/CONVERSION.md): n = 4 bits, a = 1 extra bit; the top 10 % of channels by saliency
are salient (codes 0..30 on the fine grid), the others 0..15; inside each set, in channel order, runs of 64 channels
share a per-token range ``[0.9 min, 0.9 max]``: ``scale = (0.9 max - 0.9 min) / top`` (floored at 1e-5),
``zero = round(-0.9 min / scale)``, ``code = clamp(round(x / scale) + zero, 0, top)``, half to even. A linear layer
reading the codes computes ``y = sum_runs scale_r * sum_{c in r} W_c (code_c - zero_r) + b``.

The readable path computes the quantiser in float32 (the model's dtype), the reference in float64, so a value within
float32 rounding of a code boundary may take the neighbouring code: such flips are counted and must be both rare and
at a boundary (in the reference's own arithmetic).
"""

from __future__ import annotations

import math

import torch

from spikelm.nn.exact import exact_linear
from spikelm.nn.gif import GIFNeuron, top_fraction_mask

BITS, EXTRA, CLIP, GROUP = 4, 1, 0.9, 64
FINE_TOP, COARSE_TOP = (1 << EXTRA) * ((1 << BITS) - 1), (1 << BITS) - 1


def reference_codes(x: torch.Tensor, salient: torch.Tensor):
    """Float64, loops over tokens and runs: ``(code, x_hat, near_boundary)`` for x (N, C) and a bool mask (C,)."""
    x = x.double()
    channels = x.shape[1]
    runs = []
    for members, top in ((salient.nonzero().flatten(), FINE_TOP), ((~salient).nonzero().flatten(), COARSE_TOP)):
        runs += [(members[i : i + GROUP], top) for i in range(0, len(members), GROUP)]
    assert sorted(int(c) for idx, _ in runs for c in idx) == list(range(channels))
    code = torch.empty_like(x)
    x_hat = torch.empty_like(x)
    near = torch.zeros_like(x, dtype=torch.bool)
    for t in range(x.shape[0]):
        for idx, top in runs:
            v = x[t, idx]
            low, high = float(v.min()) * CLIP, float(v.max()) * CLIP
            scale = max((high - low) / top, 1e-5)
            zero = round(-low / scale)  # Python's round: half to even
            ratio = v / scale
            q = torch.round(ratio) + zero
            code[t, idx] = q.clamp(0, top)
            x_hat[t, idx] = (code[t, idx] - zero) * scale
            frac = (ratio - torch.floor(ratio) - 0.5).abs()
            near[t, idx] = frac < 1e-4
            if abs((-low / scale) - math.floor(-low / scale) - 0.5) < 1e-4:  # the zero point itself at a tie
                near[t, idx] = True
    return code, x_hat, near


def test_default_code_and_linear_equal_a_float64_reference_on_real_shapes():
    gen = torch.Generator().manual_seed(0)
    for channels, outputs in ((576, 576), (576, 1536), (1536, 576)):
        x = torch.randn(24, channels, generator=gen) * torch.linspace(0.2, 3.0, channels)  # uneven channel scales
        x[3, 5] = 40.0  # an outlier token
        weight = torch.randn(outputs, channels, generator=gen) / channels**0.5
        bias = torch.randn(outputs, generator=gen)
        neuron = GIFNeuron(channels, BITS, EXTRA, 0.1, clip_ratio=CLIP, group_size=GROUP)
        salient = top_fraction_mask(torch.rand(channels, generator=gen), 0.1)
        neuron.set_salient(salient)
        assert int(salient.sum()) == channels - int(0.9 * channels)
        code, scale, zero = neuron.quantize(x)
        ref_code, ref_hat, near = reference_codes(x, salient)
        differ = code.double() != ref_code
        assert int(differ.sum()) <= 2, int(differ.sum())  # float32 vs float64 arithmetic: at most a stray boundary
        assert bool(near[differ].all())  # and only where the reference itself sits at a rounding boundary
        x_hat = neuron(x)  # the readable path's dequantised input
        same = ~differ.any(1)  # tokens where every code agrees
        torch.testing.assert_close(x_hat[same].double(), ref_hat[same], rtol=1e-6, atol=1e-6)
        # the linear on the codes, from the definition, against the readable path's exact linear
        y = exact_linear(x_hat, weight, bias)
        ref_y = ref_hat @ weight.double().t() + bias.double()
        torch.testing.assert_close(y[same].double(), ref_y[same], rtol=1e-5, atol=1e-5)


def test_kv_code_per_head_equals_a_float64_reference():
    """K/V neurons: channel shape (3, 1, 64), one range group per head and token (head_dim 64 = the run length)."""
    gen = torch.Generator().manual_seed(1)
    heads, length, head_dim = 3, 10, 64
    neuron = GIFNeuron((heads, 1, head_dim), BITS, EXTRA, 0.1, clip_ratio=CLIP, group_size=GROUP)
    salient = torch.zeros(heads, 1, head_dim, dtype=torch.bool)
    for h in range(heads):
        salient[h, 0, torch.randperm(head_dim, generator=gen)[:7]] = True
    neuron.set_salient(salient)
    x = torch.randn(2, heads, length, head_dim, generator=gen) * 2
    code, _, _ = neuron.quantize(x)
    for h in range(heads):
        rows = x[:, h].reshape(-1, head_dim)
        ref_code, ref_hat, near = reference_codes(rows, salient[h, 0])
        got = code[:, h].reshape(-1, head_dim).double()
        differ = got != ref_code
        assert int(differ.sum()) <= 1 and bool(near[differ].all())
        keep = ~differ.any(1)
        torch.testing.assert_close(
            neuron(x)[:, h].reshape(-1, head_dim)[keep].double(), ref_hat[keep], rtol=1e-6, atol=1e-6
        )
