"""The signed multi-level neuron: hand-computed codes and spikes for every option, per-step sums equal the one-shot
code, linear layers on the spikes equal linear layers on the dequantised input, statistics, learnable scales."""

import pytest
import torch

from spikelm.nn.neurons.signed import (
    SCALE_FLOOR,
    SignedNeuron,
    check_signed_options,
    dequantize_signed,
    level_cap,
    reference_signed_linear,
    reference_signed_spikes,
    signed_linear,
    signed_spikes,
    top_code,
)

# values on an exact binary grid so that x / scale is exact and the rounding can be done by hand
X = torch.tensor([[1.5, -3.0, 0.25, 0.75]])


def codes(neuron, x=X):
    return neuron.quantize(x)[0].tolist()


def test_top_code_and_level_cap_by_hand():
    assert [top_code(b) for b in (2, 3, 4, 5, 8)] == [1, 3, 7, 15, 127]
    assert [level_cap(4, t) for t in (1, 2, 3, 7, 8)] == [7, 4, 3, 1, 1]


def test_codes_by_hand_one_range_per_token():
    neuron = SignedNeuron(4, bits=3)  # Q = 3, scale = max|x| / 3 = 1
    code, scale = neuron.quantize(X)
    assert scale.tolist() == [[1.0]]
    assert code.tolist() == [[2, -3, 0, 1]]  # round(1.5) = 2 (half to even), round(0.25) = 0, round(0.75) = 1
    assert neuron(X).tolist() == [[2.0, -3.0, 0.0, 1.0]]  # code * scale


def test_codes_by_hand_clip_ratio():
    neuron = SignedNeuron(4, bits=3, clip_ratio=0.5)  # scale 0.5: x / scale = 3, -6, 0.5, 1.5
    assert codes(neuron) == [[3, -3, 0, 2]]  # -6 clamps to -Q; 0.5 rounds to 0 (even), 1.5 to 2


def test_codes_by_hand_dead_zone():
    assert codes(SignedNeuron(4, bits=3, dead_zone=0.8)) == [[2, -3, 0, 0]]  # |0.75| < 0.8 steps fires nothing
    assert codes(SignedNeuron(4, bits=3, dead_zone=0.5)) == [[2, -3, 0, 1]]  # <= 0.5: plain rounding


def test_codes_by_hand_group_size():
    neuron = SignedNeuron(4, bits=3, group_size=2)  # groups {0, 1}: scale 1; {2, 3}: scale 0.75 / 3 = 0.25
    code, scale = neuron.quantize(X)
    assert scale.tolist() == [[1.0, 0.25]]
    assert code.tolist() == [[2, -3, 1, 3]]
    three = SignedNeuron(5, bits=3, group_size=2)  # groups of 2, 2 and 1 channels
    assert three.groups()[0].tolist() == [0, 0, 1, 1, 2]
    code, scale = three.quantize(torch.tensor([[1.5, -3.0, 0.25, 0.75, -0.75]]))
    assert scale.tolist() == [[1.0, 0.25, 0.25]] and code.tolist() == [[2, -3, 1, 3, -3]]


def test_codes_and_spikes_by_hand_saliency():
    neuron = SignedNeuron(4, bits=3, salient_bits=4, saliency_fraction=0.25)
    neuron.set_salient(torch.tensor([False, True, False, False]))
    code, scale = neuron.quantize(X)
    # salient {1}: Q = 7, scale 3 / 7; the others {0, 2, 3}: Q = 3, scale 1.5 / 3 = 0.5 -> 3, 0.5, 1.5
    assert torch.allclose(scale, torch.tensor([[3 / 7, 0.5]]))
    assert code.tolist() == [[3, -7, 0, 2]]
    assert neuron.num_steps == 3  # L = 3: the salient code 7 needs 3 spikes (3 + 3 + 1), the others one
    spikes = neuron.spike(X).spikes
    assert spikes[:, 0, 1].tolist() == [-3, -3, -1] and spikes[:, 0, 0].tolist() == [3, 0, 0]
    assert neuron.step_slots().tolist() == [4, 1, 1]  # only the salient channel can fire after step 0
    assert neuron.range_group_counts().tolist() == [2]


def test_spikes_by_hand_soft_reset():
    code = torch.tensor([[2, -3, 0, 1]])
    spikes = reference_signed_spikes(code, level=2, num_steps=2)  # bits 3, T = 2: L = ceil(3 / 2) = 2
    assert spikes.tolist() == [[[2, -2, 0, 1]], [[0, -1, 0, 0]]]
    assert torch.equal(signed_spikes(code, 2, 2), spikes)
    neuron = SignedNeuron(4, bits=3, num_steps=2)
    assert neuron.level == 2 and neuron.num_steps == 2
    assert torch.equal(neuron.spike(X).spikes, spikes.to(neuron.spike(X).spikes.dtype))


def test_channel_shape_of_keys_ranges_per_head_and_group():
    neuron = SignedNeuron((2, 1, 4), bits=3, group_size=2)
    x = torch.stack([X[0], 2 * X[0]]).view(1, 2, 1, 4).expand(1, 2, 3, 4)  # (B, H, L, d)
    code, scale = neuron.quantize(x)
    assert scale.shape == (1, 2, 3, 2)
    assert code[0, 0, 0].tolist() == [2, -3, 1, 3] and code[0, 1, 2].tolist() == [2, -3, 1, 3]  # scale-free
    assert scale[0, 1, 0].tolist() == [2.0, 0.5]


def test_zero_and_constant_inputs():
    neuron = SignedNeuron(4, bits=4, group_size=2)
    code, scale = neuron.quantize(torch.tensor([[0.0, 0.0, 2.0, 2.0]]))
    assert code.tolist() == [[0, 0, 7, 7]] and scale[0, 0].item() == pytest.approx(SCALE_FLOOR)


OPTIONS = [
    dict(bits=4),
    dict(bits=2),
    dict(bits=5, num_steps=4),
    dict(bits=4, group_size=16, clip_ratio=0.8),
    dict(bits=4, group_size=8, dead_zone=0.9),
    dict(bits=3, num_steps=3, salient_bits=6, saliency_fraction=0.1, group_size=16),
    dict(bits=4, num_steps=2, salient_bits=8, saliency_fraction=0.05),
]


def heavy_tailed(*shape):
    x = torch.randn(*shape)
    x[..., 3] *= 20  # an outlier channel, as in LLM activations
    return x


def made(options, channels=48, backend="fused"):
    neuron = SignedNeuron(channels, backend=backend, **options)
    neuron.calibrate(heavy_tailed(64, channels), torch.randn(10, channels))
    return neuron


@pytest.mark.parametrize("options", OPTIONS)
def test_per_step_spikes_sum_to_the_one_shot_code_exactly(options):
    neuron = made(options)
    x = heavy_tailed(5, 7, 48)
    code, scale = neuron.quantize(x)
    spikes = neuron.spike(x).spikes
    assert spikes.shape[0] == neuron.num_steps
    assert int(spikes.abs().max()) <= neuron.level
    assert torch.equal(spikes.to(torch.int32).sum(0), code)
    assert torch.equal(reference_signed_spikes(code, neuron.level, neuron.num_steps), spikes)
    reference = SignedNeuron(48, backend="reference", **options)
    reference.load_state_dict(neuron.state_dict())
    assert torch.equal(reference(x), neuron(x))  # the readable per-step path, the same values
    group, top = neuron.groups()
    assert bool((code.abs() <= top[group]).all())
    assert torch.equal(neuron(x), dequantize_signed(code, scale, group).to(x.dtype))


@pytest.mark.parametrize("options", OPTIONS)
def test_a_linear_on_the_spikes_equals_a_linear_on_the_dequantised_input(options):
    neuron = made(options)
    x = heavy_tailed(6, 48)
    weight, bias = torch.randn(20, 48) / 8, torch.randn(20)  # outputs of a few units: float32 noise ~1e-6
    expected = torch.nn.functional.linear(neuron(x).double(), weight.double(), bias.double()).float()
    out = neuron.spike(x)
    torch.testing.assert_close(out.linear(weight, bias), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.linear(weight, bias, per_step=True), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        signed_linear(out.spikes, out.scale, out.group, weight),
        reference_signed_linear(*out, weight),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("options", OPTIONS)
def test_statistics_and_energy_levels_count_the_spikes(options):
    neuron = made(options)
    x = heavy_tailed(3, 4, 48)
    code, _ = neuron.quantize(x)
    levels = neuron.step_levels(x)
    assert torch.equal(levels.sum(0), code.abs().long())  # |code| accumulates per fan-out, whatever the steps
    nonzero = int((neuron.spike(x).spikes != 0).sum())
    neuron.record_stats = True
    neuron(x)
    stats = neuron.stats
    assert int(stats.levels.sum()) == int(code.abs().sum())
    assert int(stats.events.sum()) == nonzero
    assert int(stats.positive[0]) == int((code > 0).sum()) and int(stats.negative[0]) == int((code < 0).sum())
    assert stats.tokens == 12 and stats.slots.tolist() == (neuron.step_slots() * 12).tolist()
    # every channel fires while its top code is not drained (ceil(Q / L) steps), then only the salient ones
    salient = int(neuron.salient.sum())
    others_steps = -(-top_code(options["bits"]) // neuron.level)
    expected_slots = [48] * others_steps + [salient] * (neuron.num_steps - others_steps)
    assert neuron.step_slots().tolist() == expected_slots


def test_learnable_scale_factors_keep_the_value_and_get_the_gradient_by_hand():
    neuron = SignedNeuron(4, bits=3, learn_scale=True)
    x = X.clone().requires_grad_()
    out = neuron(x)
    assert out.tolist() == [[2.0, -3.0, 0.0, 1.0]]
    out.sum().backward()
    assert x.grad.tolist() == [[1.0] * 4]  # straight through
    assert neuron.scale_factor.grad.tolist() == [0.0, 0.0]  # d/df of sum(code * scale * f) = sum(code * scale) = 0
    with torch.no_grad():
        neuron.scale_factor.fill_(2.0)  # every scale doubles: x / 2 -> 0.75, -1.5, 0.125, 0.375
    assert codes(neuron) == [[1, -2, 0, 0]]
    y = torch.tensor([[1.0, 3.0, 0.0, 0.0]])  # scale 1 (x2 = 2): codes 0 (0.5 -> even), 2 (1.5 -> 2)
    out = neuron(y)
    out.sum().backward()
    assert neuron.scale_factor.grad.tolist() == [2.0 * 1.0 / 2.0 * 2.0, 0.0]  # code 2 * scale 2 / factor 2 = 2
    assert "scale_factor" in neuron.state_dict() and "scale_factor" not in SignedNeuron(4).state_dict()


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(bits=1), "bits"),
        (dict(bits=4, num_steps=0), "num_steps"),
        (dict(bits=4, group_size=-1), "group_size"),
        (dict(bits=4, clip_ratio=0), "clip_ratio"),
        (dict(bits=4, dead_zone=1.5), "dead_zone"),
        (dict(bits=4, salient_bits=3), "salient_bits"),
        (dict(bits=4, saliency_fraction=2), "saliency_fraction"),
    ],
)
def test_bad_options_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        check_signed_options(**kwargs)
    with pytest.raises(ValueError, match=word):
        SignedNeuron(4, **kwargs)


def test_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match="channels"):
        SignedNeuron(4)(torch.randn(2, 5))
