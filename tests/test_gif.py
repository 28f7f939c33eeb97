"""SpikeLLM's GIF neuron: the spiking path equals its one-shot quantiser, saliency, linear outputs, statistics."""

import pytest
import torch

from spikelm.nn.gif import (
    SCALE_FLOOR,
    GIFNeuron,
    dequantize,
    gif_linear,
    gif_spikes,
    max_code,
    pack_grid,
    quantize_per_group,
    quantize_per_token,
    reference_gif_linear,
    reference_gif_spikes,
    saliency_scores,
    top_fraction_mask,
    unpack_grid,
)

SETTINGS = [(4, 1), (4, 2), (2, 3), (8, 0)]  # (n, a): SpikeLLM's two settings and edge cases
RANGES = ["group", "token"]


def heavy_tailed(*shape):
    x = torch.randn(*shape)
    x[..., 3] *= 20  # an outlier channel, as in LLM activations
    return x


def calibrated_neuron(channels, bits, extra_bits, fraction=0.25, backend="fused", group_range="group"):
    neuron = GIFNeuron(
        channels, bits=bits, extra_bits=extra_bits, saliency_fraction=fraction, backend=backend, group_range=group_range
    )
    neuron.calibrate(heavy_tailed(64, channels))
    return neuron


def textbook_per_group(x, salient, bits, extra_bits, clip=1.0):
    """Plain per-group asymmetric min/max quantisation, token by token and group by group: (codes, scales, zeros)."""
    level = 2**bits - 1
    top = 2**extra_bits * level
    rows = x.reshape(-1, x.shape[-1])
    codes = torch.zeros(rows.shape)
    scales, zeros = torch.zeros(rows.shape[0], 2), torch.zeros(rows.shape[0], 2)
    for i, row in enumerate(rows):
        for g, (members, steps) in enumerate(((salient, top), (~salient, level))):
            values = row[members]
            if values.numel() == 0:
                scales[i, g], zeros[i, g] = SCALE_FLOOR, 0.0
                continue
            lo, hi = values.min() * clip, values.max() * clip
            step = torch.clamp((hi - lo) / steps, min=SCALE_FLOOR)
            zero = torch.round(-lo / step)
            codes[i, members] = torch.clamp(torch.round(values / step) + zero, 0, steps)
            scales[i, g], zeros[i, g] = step, zero
    lead = x.shape[:-1]
    return codes.view(x.shape), scales.view(*lead, 2), zeros.view(*lead, 2)


def test_max_code_is_what_the_spikes_can_sum_to():
    assert max_code(4, 1) == 30  # SpikeLLM: 31, which its spikes cannot reach
    assert max_code(4, 2) == 60
    assert max_code(4, 0) == 15


@pytest.mark.parametrize("group_range", RANGES)
@pytest.mark.parametrize("bits,extra_bits", SETTINGS)
def test_spike_sum_equals_one_shot_code(bits, extra_bits, group_range):
    neuron = calibrated_neuron(16, bits, extra_bits, group_range=group_range)
    x = heavy_tailed(5, 7, 16)
    spikes, scale, zero, gain, _ = neuron.spike(x)
    code, scale1, zero1 = quantize_per_token(
        x, bits, extra_bits, neuron.salient if extra_bits else None, group_range=group_range
    )
    assert spikes.dtype == (torch.uint8 if bits <= 8 else torch.int16)
    assert spikes.shape == (neuron.num_steps, 5, 7, 16)
    assert int(spikes.max()) <= (1 << bits) - 1
    assert torch.equal(spikes.to(torch.int32).sum(0), code)  # the spikes sum to the one-shot code
    assert torch.equal(scale, scale1) and torch.equal(zero, zero1)
    level, top = (1 << bits) - 1, max_code(bits, extra_bits)
    group_top = torch.where(neuron.salient, top, level) if extra_bits else torch.tensor(level)
    assert int(code.min()) == 0 and int(code.max()) == (top if extra_bits else level)  # both ends are hit
    assert bool((code <= group_top).all())
    # every token's minimum gets code 0 exactly; its maximum the top of its group (up to a tie in the zero point)
    assert torch.equal(code.gather(-1, x.argmin(-1, keepdim=True)), torch.zeros_like(code[..., :1]))
    at_max = code.gather(-1, x.argmax(-1, keepdim=True))
    assert (at_max >= torch.broadcast_to(group_top, code.shape).gather(-1, x.argmax(-1, keepdim=True)) - 1).all()
    if extra_bits and group_range == "group":
        # each group over its own channels: the textbook per-group quantiser, written out independently
        codes, scales, zeros = textbook_per_group(x, neuron.salient, bits, extra_bits)
        assert torch.equal(code.float(), codes) and torch.equal(scale, scales) and torch.equal(zero, zeros)
        assert gain.tolist() == torch.where(neuron.salient, 1, 2**extra_bits).tolist()
        return
    # the textbook one-shot quantisers over the whole token, written out independently: (n+a) bits for salient
    # channels, n for the rest
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step_c = (hi - lo) / level
    coarse = (torch.round(x / step_c) + torch.round(-lo / step_c)).clamp(0, level)
    if extra_bits:
        step_f = (hi - lo) / top
        fine = (torch.round(x / step_f) + torch.round(-lo / step_f)).clamp(0, top)
        assert torch.equal(code.float(), torch.where(neuron.salient, fine, coarse))
        assert zero.shape == (5, 7, 2) and gain.tolist() == torch.where(neuron.salient, 1, 2**extra_bits).tolist()
    else:
        assert torch.equal(code.float(), coarse) and zero.shape == (5, 7, 1)


@pytest.mark.parametrize("bits,extra_bits", SETTINGS)
def test_reference_spike_loop_equals_closed_form(bits, extra_bits):
    membrane = torch.arange(0, max_code(bits, extra_bits) + 1).view(1, -1)
    steps = 1 << extra_bits
    ref = reference_gif_spikes(membrane, bits, steps)
    assert torch.equal(ref, gif_spikes(membrane, bits, steps))
    assert torch.equal(ref.to(torch.int64).sum(0), membrane)  # the top of the range drains fully: no off-by-one
    assert ref[:, 0, -1].tolist() == [(1 << bits) - 1] * steps


@pytest.mark.parametrize("group_range", RANGES)
def test_salient_channels_get_the_fine_grid_the_others_the_coarse(group_range):
    neuron = calibrated_neuron(16, 4, 1, group_range=group_range)
    assert neuron.salient.sum() == 4 and bool(neuron.salient[3])  # the outlier channel is salient
    x = heavy_tailed(200, 16)
    code, _, _ = neuron.quantize(x)
    assert (code[:, ~neuron.salient] <= 15).all() and (code[:, neuron.salient] > 15).any()
    spikes = neuron.spike(x).spikes
    assert (spikes[1:, :, ~neuron.salient] == 0).all()  # one step for the coarse channels
    assert (spikes[1:, :, neuron.salient] > 0).any()
    # the other channels are exactly the saliency-free n-bit quantiser (own zero point: real zero stays exact) of
    # the whole token ("token") or of the other channels alone ("group")
    if group_range == "token":
        plain = GIFNeuron(16, bits=4, extra_bits=1)
        assert torch.equal(neuron(x)[:, ~neuron.salient], plain(x)[:, ~neuron.salient])
    else:
        plain = GIFNeuron(12, bits=4, extra_bits=1)
        assert torch.equal(neuron(x)[:, ~neuron.salient], plain(x[:, ~neuron.salient]))
    assert (neuron(torch.zeros(3, 16)) == 0).all()
    x[:5, 0] = 0  # a coarse channel
    x[5:10, 3] = 0  # the salient one
    out = neuron(x)
    assert (out[:5, 0] == 0).all() and (out[5:10, 3] == 0).all()


def test_without_saliency_is_the_plain_n_bit_quantiser_in_one_step():
    x = heavy_tailed(9, 16)
    for neuron in (GIFNeuron(16, bits=4, extra_bits=1), calibrated_neuron(16, 4, 1, fraction=0.0)):
        assert not neuron.has_saliency() and neuron.num_steps == 1
        spikes, scale, zero, gain, _ = neuron.spike(x)
        assert spikes.shape[0] == 1
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        assert torch.allclose(scale, (hi - lo) / 15)
        assert torch.equal(zero, torch.round(-lo / scale)) and bool((gain == 1).all())
        expected = (torch.round(x / scale) + zero).clamp(0, 15)
        assert torch.equal(spikes[0].to(torch.float32), expected)


def test_salient_mask_changes_the_output_and_is_saved():
    x = heavy_tailed(32, 16)
    plain = GIFNeuron(16, bits=4, extra_bits=1)
    neuron = calibrated_neuron(16, 4, 1)
    err_plain = (plain(x) - x).pow(2).mean()
    err_salient = (neuron(x) - x).pow(2).mean()
    assert err_salient < err_plain
    assert "salient" in neuron.state_dict()
    fresh = GIFNeuron(16, bits=4, extra_bits=1)
    fresh.load_state_dict(neuron.state_dict())
    assert fresh.has_saliency() and torch.equal(fresh(x), neuron(x))


@pytest.mark.parametrize("group_range", RANGES)
@pytest.mark.parametrize("bits,extra_bits", SETTINGS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_on_spikes_equals_linear_on_the_reconstruction(bits, extra_bits, with_bias, group_range):
    torch.manual_seed(1)
    neuron = calibrated_neuron(16, bits, extra_bits, group_range=group_range)
    linear = torch.nn.Linear(16, 10, bias=with_bias)
    x = heavy_tailed(4, 6, 16)
    spikes, scale, zero, gain, _ = neuron.spike(x)
    hooked = linear(neuron(x))
    fast = gif_linear(spikes, scale, zero, linear.weight, linear.bias, gain)
    per_step = reference_gif_linear(spikes, scale, zero, linear.weight, linear.bias, gain)
    assert fast.shape == hooked.shape == per_step.shape == (4, 6, 10)
    assert scale.shape[-1] == (2 if extra_bits and group_range == "group" else 1)
    torch.testing.assert_close(fast, hooked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_step, fast, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(neuron.spike(x).linear(linear.weight, linear.bias, per_step=True), per_step)


@pytest.mark.parametrize("group_range", RANGES)
def test_reference_and_fused_backends_agree_exactly(group_range):
    ref = calibrated_neuron(24, 4, 2, fraction=0.05, backend="reference", group_range=group_range)
    fused = GIFNeuron(24, bits=4, extra_bits=2, saliency_fraction=0.05, group_range=group_range)
    fused.load_state_dict(ref.state_dict())
    x = heavy_tailed(3, 11, 24)
    assert torch.equal(ref(x), fused(x))
    assert torch.equal(ref.spike(x).spikes, fused.spike(x).spikes)


@pytest.mark.parametrize("group_range", RANGES)
def test_dequantisation_error_is_within_half_a_step(group_range):
    neuron = calibrated_neuron(16, 4, 1, group_range=group_range)
    x = heavy_tailed(50, 16)
    _, scale, _ = neuron.quantize(x)
    err = (neuron(x) - x).abs()
    step_f, step_c = (scale[:, :1], scale[:, 1:]) if group_range == "group" else (scale, 2 * scale)
    assert (err[:, neuron.salient] <= step_f / 2 + 1e-6).all()
    assert (err[:, ~neuron.salient] <= step_c / 2 + 1e-6).all()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_neuron_on_a_device_matches_cpu(device):
    neuron = calibrated_neuron(16, 4, 2, fraction=0.1)
    neuron.record_stats = True
    x = heavy_tailed(6, 16)
    moved = GIFNeuron(16, bits=4, extra_bits=2, saliency_fraction=0.1).to(device)
    moved.load_state_dict(neuron.state_dict())
    moved.record_stats = True
    torch.testing.assert_close(moved(x.to(device)).cpu(), neuron(x), rtol=0, atol=1e-6)
    linear = torch.nn.Linear(16, 5)
    out = moved.spike(x.to(device)).linear(linear.weight.to(device), linear.bias.to(device), per_step=True)
    torch.testing.assert_close(out.cpu(), neuron.spike(x).linear(linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    assert moved.stats.as_dict()["levels"] == neuron.stats.as_dict()["levels"]


def test_half_precision_input_keeps_its_dtype():
    neuron = calibrated_neuron(16, 4, 1)
    x = heavy_tailed(5, 16)
    out = neuron(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_straight_through_gradient():
    neuron = calibrated_neuron(16, 4, 1)
    x = heavy_tailed(5, 16).requires_grad_()
    out = neuron(x)
    with torch.no_grad():
        assert torch.equal(out, neuron(x))  # the STE does not change the value
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.equal(x.grad, weights)


def test_saliency_score_matches_a_hand_computation():
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    w_q, w_k = torch.randn(4, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    w = torch.cat([w_q, w_k])
    tokens = x.reshape(-1, 6)
    expected = torch.zeros(6, dtype=torch.float64)
    for row in tokens:
        expected += row * (row @ w.t() @ w)
    expected /= tokens.shape[0]
    torch.testing.assert_close(saliency_scores(x, [w_q, w_k]), expected)
    # batches of a list count every token once, as one tensor would
    torch.testing.assert_close(saliency_scores([x[:1], x[1:]], w), expected)
    # nn.Linear modules stand for their weights
    linears = [torch.nn.Linear(6, 4).double(), torch.nn.Linear(6, 2).double()]
    with torch.no_grad():
        linears[0].weight.copy_(w_q)
        linears[1].weight.copy_(w_k)
    torch.testing.assert_close(saliency_scores(x, linears), expected)
    torch.testing.assert_close(saliency_scores(x, linears[0]), saliency_scores(x, w_q))
    # without weights: mean x_c^2
    torch.testing.assert_close(saliency_scores(x), tokens.pow(2).mean(0))


def test_per_head_channel_saliency_for_keys():
    keys = torch.randn(2, 3, 7, 4)  # (B, H, L, d)
    keys[:, 1, :, 2] *= 10
    neuron = GIFNeuron((3, 1, 4), bits=4, extra_bits=1, saliency_fraction=1 / 12)
    scores = neuron.calibrate(keys)
    assert scores.shape == (3, 1, 4)
    torch.testing.assert_close(scores, keys.double().pow(2).mean(dim=(0, 2), keepdim=True)[0])
    assert neuron.salient.sum() == 1 and bool(neuron.salient[1, 0, 2])
    token = GIFNeuron((3, 1, 4), bits=4, extra_bits=1, saliency_fraction=1 / 12, group_range="token")
    token.load_state_dict(neuron.state_dict())
    spikes = token.spike(keys).spikes
    assert spikes.shape == (2, 2, 3, 7, 4)
    assert (spikes[1, :, 1, :, 2] > 0).any() and (spikes[1][:, :, :, [0, 1, 3]] == 0).all()
    # per-group ranges: one salient channel per (token, head) is a group of one, carried exactly by its zero point
    spikes, scale, _, _, _ = neuron.spike(keys)
    assert spikes.shape == (2, 2, 3, 7, 4) and scale.shape == (2, 3, 7, 2)
    assert (spikes[:, :, 1, :, 2] == 0).all() and (scale[:, 1, :, 0] == SCALE_FLOOR).all()
    assert (neuron(keys)[:, 1, :, 2] - keys[:, 1, :, 2]).abs().max() <= SCALE_FLOOR


def test_top_fraction_mask():
    mask = top_fraction_mask(torch.tensor([0.5, -3.0, 9.0, 1.0, 2.0, 0.0, 0.1, 7.0, -1.0, 4.0]), 0.2)
    assert mask.nonzero().flatten().tolist() == [2, 7]


def test_firing_statistics_count_events_and_levels():
    neuron = calibrated_neuron(16, 4, 1)
    neuron.record_stats = True
    x = heavy_tailed(8, 16)
    spikes = neuron.spike(x).spikes
    neuron(x)  # the fused path records the same counts
    stats = neuron.stats.as_dict()
    assert stats["spikes"] == [2 * int((spikes[t] > 0).sum()) for t in range(2)]
    assert stats["levels"] == [2 * int(spikes[t].to(torch.int64).sum()) for t in range(2)]
    assert stats["slots"] == [2 * 8 * 16, 2 * 8 * 4]
    assert stats["tokens"] == 16 and stats["groups"] == 2 and stats["scales"] == 2
    token = calibrated_neuron(16, 4, 1, group_range="token")
    token.record_stats = True
    token(x)
    assert token.stats.as_dict()["scales"] == 1 and token.stats.as_dict()["groups"] == 2
    assert 0 < stats["firing_rate"][1] <= 1


def test_bad_options_raise():
    with pytest.raises(ValueError, match="bits"):
        GIFNeuron(8, bits=0)
    with pytest.raises(ValueError, match="extra_bits"):
        GIFNeuron(8, extra_bits=-1)
    with pytest.raises(ValueError, match="saliency_fraction"):
        GIFNeuron(8, saliency_fraction=1.5)
    with pytest.raises(ValueError, match="backend"):
        GIFNeuron(8, backend="triton")
    with pytest.raises(ValueError, match="group_range"):
        GIFNeuron(8, group_range="channel")
    with pytest.raises(ValueError, match="group_range"):
        quantize_per_token(torch.randn(2, 8), 4, 1, group_range="tokens")
    with pytest.raises(ValueError, match="extra_bits"):
        quantize_per_token(torch.randn(2, 8), 4, 0, torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="gain"):
        dequantize(torch.zeros(2, 8), torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shape"):
        GIFNeuron(8).set_salient(torch.zeros(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="channels"):
        GIFNeuron(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="channels"):
        GIFNeuron((3, 1, 4))(torch.randn(2, 2, 5, 4))
    with pytest.raises(TypeError, match="floating"):
        GIFNeuron(8)(torch.ones(2, 8, dtype=torch.long))


def test_group_range_is_in_the_repr_and_defaults_to_group():
    assert GIFNeuron(8).group_range == "group"
    assert "group_range='token'" in repr(GIFNeuron(8, group_range="token"))


def test_without_saliency_group_and_token_ranges_are_the_same_bit_for_bit():
    x = heavy_tailed(6, 9, 16)
    for bits, extra_bits in SETTINGS:
        by_group = quantize_per_token(x, bits, extra_bits, None, group_range="group")
        by_token = quantize_per_token(x, bits, extra_bits, None, group_range="token")
        assert all(torch.equal(a, b) for a, b in zip(by_group, by_token, strict=True))
        assert by_group[1].shape == by_group[2].shape == (6, 9, 1)
    group = calibrated_neuron(16, 4, 1, fraction=0.0, group_range="group")
    token = calibrated_neuron(16, 4, 1, fraction=0.0, group_range="token")
    assert torch.equal(group(x), token(x))
    assert all(torch.equal(a, b) for a, b in zip(group.spike(x)[:4], token.spike(x)[:4], strict=True))


def test_group_ranges_cut_the_error_when_outlier_channels_are_salient():
    torch.manual_seed(3)
    x = torch.randn(256, 64)
    x[:, :6] *= 50  # a few outlier channels, made salient
    salient = torch.zeros(64, dtype=torch.bool)
    salient[:6] = True
    errors = {}
    for group_range in RANGES:
        neuron = GIFNeuron(64, bits=4, extra_bits=1, group_range=group_range)
        neuron.set_salient(salient)
        errors[group_range] = (neuron(x) - x).pow(2)
    # the coarse channels no longer share a grid stretched by the outliers: far finer steps for ~90 % of channels
    assert errors["group"][:, ~salient].mean() < 0.05 * errors["token"][:, ~salient].mean()
    assert errors["group"].mean() < errors["token"].mean()
    linear = torch.nn.Linear(64, 8)
    outs = {}
    for group_range in RANGES:
        neuron = GIFNeuron(64, bits=4, extra_bits=1, group_range=group_range)
        neuron.set_salient(salient)
        outs[group_range] = neuron.spike(x).linear(linear.weight, linear.bias)
    exact = linear(x)
    assert (outs["group"] - exact).pow(2).mean() < (outs["token"] - exact).pow(2).mean()


def test_an_empty_channel_group_stays_well_defined():
    x = heavy_tailed(7, 16)
    x[0] = 0.5  # a constant token as well
    # every channel salient: the coarse group is empty in every token
    neuron = GIFNeuron(16, bits=4, extra_bits=1, saliency_fraction=1.0)
    neuron.calibrate(heavy_tailed(32, 16))
    assert bool(neuron.salient.all())
    code, scale, zero = neuron.quantize(x)
    assert scale.shape == zero.shape == (7, 2)
    assert (scale[:, 1] == SCALE_FLOOR).all() and (zero[:, 1] == 0).all()
    # the fine group is then the whole token: the same codes and fine grid as the whole-token range
    code_t, scale_t, zero_t = quantize_per_token(x, 4, 1, neuron.salient, group_range="token")
    assert torch.equal(code, code_t) and torch.equal(scale[:, :1], scale_t) and torch.equal(zero[:, :1], zero_t[:, :1])
    out = neuron(x)
    assert torch.isfinite(out).all() and (out - x).abs().max() <= scale[:, :1].max() / 2 + 1e-6
    linear = torch.nn.Linear(16, 5)
    spikes = neuron.spike(x)
    torch.testing.assert_close(spikes.linear(linear.weight, linear.bias), linear(out), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spikes.linear(linear.weight, linear.bias, per_step=True), linear(out))
    # no salient channel given to the functional API in "group" mode: the fine group is empty, the coarse group is
    # the plain n-bit quantiser of the whole token
    none = torch.zeros(16, dtype=torch.bool)
    code, scale, zero = quantize_per_token(x, 4, 1, none)
    plain_code, plain_scale, plain_zero = quantize_per_token(x, 4, 1, None)
    assert torch.equal(code, plain_code) and torch.equal(scale[:, 1:], plain_scale)
    assert torch.equal(zero[:, 1:], plain_zero) and (scale[:, 0] == SCALE_FLOOR).all() and (zero[:, 0] == 0).all()
    # per-head masks (keys): heads without a salient channel have an empty fine group in every token
    keys = torch.randn(2, 3, 5, 4)
    mask = torch.zeros(3, 1, 4, dtype=torch.bool)
    mask[1, 0, 2] = True
    code, scale, zero = quantize_per_token(keys, 4, 1, mask)
    assert (scale[:, [0, 2], :, 0] == SCALE_FLOOR).all() and torch.isfinite(scale).all()
    gain = torch.where(mask, 1, 2).to(torch.int32)
    codes, scales, zeros = textbook_per_group(keys[:, 1], mask[1, 0], 4, 1)
    assert (
        torch.equal(code[:, 1].float(), codes) and torch.equal(scale[:, 1], scales) and torch.equal(zero[:, 1], zeros)
    )
    recon = dequantize(code, scale, zero, gain)
    assert torch.isfinite(recon).all() and (recon - keys).abs().max() < 0.5


def test_grid_packs_and_unpacks_for_a_cache():
    x = heavy_tailed(3, 16)
    salient = torch.zeros(16, dtype=torch.bool)
    salient[3] = True
    for mask, group_range, width in ((None, "group", 2), (salient, "token", 3), (salient, "group", 4)):
        _, scale, zero = quantize_per_token(x, 4, 1, mask, group_range=group_range)
        grid = pack_grid(scale, zero)
        assert grid.shape == (3, width)
        got_scale, got_zero = unpack_grid(grid)
        assert torch.equal(got_scale, scale) and torch.equal(got_zero, zero)


@pytest.mark.parametrize("clip", [1.0, 0.9, 0.5])
def test_clip_ratio_matches_the_textbook_quantiser_and_clamps_the_extremes(clip):
    neuron = calibrated_neuron(16, 4, 1)
    x = heavy_tailed(6, 16)
    code, scale, zero = quantize_per_token(x, 4, 1, neuron.salient, group_range="group", clip_ratio=clip)
    codes, scales, zeros = textbook_per_group(x, neuron.salient, 4, 1, clip=clip)
    assert torch.equal(code.float(), codes)
    assert torch.allclose(scale, scales) and torch.equal(zero, zeros)
    top = torch.where(neuron.salient, 30, 15)
    at_ends = ((code == 0) | (code == top)).sum()
    if clip < 1:  # the extremes of both groups now sit beyond the range: more codes at the ends than without
        plain, _, _ = quantize_per_token(x, 4, 1, neuron.salient, group_range="group")
        assert at_ends > ((plain == 0) | (plain == top)).sum()


def test_clip_ratio_out_of_range_is_refused():
    for bad in (0, 1.5, -0.2, True):
        with pytest.raises(ValueError, match="clip_ratio"):
            GIFNeuron(8, clip_ratio=bad)


# ----------------------------------------------------------------------------------------------
# Ranges per G consecutive channels of each set (group_size).
# ----------------------------------------------------------------------------------------------


def textbook_per_range_group(x, salient, bits, extra_bits, size, clip=1.0):
    """Per token: the salient channels in channel order cut into runs of ``size``, then the others; each run its
    own asymmetric min/max quantiser (fine top for salient runs, 2^n - 1 for the others). Returns the codes and,
    per channel, the step and zero point its run used (written out with Python lists, no library code)."""
    level = 2**bits - 1
    top = 2**extra_bits * level
    salient = [bool(s) for s in salient] if salient is not None else [False] * x.shape[-1]
    sets = [[c for c, s in enumerate(salient) if s], [c for c, s in enumerate(salient) if not s]]
    rows = x.reshape(-1, x.shape[-1])
    codes, steps, zeros = torch.zeros(rows.shape), torch.zeros(rows.shape), torch.zeros(rows.shape)
    for i, row in enumerate(rows):
        for members, grid in zip(sets, (top, level), strict=True):
            for start in range(0, len(members), size):
                run = members[start : start + size]
                values = row[run]
                lo, hi = values.min() * clip, values.max() * clip
                step = torch.clamp((hi - lo) / grid, min=SCALE_FLOOR)
                zero = torch.round(-lo / step)
                codes[i, run] = torch.clamp(torch.round(values / step) + zero, 0, grid)
                steps[i, run], zeros[i, run] = step, zero
    return codes.view(x.shape), steps.view(x.shape), zeros.view(x.shape)


def grouped_neuron(channels, bits, extra_bits, size, fraction=0.25, backend="fused", clip=1.0):
    neuron = GIFNeuron(
        channels,
        bits=bits,
        extra_bits=extra_bits,
        saliency_fraction=fraction,
        backend=backend,
        group_size=size,
        clip_ratio=clip,
    )
    neuron.calibrate(heavy_tailed(64, channels))
    return neuron


@pytest.mark.parametrize("size", [1, 3, 4, 7])
@pytest.mark.parametrize("bits,extra_bits", SETTINGS)
def test_range_groups_are_the_textbook_quantiser_and_the_spikes_sum_to_it(bits, extra_bits, size):
    # 24 channels, 25 % salient: sets of 6 and 18, not multiples of 4 or 7: the last run of a set is shorter
    neuron = grouped_neuron(24, bits, extra_bits, size)
    x = heavy_tailed(5, 7, 24)
    spikes, scale, zero, gain, group = neuron.spike(x)
    code, _, _ = neuron.quantize(x)
    mask = neuron.salient if extra_bits else None
    codes, steps, zeros = textbook_per_range_group(x, mask, bits, extra_bits, size)
    assert torch.equal(code.float(), codes)
    assert torch.equal(spikes.to(torch.int32).sum(0), code)  # the spiking path is the one-shot quantiser
    assert spikes.shape[0] == neuron.num_steps and int(spikes.max()) <= 2**bits - 1
    assert torch.equal(scale.gather(-1, group.expand(x.shape)), steps)
    assert torch.equal(zero.gather(-1, group.expand(x.shape)), zeros)
    salient = int(mask.sum()) if mask is not None else 0
    expected = -(-salient // size) + -(-(24 - salient) // size)
    assert scale.shape == zero.shape == (5, 7, expected)
    assert neuron.range_group_counts().tolist() == [expected]
    code2, scale2, zero2, group2 = quantize_per_group(x, bits, extra_bits, mask, size)
    assert torch.equal(code2, code) and torch.equal(scale2, scale) and torch.equal(group2, group)
    recon = neuron(x)
    assert torch.equal(recon, ((codes - zeros) * steps).to(x.dtype))


def test_a_group_size_as_large_as_each_set_is_one_range_per_set():
    x = heavy_tailed(5, 7, 24)
    plain = calibrated_neuron(24, 4, 1)
    for size in (18, 24, 1000):
        grouped = GIFNeuron(24, bits=4, extra_bits=1, group_size=size)
        grouped.load_state_dict(plain.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(grouped.quantize(x), plain.quantize(x), strict=True))
        assert torch.equal(grouped(x), plain(x))
    for size in (0, None):
        assert GIFNeuron(24, group_size=size).group_size == 0


def test_smaller_range_groups_cut_the_error_on_heavy_tailed_tokens():
    torch.manual_seed(0)
    x = torch.randn(32, 64) * torch.linspace(0.1, 10, 64)  # channel scales spread over two decades
    errors = {}
    for size in (0, 32, 8):
        neuron = GIFNeuron(64, bits=4, extra_bits=1, group_size=size)
        neuron.calibrate(x)
        errors[size] = float((neuron(x) - x).pow(2).mean())
    assert errors[8] < errors[32] < errors[0]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("fraction", [0.25, 0.0])
def test_linear_on_range_group_spikes_equals_linear_on_the_reconstruction(with_bias, fraction):
    torch.manual_seed(1)
    neuron = grouped_neuron(16, 4, 2, 3, fraction=fraction)
    linear = torch.nn.Linear(16, 10, bias=with_bias)
    x = heavy_tailed(4, 6, 16)
    spikes = neuron.spike(x)
    hooked = linear(neuron(x))
    # per range group g, per step: integer levels times W_g; then (acc_g - zero_g W_g.sum(1)) * scale_g, by hand
    w, groups = linear.weight.detach(), spikes.group
    hand = torch.zeros(4, 6, 10)
    for g in range(spikes.scale.shape[-1]):
        cols = groups == g
        acc = sum(s_t[..., cols].float() @ w[:, cols].t() for s_t in spikes.spikes)
        hand += (acc - spikes.zero[..., g : g + 1] * w[:, cols].sum(1)) * spikes.scale[..., g : g + 1]
    if with_bias:
        hand += linear.bias.detach()
    fast = spikes.linear(linear.weight, linear.bias)
    per_step = spikes.linear(linear.weight, linear.bias, per_step=True)
    torch.testing.assert_close(fast, hooked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_step, hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_step, fast, rtol=1e-5, atol=1e-5)


def test_range_groups_reference_and_fused_backends_agree_exactly():
    ref = grouped_neuron(24, 4, 2, 5, fraction=0.25, backend="reference")
    fused = GIFNeuron(24, bits=4, extra_bits=2, saliency_fraction=0.25, group_size=5)
    fused.load_state_dict(ref.state_dict())
    x = heavy_tailed(3, 11, 24)
    assert torch.equal(ref(x), fused(x))
    assert torch.equal(ref.spike(x).spikes, fused.spike(x).spikes)


def test_range_groups_follow_each_heads_own_salient_channels():
    torch.manual_seed(2)
    keys = torch.randn(2, 3, 5, 8)
    neuron = GIFNeuron((3, 1, 8), bits=4, extra_bits=1, saliency_fraction=0.2, group_size=3)
    neuron.calibrate(keys)
    code, scale, zero = neuron.quantize(keys)
    counts = []
    for head in range(3):
        mask = neuron.salient[head, 0]
        codes, steps, zeros = textbook_per_range_group(keys[:, head], mask, 4, 1, 3)
        assert torch.equal(code[:, head].float(), codes), head
        assert torch.equal(neuron.dequantize(code, scale, zero)[:, head], (codes - zeros) * steps), head
        salient = int(mask.sum())
        counts.append(-(-salient // 3) + -(-(8 - salient) // 3))
    assert neuron.range_group_counts().tolist() == counts
    # the cache's layout: scale and zero points packed per token and unpacked again
    assert all(torch.equal(a, b) for a, b in zip(unpack_grid(pack_grid(scale, zero)), (scale, zero), strict=True))


def test_range_groups_with_clipping_and_stats():
    neuron = grouped_neuron(24, 4, 1, 4, clip=0.8)
    x = heavy_tailed(2, 8, 24)
    codes, steps, zeros = textbook_per_range_group(x, neuron.salient, 4, 1, 4, clip=0.8)
    code, _, _ = neuron.quantize(x)
    assert torch.equal(code.float(), codes)
    neuron.record_stats = True
    neuron(x)
    salient = int(neuron.salient.sum())
    assert neuron.stats.as_dict()["scales"] == neuron.stats.as_dict()["groups"] == -(-salient // 4) + -(-18 // 4)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64"])
def test_bad_group_size_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="group_size"):
        GIFNeuron(8, group_size=bad)


def test_group_size_needs_per_group_ranges():
    with pytest.raises(ValueError, match="group_size 4 needs group_range='group'"):
        GIFNeuron(8, group_size=4, group_range="token")
