"""The fast kernels of the fused neuron (torch.compile on CPU, Triton on CUDA) against the reference path."""

import copy

import pytest
import torch
from conftest import random_batch, tiny_config

from spikelm import ElasticBiSpikingNeuron, SpikeLinear, SpikeLMModel
from spikelm.experiments.benchmark import Case, _saved_bytes, measure_case
from spikelm.nn import kernels as dispatcher
from spikelm.nn.kernels import COMPILE_MIN_ELEMENTS, choose_kernel


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


HAS_GPU = torch.cuda.is_available() and _triton_importable()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and triton")]
KERNELS = [pytest.param("compiled", "cpu", id="compiled"), pytest.param("triton", "cuda", id="triton", marks=gpu)]

OPTION_SETS = [
    {},
    {"reset": "symmetric"},
    {"spike_levels": "binary"},
    {"use_amplitude": False},
    {"learn_alpha": True},
    {"learn_alpha": True, "spike_levels": "binary"},
    {"membrane": False},
    {"alpha_init": 0.7},
]


def _option_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


def _check_neuron(x, kernel, device, **options):
    """Forward bit for bit and gradients within 1e-5 of the reference path, float32."""
    T = x.shape[0]
    fast = ElasticBiSpikingNeuron(T, backend=kernel, **options).to(device)
    ref = ElasticBiSpikingNeuron(T, backend="reference", **options).to(device)
    xf = x.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    sf, sr = fast(xf), ref(xr)
    assert torch.equal(fast.alpha, ref.alpha)
    assert torch.equal(sf, sr)
    g = torch.randn_like(sf)
    sf.backward(g)
    sr.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, atol=1e-5, rtol=1e-5)
    if options.get("learn_alpha"):
        torch.testing.assert_close(fast.alpha.grad, ref.alpha.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the path without backward (no codes) gives the same spikes
        assert torch.equal(fast(x), sr)


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize("options", OPTION_SETS, ids=_option_id)
def test_kernel_matches_reference_all_options(kernel, device, options):
    _check_neuron(torch.randn(4, 6, 33, 40, device=device) * 1.7, kernel, device, **options)


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize("T,shape", [(1, (5, 7)), (2, (3, 4, 9)), (8, (2, 3, 1000))])
def test_kernel_matches_reference_shapes_and_steps(kernel, device, T, shape):
    _check_neuron(torch.randn(T, *shape, device=device), kernel, device)
    _check_neuron(torch.randn(T, *shape, device=device), kernel, device, reset="symmetric", learn_alpha=True)


@pytest.mark.parametrize("kernel,device", KERNELS)
def test_kernel_on_strided_and_expanded_inputs(kernel, device):
    wide = torch.randn(4, 3, 10, 96, device=device)
    _check_neuron(wide[..., 32:64], kernel, device)  # a chunk of a wider tensor, as the K/V slices are
    _check_neuron(wide[..., 32:64], kernel, device, membrane=False)
    const = torch.randn(1, 3, 10, 32, device=device).expand(4, -1, -1, -1)  # the first layer's repeated input
    _check_neuron(const, kernel, device)


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize("spike_levels", ["ternary", "binary"])
def test_kernel_exact_at_the_thresholds(kernel, device, spike_levels):
    # |u| = alpha/2 rounds half to even (no spike), |u| = alpha stays inside the gradient window
    alpha = 0.7
    edges = torch.tensor([0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 0.49999997, 0.50000006, 1.0000001]) * alpha
    x = torch.cat([edges, torch.randn(200)]).reshape(1, 1, -1).to(device)
    _check_neuron(x, kernel, device, alpha_init=alpha, spike_levels=spike_levels)
    neuron = ElasticBiSpikingNeuron(1, alpha_init=alpha, spike_levels=spike_levels, backend=kernel).to(device)
    q = (neuron(x) / alpha)[0, 0, :4].tolist()
    assert q == ([0.0, 0.0, 1.0, -1.0] if spike_levels == "ternary" else [0.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize("options", [{}, {"spike_levels": "binary"}, {"learn_alpha": True}], ids=_option_id)
def test_spike_linear_kernel_matches_reference(kernel, device, options):
    x = torch.randn(4, 3, 7, 40, device=device)
    fast = SpikeLinear(40, 24, num_steps=4, **options).to(device)
    fast.neuron.backend = kernel
    ref = copy.deepcopy(fast)
    ref.neuron.backend = "reference"
    xf, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yf, yr = fast(xf), ref(xr)
    torch.testing.assert_close(yf, yr, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(yf)
    yf.backward(g)
    yr.backward(g)
    pairs = [(xf.grad, xr.grad), (fast.weight.grad, ref.weight.grad), (fast.bias.grad, ref.bias.grad)]
    if options.get("learn_alpha"):
        pairs.append((fast.neuron.alpha.grad, ref.neuron.alpha.grad))
    for a, b in pairs:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel,device", KERNELS)
def test_model_on_kernel_matches_reference(kernel, device):
    config = tiny_config(num_steps=4)
    batch = {k: v.to(device) for k, v in random_batch(config).items()}
    fast = SpikeLMModel(config).to(device)
    with torch.no_grad():
        fast(**batch)  # initialise alphas
    ref = copy.deepcopy(fast)
    fast.set_neuron_backend(kernel)
    ref.set_neuron_backend("reference")
    out_f, out_r = fast(**batch), ref(**batch)
    torch.testing.assert_close(out_f.last_hidden_state, out_r.last_hidden_state, atol=1e-5, rtol=1e-5)
    out_f.last_hidden_state.square().mean().backward()
    out_r.last_hidden_state.square().mean().backward()
    grads_r = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if p.grad is not None or grads_r[name].grad is not None:
            torch.testing.assert_close(p.grad, grads_r[name].grad, atol=1e-5, rtol=1e-5, msg=name)


def test_auto_picks_the_kernel_by_device_and_size():
    assert choose_kernel(torch.empty(4, COMPILE_MIN_ELEMENTS // 4), "auto") == "compiled"
    assert choose_kernel(torch.empty(4, 8), "auto") == "fused"
    assert choose_kernel(torch.empty(4, 8), "fused") == "fused"
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="triton"):
            choose_kernel(torch.empty(4, 8), "triton")


def test_compile_failure_falls_back_to_the_plain_loop(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(dispatcher, "_compiled", {})
    monkeypatch.setattr(dispatcher, "_compile_failed", False)
    monkeypatch.setattr(dispatcher, "_warned", set())
    x = torch.randn(4, 5, 16)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        _check_neuron(x, "compiled", "cpu")
    assert dispatcher._compile_failed
    assert choose_kernel(torch.empty(4, COMPILE_MIN_ELEMENTS), "auto") == "fused"


def test_unavailable_torch_compile_warns_once_and_gives_the_plain_loops_spikes(monkeypatch):
    """torch.compile itself refusing (e.g. an unsupported Python) is a fallback too: one warning in all, then the
    plain loop, whose spikes are the reference's."""
    import warnings

    def no_compile(fn, *args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", no_compile)
    monkeypatch.setattr(dispatcher, "_compiled", {})
    monkeypatch.setattr(dispatcher, "_compile_failed", False)
    monkeypatch.setattr(dispatcher, "_warned", set())
    x = torch.randn(4, 3, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _check_neuron(x, "compiled", "cpu")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "not supported on this Python" in messages[0], messages


def test_auto_on_cuda_without_triton_warns_once_and_runs_the_plain_loop(monkeypatch):
    """No silent fallback: CUDA inputs under backend 'auto' without an importable triton take the PyTorch loop
    and say so once (float64, which never uses Triton, says nothing)."""
    import types
    import warnings

    monkeypatch.setattr(dispatcher, "_triton_error", [ImportError("No module named 'triton'")])
    monkeypatch.setattr(dispatcher, "_warned", set())

    def cuda_like(dtype):
        return types.SimpleNamespace(is_cuda=True, dtype=dtype, numel=lambda: COMPILE_MIN_ELEMENTS)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert choose_kernel(cuda_like(torch.float64), "auto") == "fused"
        assert not caught
        for dtype in (torch.float32, torch.bfloat16, torch.float32):
            assert choose_kernel(cuda_like(dtype), "auto") == "fused"
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "Triton" in str(caught[0].message) and "No module named 'triton'" in str(caught[0].message)


@pytest.mark.parametrize("steps", [1, 4])
def test_fused_model_saves_at_most_half_the_reference_bytes(steps):
    config = tiny_config(num_steps=steps)
    batch = random_batch(config)
    model = SpikeLMModel(config).train()
    with torch.no_grad():
        model(**batch)

    def saved(backend):
        model.set_neuron_backend(backend)
        return _saved_bytes(model, lambda: model(**batch).last_hidden_state)

    fused, reference = saved("fused"), saved("reference")
    assert 0 < fused <= 0.5 * reference


@pytest.mark.parametrize("kernel", [pytest.param("triton", marks=gpu)])
def test_bfloat16_kernel_matches_plain_loop_and_trains(kernel):
    x = torch.randn(4, 6, 50, 64, device="cuda").to(torch.bfloat16)
    fast = ElasticBiSpikingNeuron(4, backend=kernel).cuda()
    plain = ElasticBiSpikingNeuron(4, backend="fused").cuda()
    xf, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    sf, sp = fast(xf), plain(xp)
    assert sf.dtype == torch.bfloat16 and torch.equal(sf, sp)
    g = torch.randn_like(sf)
    sf.backward(g)
    sp.backward(g)
    assert torch.equal(xf.grad, xp.grad)
    # fp32 membrane maths: the spikes are the float32 reference's, rounded to bfloat16
    ref = ElasticBiSpikingNeuron(4, backend="reference").cuda()
    assert torch.equal(ref(x.float()).to(torch.bfloat16), sf)
    config = tiny_config(num_steps=4)
    model = SpikeLMModel(config).cuda().train()
    batch = {k: v.cuda() for k, v in random_batch(config).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).last_hidden_state.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_benchmark_case_reports_ratios_and_memory():
    case = Case(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        batch_size=2,
        seq_len=16,
        num_steps=2,
    )
    result = measure_case(case, "cpu", torch.float32, repeats=1)
    assert set(result["train_s"]) == {"fused", "reference", "bert"}
    assert result["train_ratio_vs_ann"] == pytest.approx(result["train_s"]["fused"] / (2 * result["train_s"]["bert"]))
    assert result["mem_ratio_vs_reference"] == pytest.approx(
        result["saved_bytes"]["fused"] / result["saved_bytes"]["reference"]
    )
    assert result["mem_ratio_vs_reference"] < 0.5


def test_the_switch_turns_triton_off_under_auto_and_the_earlier_cpu_switch_does_not(monkeypatch):
    """``SPIKELM_KERNELS=0`` (or kernels.forced(False)): CUDA neurons under backend 'auto' run the PyTorch loop, with
    no fallback notice (it was asked for); ``SPIKELM_CPU_KERNELS=0`` keeps its scope, the C++ kernels only. An
    explicit backend is honoured whatever the switch."""
    import types
    import warnings

    monkeypatch.setattr(dispatcher, "_triton_error", [None])  # as if triton imported
    monkeypatch.delenv(dispatcher.ENV_VAR, raising=False)
    cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.float32, numel=lambda: 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_kernel(cuda_like, "auto") == "triton"
        monkeypatch.setenv(dispatcher.CPU_ENV_VAR, "0")
        assert choose_kernel(cuda_like, "auto") == "triton"
        monkeypatch.setenv(dispatcher.ENV_VAR, "0")
        assert choose_kernel(cuda_like, "auto") == "fused"
        assert choose_kernel(cuda_like, "triton") == "triton"
        monkeypatch.delenv(dispatcher.ENV_VAR)
        with dispatcher.forced(False):
            assert choose_kernel(cuda_like, "auto") == "fused"
        # torch.compile is PyTorch's own compiler of the PyTorch loop: not switched
        with dispatcher.forced(False):
            assert choose_kernel(torch.empty(4, COMPILE_MIN_ELEMENTS // 4), "auto") == "compiled"
