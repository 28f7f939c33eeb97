"""The elastic bi-spiking neuron: reference vectors, fused vs per-step paths, every option."""

import copy
import io
import math

import pytest
import torch
from conftest import load_fixture

from spikelm import ElasticBiSpikingNeuron, SpikeLinear
from spikelm.nn.neuron import ALPHA_FLOOR, MultiStepSpike, reference_multistep_spike


@pytest.mark.parametrize("name", ["gauss", "laplace"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_spike_linear_matches_authors_reference(name, backend):
    ref = load_fixture(f"spike_linear_{name}.safetensors")
    layer = SpikeLinear(48, 24, num_steps=4)
    layer.neuron.backend = backend
    with torch.no_grad():
        layer.weight.copy_(ref["weight"])
        layer.bias.copy_(ref["bias"])
    x = ref["x"].clone().requires_grad_(True)
    y = layer(x)
    y.backward(ref["grad_y"])
    spikes = layer.neuron(ref["x"])
    for ours, theirs in [
        (layer.neuron.alpha.detach(), ref["alpha"]),
        (spikes, ref["spikes"]),
        (y.detach(), ref["y"]),
        (x.grad, ref["grad_x"]),
        (layer.weight.grad, ref["grad_weight"]),
        (layer.bias.grad, ref["grad_bias"]),
    ]:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def _neuron_pair(T, **options):
    fused = ElasticBiSpikingNeuron(T, backend="fused", **options)
    ref = ElasticBiSpikingNeuron(T, backend="reference", **options)
    return fused, ref


OPTION_SETS = [
    {},
    {"reset": "symmetric"},
    {"spike_levels": "binary"},
    {"use_amplitude": False},
    {"learn_alpha": True},
    {"learn_alpha": True, "spike_levels": "binary"},
    {"learn_alpha": True, "reset": "symmetric"},
    {"membrane": False},
    {"alpha_init": 0.7},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("T,shape", [(1, (5, 7)), (2, (3, 4, 9)), (4, (2, 6, 16)), (8, (33,))])
def test_fused_matches_reference(options, T, shape):
    x = torch.randn(T, *shape) * 1.7
    fused, ref = _neuron_pair(T, **options)
    xf = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    sf, sr = fused(xf), ref(xr)
    torch.testing.assert_close(fused.alpha, ref.alpha, atol=0, rtol=0)
    torch.testing.assert_close(sf, sr, atol=1e-6, rtol=0)
    g = torch.randn_like(sf)
    sf.backward(g)
    sr.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, atol=1e-5, rtol=1e-5)
    if options.get("learn_alpha"):
        assert fused.alpha.grad is not None and ref.alpha.grad is not None
        torch.testing.assert_close(fused.alpha.grad, ref.alpha.grad, atol=1e-5, rtol=1e-5)
    else:
        assert fused.alpha.grad is None and ref.alpha.grad is None


@pytest.mark.parametrize("options", OPTION_SETS[:4], ids=str)
def test_spike_linear_fused_matches_composition(options):
    T = 4
    x = torch.randn(T, 3, 5, 20)
    fused = SpikeLinear(20, 11, num_steps=T, **options)
    ref = copy.deepcopy(fused)
    ref.neuron.backend = "reference"
    xf, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yf, yr = fused(xf), ref(xr)
    torch.testing.assert_close(yf, yr, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(yf)
    yf.backward(g)
    yr.backward(g)
    for a, b in [(xf.grad, xr.grad), (fused.weight.grad, ref.weight.grad), (fused.bias.grad, ref.bias.grad)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ternary_levels_and_threshold():
    T = 3
    neuron = ElasticBiSpikingNeuron(T)
    x = torch.randn(T, 4, 64)
    s = neuron(x)
    alpha = neuron.alpha.detach()
    q = s / alpha.view(-1, 1, 1)
    assert set(q.unique().tolist()) == {-1.0, 0.0, 1.0}
    # at t = 0 the membrane is the input: fires exactly where |x| > alpha_0 / 2
    torch.testing.assert_close((q[0] != 0), x[0].abs() > alpha[0] / 2)


def test_binary_levels_and_hard_reset():
    T = 4
    neuron = ElasticBiSpikingNeuron(T, spike_levels="binary")
    x = torch.randn(T, 8, 32)
    s = neuron(x)
    alpha = neuron.alpha.detach()
    q = s / alpha.view(-1, 1, 1)
    assert set(q.unique().tolist()) <= {0.0, 1.0} and (q == 1).any()
    # the membrane by hand: leaky hard reset u_t = 0.25 u_{t-1} (1 - q_{t-1}) + x_t
    u = x[0]
    for t in range(T):
        if t:
            u = (u * 0.25) * (1 - q[t - 1]) + x[t]
        torch.testing.assert_close(q[t], (u / alpha[t] > 0.5).float())


def test_round_half_to_even_at_threshold():
    neuron = ElasticBiSpikingNeuron(1, alpha_init=2.0)
    x = torch.tensor([[1.0, -1.0, 1.0000001, 3.0, -3.0, 0.999999]])
    q = neuron(x) / 2.0
    assert q.tolist() == [[0.0, -0.0, 1.0, 1.0, -1.0, 0.0]]


def test_official_reset_follows_the_released_update():
    T = 4
    neuron = ElasticBiSpikingNeuron(T)
    x = torch.randn(T, 10, 10)
    s = neuron(x)
    a = neuron.alpha.detach()
    u = x[0]
    for t in range(T):
        if t:
            u = ((u * 0.25) * (a[t - 1] - s[t - 1])) + x[t]
        q = torch.round(u / a[t]).clamp(-1, 1)
        torch.testing.assert_close(s[t], q * a[t], atol=0, rtol=0)


def test_symmetric_reset_differs_from_official_and_follows_its_formula():
    T = 4
    x = torch.randn(T, 16, 16)
    official = ElasticBiSpikingNeuron(T, reset="official")
    symmetric = ElasticBiSpikingNeuron(T, reset="symmetric")
    so, ss = official(x), symmetric(x)
    assert not torch.equal(so, ss)
    a = symmetric.alpha.detach()
    u = x[0]
    q_prev = None
    for t in range(T):
        if t:
            u = 0.25 * u * (1 - q_prev.abs()) + x[t]
        q_prev = torch.round(u / a[t]).clamp(-1, 1)
        torch.testing.assert_close(ss[t], q_prev * a[t])


def test_alpha_initialisation_is_sequential_mean_abs():
    T = 4
    x = torch.randn(T, 6, 50)
    neuron = ElasticBiSpikingNeuron(T)
    assert not neuron.initialized
    neuron(x)
    assert bool(neuron.initialized)
    a = neuron.alpha.detach()
    torch.testing.assert_close(a[0], 2 * x[0].abs().mean())
    # repeated N(0,1) input: alpha grows over the steps under the official reset (SPEC section 2)
    rep = ElasticBiSpikingNeuron(T)
    rep(torch.randn(1, 20000).expand(T, -1, -1).contiguous())
    assert torch.all(rep.alpha[1:] > rep.alpha[:-1])
    # a second batch does not move alpha (frozen)
    before = neuron.alpha.detach().clone()
    neuron(x * 10)
    torch.testing.assert_close(neuron.alpha.detach(), before)


def test_firing_rate_at_step_zero_matches_the_spec():
    neuron = ElasticBiSpikingNeuron(1)
    neuron.record_stats = True
    neuron(torch.randn(1, 200_000))
    assert abs(neuron.stats.firing_rate()[0].item() - 0.425) < 0.01  # P(|u| > E|u|), Gaussian


def test_numeric_alpha_init_and_use_amplitude_false():
    neuron = ElasticBiSpikingNeuron(2, alpha_init=0.5, use_amplitude=False)
    assert bool(neuron.initialized)
    s = neuron(torch.randn(2, 100) * 3)
    assert set(s.unique().tolist()) == {-1.0, 0.0, 1.0}
    torch.testing.assert_close(neuron.alpha.detach(), torch.full((2,), 0.5))


def test_t1_has_no_membrane():
    x = torch.randn(1, 7, 9)
    neuron = ElasticBiSpikingNeuron(1)
    s = neuron(x)
    a = 2 * x.abs().mean()
    torch.testing.assert_close(s, torch.round(x / a).clamp(-1, 1) * a)


def test_membrane_false_spikes_each_step_alone():
    T = 3
    x = torch.randn(T, 4, 20)
    neuron = ElasticBiSpikingNeuron(T, membrane=False)
    s = neuron(x)
    for t in range(T):
        a = 2 * x[t].abs().mean()
        torch.testing.assert_close(s[t], torch.round(x[t] / a).clamp(-1, 1) * a)


def test_gradient_window_and_membrane_gradient():
    # T=2 by hand: grad_x1 = g1 * m1; grad_x0 = g0 * m0 + grad_x1 * 0.25 * (alpha0 - s0)
    neuron = ElasticBiSpikingNeuron(2)
    x = torch.randn(2, 1000, requires_grad=True)
    s = neuron(x)
    g = torch.randn_like(s)
    s.backward(g)
    a = neuron.alpha.detach()
    u0 = x[0].detach()
    u1 = (u0 * 0.25) * (a[0] - s[0].detach()) + x[1].detach()
    m0, m1 = (u0 / a[0]).abs() <= 1, (u1 / a[1]).abs() <= 1
    gx1 = g[1] * m1
    torch.testing.assert_close(x.grad[1], gx1)
    torch.testing.assert_close(x.grad[0], g[0] * m0 + gx1 * 0.25 * (a[0] - s[0].detach()))
    assert 0.8 < m0.float().mean() < 0.95  # the paper's ~87-89 % of inputs pass a gradient


def test_learn_alpha_gets_lsq_gradient_and_frozen_does_not():
    x = torch.randn(3, 40, 8)
    learned = ElasticBiSpikingNeuron(3, learn_alpha=True)
    learned(x).sum().backward()
    assert learned.alpha.grad is not None and learned.alpha.grad.abs().sum() > 0
    # the LSQ gradient at step 0 by hand
    a0 = learned.alpha.detach()[0]
    r = x[0] / a0
    slope = torch.where(r.abs() <= 1, torch.round(r) - r, torch.round(r).clamp(-1, 1))
    torch.testing.assert_close(learned.alpha.grad[0], slope.sum() / math.sqrt(r.numel()), atol=1e-5, rtol=1e-5)
    frozen = ElasticBiSpikingNeuron(3)
    xin = x.clone().requires_grad_(True)
    frozen(xin).sum().backward()
    assert frozen.alpha.grad is None and not frozen.alpha.requires_grad


def test_alpha_floor_applies_at_use_only():
    neuron = ElasticBiSpikingNeuron(1, alpha_init=1e-9)
    s = neuron(torch.full((1, 4), 3e-5))
    assert torch.all(s == ALPHA_FLOOR)
    assert neuron.alpha.item() == pytest.approx(1e-9)


def test_state_survives_save_load_and_deepcopy():
    neuron = ElasticBiSpikingNeuron(4)
    x = torch.randn(4, 3, 10)
    s = neuron(x)
    buf = io.BytesIO()
    torch.save(neuron.state_dict(), buf)
    buf.seek(0)
    fresh = ElasticBiSpikingNeuron(4)
    assert not fresh.is_initialized()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.is_initialized()
    torch.testing.assert_close(fresh(x), s)
    clone = copy.deepcopy(neuron)
    assert clone.is_initialized() and torch.equal(clone.alpha, neuron.alpha)
    assert type(clone.alpha) is torch.nn.Parameter
    # loading an uninitialised state resets the cached flag
    neuron.load_state_dict(ElasticBiSpikingNeuron(4).state_dict())
    assert not neuron.is_initialized()


def test_stats_count_spikes_per_step_and_sign():
    T = 4
    x = torch.randn(T, 5, 30)
    for backend in ("fused", "reference"):
        neuron = ElasticBiSpikingNeuron(T, backend=backend)
        neuron.record_stats = True
        s = neuron(x)
        neuron(x)
        q = torch.sign(s)
        assert neuron.stats.positive.tolist() == [2 * int((q[t] > 0).sum()) for t in range(T)]
        assert neuron.stats.negative.tolist() == [2 * int((q[t] < 0).sum()) for t in range(T)]
        assert neuron.stats.slots.tolist() == [2 * 150] * T


def test_fused_saves_int8_codes_only():
    x = torch.randn(4, 64, 128, requires_grad=True)

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(total)

    fused, ref = _neuron_pair(4)
    fused(x.detach()), ref(x.detach())  # initialise
    fused_bytes = saved_bytes(lambda: fused(x))
    ref_bytes = saved_bytes(lambda: ref(x))
    assert fused_bytes <= x.numel() + 64  # one int8 code per element (+ alpha)
    assert ref_bytes >= 4 * fused_bytes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 4, "spike_levels": "quaternary"}, "spike_levels"),
        ({"num_steps": 4, "reset": "soft"}, "reset"),
        ({"num_steps": 4, "alpha_init": "max"}, "alpha_init"),
        ({"num_steps": 4, "alpha_init": -1.0}, "alpha_init"),
        ({"num_steps": 4, "learn_alpha": True, "use_amplitude": False}, "learn_alpha"),
        ({"num_steps": 4, "backend": "cuda-magic"}, "backend"),
    ],
)
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElasticBiSpikingNeuron(**kwargs)


def test_bad_inputs_are_rejected():
    neuron = ElasticBiSpikingNeuron(4)
    with pytest.raises(ValueError, match="time-major"):
        neuron(torch.randn(4))
    with pytest.raises(ValueError, match="num_steps=4"):
        neuron(torch.randn(3, 2, 8))
    with pytest.raises(TypeError, match="floating-point"):
        neuron(torch.ones(4, 2, dtype=torch.long))
    layer = SpikeLinear(8, 4, num_steps=4)
    with pytest.raises(ValueError, match="in_features|8"):
        layer(torch.randn(4, 2, 7))


def test_reference_function_is_usable_alone():
    x = torch.randn(2, 3, 4)
    alpha = torch.tensor([1.0, 1.5])
    s = reference_multistep_spike(x, alpha)
    s2, counts = MultiStepSpike.apply(x, alpha, "ternary", "official", True, True, True)
    torch.testing.assert_close(s, s2)
    assert counts.sum().item() == int((s != 0).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [("ternary", "official"), ("binary", "symmetric"), ("ternary", "symmetric")])
def test_reference_and_fused_agree_bit_for_bit_in_half_precision(dtype, options):
    """The reference path upcasts to float32 like the fused paths: identical spikes and gradients."""
    torch.manual_seed(3)
    x = (torch.randn(4, 64, 48) * 2).to(dtype)
    ref = ElasticBiSpikingNeuron(4, spike_levels=options[0], reset=options[1], backend="reference")
    fused = copy.deepcopy(ref)
    fused.backend = "fused"
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    sr, sf = ref(xr), fused(xf)
    assert sr.dtype == sf.dtype == dtype
    assert torch.equal(sr, sf)
    g = torch.randn_like(sr)
    sr.backward(g)
    sf.backward(g)
    assert torch.equal(xr.grad, xf.grad)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_straight_through_window_is_closed_at_alpha(backend):
    """The gradient passes for |u| <= alpha exactly and not beyond (a `<` for `<=` must fail this)."""
    alpha = 0.5
    neuron = ElasticBiSpikingNeuron(1, alpha_init=alpha, backend=backend)
    nxt = torch.nextafter(torch.tensor(alpha), torch.tensor(1.0)).item()
    u = torch.tensor([[alpha, -alpha, nxt, -nxt, 0.0, 0.2]], requires_grad=True)
    neuron(u).backward(torch.ones(1, 6))
    assert u.grad.tolist() == [[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


@pytest.mark.parametrize("membrane", [True, False])
@pytest.mark.parametrize(
    "spike_levels,reset", [("ternary", "official"), ("ternary", "symmetric"), ("binary", "official")]
)
@pytest.mark.parametrize("use_amplitude", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_inference_fast_path_equals_the_fused_loop_bit_for_bit(
    membrane, spike_levels, reset, use_amplitude, dtype, steps
):
    from spikelm.nn.neuron import spike_steps, spike_steps_inference

    torch.manual_seed(steps)
    alpha = torch.rand(steps) + 0.2
    x = torch.randn(steps, 3, 5, 17) * 2
    x[:, 0, 0, :8] = alpha.view(-1, 1) * torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, -0.0])  # thresholds
    x = x.to(dtype)
    expected, _, _ = spike_steps(x, alpha, spike_levels, reset, use_amplitude, membrane, False, False)
    got = spike_steps_inference(x, alpha, spike_levels, reset, use_amplitude, membrane)
    assert got.dtype == expected.dtype == dtype and torch.equal(got, expected)
    # and the module's inference path (which takes it for small inputs) equals the readable reference path
    neuron = ElasticBiSpikingNeuron(
        steps, spike_levels=spike_levels, reset=reset, use_amplitude=use_amplitude, membrane=membrane, alpha_init=1.0
    )
    with torch.no_grad():
        neuron.alpha.copy_(alpha)
        fast = neuron(x)
        neuron.backend = "reference"
        assert torch.equal(fast, neuron(x))
