"""The C++ decoding kernels (spikelm/nn/cpu_kernels.py, source cpu_kernels.cpp) and their dispatch
(spikelm/nn/kernels.py): the few-row linear against F.linear (close on random inputs, equal where float sums are
exact), the neuron and the packed K/V cache kernels against the PyTorch paths (bit for bit), their dispatch and switch,
the fallback notices, and decoding with them on vs off (native SpikeLM and a converted tiny LLaMA: bit-identical with
the linear left to MKL; with it, logits close, spikes and tokens counted)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import count_calls, tiny_config, tiny_llama_model

from spikelm import SpikeLMForCausalLM
from spikelm.conversion import spikify
from spikelm.errors import UserError
from spikelm.nn import cpu_kernels, kernels
from spikelm.nn.neuron import ElasticBiSpikingNeuron, reference_multistep_spike, spike_steps_inference

needs_kernel = pytest.mark.skipif(cpu_kernels.kernel() is None, reason="the extension cannot be built here")


def f64_linear(x, weight, bias=None):
    """The exact-accumulation definition, written here independently: float64 products and sums, one rounding."""
    out = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return out.to(x.dtype)


@pytest.fixture(autouse=True)
def _switch_follows_environment(monkeypatch):
    for name in (kernels.ENV_VAR, kernels.CPU_ENV_VAR, kernels.ROWS_ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    kernels.set_enabled(None)
    yield
    kernels.set_enabled(None)


def sparse_rows(rows, features, density=0.3, zero_rows=(), zero_cols=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g) * (torch.rand(rows, features, generator=g) < density)
    for r in zero_rows:
        x[r] = 0
    for c in zero_cols:
        x[:, c] = 0
    return x


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16])
@pytest.mark.parametrize(("k", "n"), [(37, 29), (576, 193), (130, 1031)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_is_close_to_f_linear_on_sparse_inputs(rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    weight = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = sparse_rows(rows, k, zero_rows=[0] if rows > 1 else [], zero_cols=range(0, k, 3), seed=rows)
    y = cpu_kernels.few_rows_linear(x, weight, b)
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())  # float64 reference
    assert y.shape == (rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    if rows > 1:  # an all-zero row is the bias (or 0) exactly
        assert torch.equal(y[0], b if bias else torch.zeros(n))


@needs_kernel
def test_kernel_splits_the_outputs_across_threads_with_the_same_result():
    weight, bias = torch.randn(1531, 300), torch.randn(1531)
    x = sparse_rows(4, 300, zero_cols=range(0, 300, 2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.few_rows_linear(x, weight, bias)
        torch.set_num_threads(3)
        three = cpu_kernels.few_rows_linear(x, weight, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)  # each output's sum runs in the same order whatever thread computes it
    torch.testing.assert_close(three, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3])
def test_the_readers_of_one_input_in_one_call_equal_each_alone(rows):
    """few_rows_linears (q, k, v of one spiked input at a decoding step) gives each weight's few_rows_linear bit for
    bit, whatever the threads, biases or not; and is the linear (against F.linear in float64)."""
    g = torch.Generator().manual_seed(rows)
    weights = [torch.randn(n, 96, generator=g) for n in (96, 33, 33)]
    biases = [None, torch.randn(33, generator=g), None]
    x = torch.randn(1, rows, 96, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = cpu_kernels.few_rows_linears(x, weights, biases)
    finally:
        torch.set_num_threads(threads)
    for out, w, b in zip(together, weights, biases, strict=True):
        assert out.shape == (1, rows, w.shape[0])
        assert torch.equal(out, cpu_kernels.few_rows_linear(x, w, b))
        expected = F.linear(x.double(), w.double(), None if b is None else b.double())
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


@needs_kernel
def test_kernel_equals_f_linear_where_float_sums_are_exact():
    # small integers: every partial sum is an integer below 2**24, so any order of the sums gives the same float
    g = torch.Generator().manual_seed(3)
    weight = torch.randint(-8, 9, (211, 97), generator=g).float()
    bias = torch.randint(-8, 9, (211,), generator=g).float()
    x = torch.randint(-1, 2, (4, 97), generator=g).float() * 3.0  # ternary spikes times alpha = 3
    assert torch.equal(cpu_kernels.few_rows_linear(x, weight, bias), F.linear(x, weight, bias))
    hand = [sum(x[0, k].item() * weight[5, k].item() for k in range(97)) + bias[5].item()]
    assert cpu_kernels.few_rows_linear(x, weight, bias)[0, 5].item() == hand[0]


@needs_kernel
def test_kernel_keeps_leading_dimensions_and_follows_in_place_weight_changes():
    weight = torch.randn(24, 16)
    x = sparse_rows(6, 16).view(2, 3, 16)
    torch.testing.assert_close(cpu_kernels.few_rows_linear(x, weight), F.linear(x, weight))
    with torch.no_grad():
        weight.mul_(-2.0)  # nothing derived from the weight is kept between calls
    torch.testing.assert_close(cpu_kernels.few_rows_linear(x, weight), F.linear(x, weight))
    t = torch.randn(16, 24).t()  # a transposed (non-contiguous) weight
    torch.testing.assert_close(cpu_kernels.few_rows_linear(x, t), F.linear(x, t))


@needs_kernel
def test_more_than_sixteen_rows_are_refused_by_the_kernel_itself():
    with pytest.raises(RuntimeError, match="1 to 16 rows"):
        cpu_kernels.few_rows_linear(torch.randn(17, 4), torch.randn(3, 4))


@needs_kernel
def test_dispatch_takes_the_kernel_for_few_rows_only_and_not_under_autograd_or_when_off(monkeypatch):
    calls = count_calls(monkeypatch, cpu_kernels, "few_rows_linear")
    weight, bias = torch.randn(10, 8), torch.randn(10)
    few = sparse_rows(kernels.MAX_ROWS, 8)
    many = sparse_rows(kernels.MAX_ROWS + 1, 8)
    torch.testing.assert_close(kernels.spike_linear(few, weight, bias), f64_linear(few, weight, bias))
    assert calls["few_rows_linear"] == 1
    assert torch.equal(kernels.spike_linear(many, weight, bias), f64_linear(many, weight, bias))
    w = weight.clone().requires_grad_()
    assert kernels.spike_linear(few, w, bias).requires_grad  # autograd: differentiable, not the kernel
    with torch.no_grad():
        kernels.spike_linear(few, w, bias)
    assert calls["few_rows_linear"] == 2
    kernels.set_enabled(False)
    assert torch.equal(kernels.spike_linear(few, weight, bias), f64_linear(few, weight, bias))
    kernels.set_enabled(None)
    monkeypatch.setenv(kernels.CPU_ENV_VAR, "0")
    assert torch.equal(kernels.spike_linear(few, weight, bias), f64_linear(few, weight, bias))
    assert calls["few_rows_linear"] == 2
    monkeypatch.setenv(kernels.CPU_ENV_VAR, "1")
    monkeypatch.setenv(kernels.ROWS_ENV_VAR, "2")  # the threshold moved
    two, three = sparse_rows(2, 8), sparse_rows(3, 8)
    torch.testing.assert_close(kernels.spike_linear(two, weight, bias), f64_linear(two, weight, bias))
    assert calls["few_rows_linear"] == 3
    assert torch.equal(kernels.spike_linear(three, weight, bias), f64_linear(three, weight, bias))
    assert calls["few_rows_linear"] == 3


def test_a_bad_switch_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.CPU_ENV_VAR, "maybe")
    with pytest.raises(UserError, match="SPIKELM_CPU_KERNELS"):
        kernels.enabled()
    for bad in ("-3", "17", "two"):
        monkeypatch.setenv(kernels.ROWS_ENV_VAR, bad)
        with pytest.raises(UserError, match=f"SPIKELM_CPU_KERNELS_MAX_ROWS='{bad}'.* 0 to 16"):
            kernels.max_rows()
    with pytest.raises(TypeError):
        kernels.set_enabled("yes")


def test_kernels_that_cannot_be_built_fall_back_to_pytorch_with_one_notice(monkeypatch):
    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(cpu_kernels, "_build", broken)
    monkeypatch.setattr(cpu_kernels, "_module", [])
    monkeypatch.setattr(cpu_kernels, "_build_error", [])
    monkeypatch.setattr(kernels, "_warned", set())
    weight, x = torch.randn(5, 7), sparse_rows(4, 7)
    with pytest.warns(RuntimeWarning, match="could not be built .*no compiler here.* PyTorch path"):
        y = kernels.spike_linear(x, weight)
    assert torch.equal(y, f64_linear(x, weight))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not on every call
        assert torch.equal(kernels.spike_linear(x, weight), f64_linear(x, weight))


@needs_kernel
@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, True),
        ({"SPIKELM_KERNELS": "0"}, False),
        ({"SPIKELM_CPU_KERNELS": "0"}, False),  # the earlier switch keeps working
        ({"SPIKELM_KERNELS": "1", "SPIKELM_CPU_KERNELS": "0"}, False),  # either one turns them off
        ({"SPIKELM_KERNELS": "off", "SPIKELM_CPU_KERNELS": "1"}, False),
    ],
)
def test_one_switch_turns_every_cpu_kernel_off(monkeypatch, environment, expected):
    """Each operation the dispatcher serves asks the same switch: the few-row linear, the neuron, the K/V append."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    x, weight = sparse_rows(4, 8), torch.randn(5, 8)
    kv = torch.randn(4, 2, 1, 8)
    want = kernels.CPP if expected else kernels.PYTORCH
    with torch.no_grad():
        assert kernels.linear_kernel(x, weight, None) == want
        assert kernels.kv_append_kernel(kv, kv) == want
        assert kernels.neuron_kernel(torch.randn(4, 2, 8), "auto") == (kernels.CPP if expected else kernels.FUSED)
        assert kernels.neuron_kernel(torch.randn(4, 2, 8), "fused") == kernels.FUSED  # explicit: honoured
    with kernels.forced(not expected), torch.no_grad():  # the function beats the environment
        assert kernels.linear_kernel(x, weight, None) == (kernels.PYTORCH if expected else kernels.CPP)
    assert kernels.linear_kernel(x, weight, None) == want  # and the block puts it back


def test_a_bad_value_of_the_new_switch_names_it(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "sometimes")
    with pytest.raises(UserError, match="SPIKELM_KERNELS='sometimes': expected 1 .* or 0"):
        kernels.enabled()


def test_the_fallback_notice_is_one_line_once(monkeypatch):
    def broken():
        raise OSError("no compiler here\nsecond line of the compiler's output")

    monkeypatch.setattr(cpu_kernels, "_build", broken)
    monkeypatch.setattr(cpu_kernels, "_module", [])
    monkeypatch.setattr(cpu_kernels, "_build_error", [])
    monkeypatch.setattr(kernels, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            kernels.neuron_kernel(torch.randn(4, 2, 8), "auto")
            kernels.spike_linear(sparse_rows(4, 7), torch.randn(5, 7))
            kernels.kv_append_kernel(torch.randn(4, 2, 1, 8), torch.randn(4, 2, 1, 8))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # one notice for the three operations
    assert "\n" not in messages[0] and "OSError: no compiler here" in messages[0], messages[0]
    assert messages[0].startswith("spikelm: the C++ decoding kernels: could not be built"), messages[0]


def test_the_cpp_source_is_package_data_and_names_the_build():
    from importlib import resources

    shipped = resources.files("spikelm.nn").joinpath("cpu_kernels.cpp")
    assert shipped.is_file() and shipped.read_text() == cpu_kernels.source()
    text = cpu_kernels.source()
    defined = set(re.findall(r"^[\w:<>]+ (\w+)\(", text, re.M))  # functions defined at the start of a line
    assert set(cpu_kernels.FUNCTIONS) <= defined
    # the build's name hashes the source's text: an edited source never reuses a cached build
    assert cpu_kernels.build_name(text) == cpu_kernels.build_name()
    assert cpu_kernels.build_name(text + "\n// edited\n") != cpu_kernels.build_name(text)


def test_only_the_dispatcher_reads_the_switch():
    """One place decides: the switch's variables are read in spikelm/nn/kernels.py and nowhere else in the package."""
    from pathlib import Path

    import spikelm

    root = Path(spikelm.__file__).parent
    readers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if any(name in path.read_text() for name in ('"SPIKELM_KERNELS"', '"SPIKELM_CPU_KERNELS"', '_MAX_ROWS"'))
    )
    assert readers == ["nn/kernels.py"], readers


def test_other_dtypes_take_the_gemm_with_one_notice(monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    weight, x = torch.randn(5, 7, dtype=torch.float64), sparse_rows(4, 7).double()
    with pytest.warns(RuntimeWarning, match="float32-only"):
        y = kernels.spike_linear(x, weight)
    assert torch.equal(y, F.linear(x, weight))


# ----------------------------------------------------------------------------------------------
# Decoding with the kernels on vs off
# ----------------------------------------------------------------------------------------------


def record_spikes(model):
    """Forward hooks on every elastic neuron called as a module (all of a converted model's; a native SpikeLinear's
    neuron runs inside the layer, without hooks): the spikes of each call, in order."""
    seen, handles = [], []
    for module in model.modules():
        if isinstance(module, ElasticBiSpikingNeuron):
            handles.append(module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone())))
    return seen, handles


def greedy(model, ids, on, new_tokens=24):
    kernels.set_enabled(on)
    seen, handles = record_spikes(model)
    try:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    finally:
        for h in handles:
            h.remove()
    return out, seen


def compare_decoding(model, ids, capsys):
    on, spikes_on = greedy(model, ids, True)
    off, spikes_off = greedy(model, ids, False)
    agree = int((on.sequences == off.sequences).all(0).sum()) - ids.shape[1]
    flips = sum(int((a != b).sum()) for a, b in zip(spikes_on, spikes_off, strict=False))
    total = sum(a.numel() for a in spikes_on)
    diff = max(float((a - b).abs().max()) for a, b in zip(on.logits, off.logits, strict=True))
    with capsys.disabled():
        print(
            f"\n  kernel on vs off: {agree}/{len(on.logits)} greedy tokens agree, {flips} of {total} spikes differ, "
            f"max |logit difference| {diff:.2e}"
        )
    return agree, flips, total, diff, on, off


def tiny_llama():
    return tiny_llama_model(hidden_size=256, intermediate_size=704)


@needs_kernel
def test_converted_decoding_with_the_kernel_is_close_to_the_gemm(monkeypatch, capsys):
    calls = count_calls(monkeypatch, cpu_kernels, "few_rows_linear", "few_rows_linears")
    calibration = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    model = spikify(tiny_llama(), neuron="elastic", num_steps=4, calibration=calibration)
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    agree, flips, total, diff, on, off = compare_decoding(model, ids, capsys)
    # 2 layers x 7 linears per decoding step take the kernel (4 rows each): o and down alone, q/k/v and gate/up
    # each in one call (the readers of one neuron, computed ahead)
    assert calls["few_rows_linear"] == 2 * 2 * (len(on.logits) - 1)
    assert calls["few_rows_linears"] == 2 * 2 * (len(on.logits) - 1)
    assert agree == len(on.logits)
    assert flips <= total // 1000
    if flips == 0:  # the same spikes: only the sums' order differs
        assert diff < 1e-4
    # detach (dequantize) removes the kernel's forward from the linears
    from spikelm.conversion import detach

    detach(model)
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))


@needs_kernel
def test_a_converted_checkpoint_loaded_with_from_pretrained_takes_the_kernel(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    calibration = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    spikify(tiny_llama(), neuron="elastic", num_steps=4, calibration=calibration).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    calls = count_calls(monkeypatch, cpu_kernels, "few_rows_linear", "few_rows_linears")
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    # two decoding steps after the prompt's forward pass: o, down alone; q/k/v and gate/up in one call each
    assert calls["few_rows_linear"] == 2 * 2 * 2 and calls["few_rows_linears"] == 2 * 2 * 2


@needs_kernel
def test_gif_readers_take_the_kernel_at_decoding_steps(monkeypatch, capsys):
    calls = count_calls(monkeypatch, cpu_kernels, "few_rows_linear", "few_rows_linears")
    calibration = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    model = spikify(tiny_llama(), neuron="gif", calibration=calibration)
    assert sum("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear)) == 2 * 7
    ids = torch.randint(3, 64, (1, kernels.MAX_ROWS + 1), generator=torch.Generator().manual_seed(1))  # a GEMM prompt
    agree, flips, total, diff, on, off = compare_decoding(model, ids, capsys)
    # one row per decoding step (GIF has no T copies): o, down alone; q/k/v and gate/up in one call each
    assert calls["few_rows_linear"] == 2 * 2 * (len(on.logits) - 1)
    assert calls["few_rows_linears"] == 2 * 2 * (len(on.logits) - 1)
    assert agree == len(on.logits)


@needs_kernel
def test_native_decoding_with_the_kernel_is_close_to_the_gemm(monkeypatch, capsys):
    calls = count_calls(monkeypatch, cpu_kernels, "few_rows_linear")
    torch.manual_seed(0)
    config = tiny_config(
        num_steps=4,
        hidden_size=256,
        intermediate_size=704,
        num_attention_heads=4,
        max_position_embeddings=48,
        position_embedding_type="rotary",
    )
    model = SpikeLMForCausalLM(config).eval()
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (4, 24)))  # alphas from a batch
    ids = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(2))
    agree, flips, total, diff, on, off = compare_decoding(model, ids, capsys)
    assert calls["few_rows_linear"]
    assert agree == len(on.logits)
    assert flips <= total // 1000
    if flips == 0:
        assert diff < 1e-4


def test_tensors_off_the_cpu_take_the_gemm_with_one_notice(monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    weight, x = torch.randn(5, 7, device="meta"), torch.randn(4, 7, device="meta")  # any non-CPU device
    with pytest.warns(RuntimeWarning, match="CPU-only; spiking linears on meta run on the PyTorch path"):
        y = kernels.spike_linear(x, weight)
    assert y.device.type == "meta" and y.shape == (4, 5)


# ----------------------------------------------------------------------------------------------
# The neuron and the packed K/V cache kernels: bit for bit the PyTorch paths
# ----------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("levels", ["ternary", "binary"])
@pytest.mark.parametrize("reset", ["official", "symmetric"])
@pytest.mark.parametrize("amplitude", [True, False])
@pytest.mark.parametrize("membrane", [True, False])
def test_neuron_kernel_gives_the_pytorch_loops_spikes_bit_for_bit(steps, levels, reset, amplitude, membrane):
    g = torch.Generator().manual_seed(steps * 7 + membrane)
    x = torch.randn(steps, 3, 1, 577, generator=g) * 2
    x[..., :81] = (torch.arange(-40, 41) * 0.125).float()  # exact ties of u / alpha (alpha a power of two below)
    alpha = torch.rand(steps, generator=g) + 0.1
    alpha[0] = 0.25
    readable = reference_multistep_spike(x, alpha, levels, reset, amplitude, membrane)  # the autograd definition
    loop = spike_steps_inference(x, alpha, levels, reset, amplitude, membrane)
    low, official = (-1 if levels == "ternary" else 0), levels == "ternary" and reset == "official"
    kernel = cpu_kernels.elastic_spikes(x, alpha, low, official, amplitude, membrane)
    assert kernel.shape == x.shape and kernel.dtype == torch.float32
    assert torch.equal(kernel, readable) and torch.equal(kernel, loop)
    assert torch.equal(torch.signbit(kernel), torch.signbit(loop))  # even the sign of a zero
    threads = torch.get_num_threads()
    big = torch.randn(steps, 40000, generator=g)  # split across threads
    try:
        torch.set_num_threads(2)
        assert torch.equal(
            cpu_kernels.elastic_spikes(big, alpha, low, official, amplitude, membrane),
            spike_steps_inference(big, alpha, levels, reset, amplitude, membrane),
        )
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_the_neuron_module_takes_the_kernel_only_without_gradients_on_cpu_float32(monkeypatch):
    calls = count_calls(monkeypatch, cpu_kernels, "elastic_spikes")
    neuron = ElasticBiSpikingNeuron(4)
    x = torch.randn(4, 2, 33)
    with torch.no_grad():
        fast = neuron(x)
    assert calls["elastic_spikes"] == 1
    neuron.backend = "fused"  # an explicit backend is honoured
    with torch.no_grad():
        assert torch.equal(neuron(x), fast)
    neuron.backend = "auto"
    assert torch.equal(neuron(x.clone().requires_grad_()).detach(), fast)  # training: the autograd function
    with torch.no_grad():
        neuron(x.double())  # float64: the PyTorch loop by design
        kernels.set_enabled(False)
        assert torch.equal(neuron(x), fast)
    assert calls["elastic_spikes"] == 1


def pytorch_codes(states, alpha, steps, low):
    from spikelm.conversion.cache import fold_steps_into_heads
    from spikelm.nn.packing import pack_ternary

    t_b, heads, length, width = states.shape
    q = torch.div(states.reshape(steps, t_b // steps, heads, length, width), alpha.view(-1, 1, 1, 1, 1))
    q = q.round_().clamp_(low, 1).view(t_b, heads, length, width)
    return pack_ternary(fold_steps_into_heads(q, steps).to(torch.int8), 5)


@needs_kernel
@pytest.mark.parametrize(
    ("steps", "batch", "heads", "length", "width"),
    [(4, 1, 3, 1, 64), (4, 2, 3, 5, 64), (2, 3, 2, 4, 7), (1, 1, 1, 1, 1), (3, 2, 2, 3, 11)],
)
@pytest.mark.parametrize("low", [-1, 0])
def test_cache_kernels_give_the_packing_modules_codes_and_values(steps, batch, heads, length, width, low):
    from spikelm.nn.packing import ternary_table, unpack_ternary, unpack_ternary_codes

    g = torch.Generator().manual_seed(steps * 100 + width)
    states = torch.randn(steps * batch, length, heads, width, generator=g).transpose(1, 2)  # V's strided layout
    alpha = torch.rand(steps, generator=g) + 0.2
    codes = cpu_kernels.spike_pack5(states, alpha, low)
    assert codes.dtype == torch.uint8 and codes.shape == (batch, steps * heads, length, -(-width // 5))
    assert torch.equal(codes, pytorch_codes(states, alpha, steps, low))
    # the codes hold the neuron's levels: q = clamp(round(x / alpha_t)) counted by hand for one element
    element = states[steps * batch - 1, heads - 1, length - 1, width - 1].item()
    hand = max(low, min(1, round(element / alpha[steps - 1].item())))
    assert unpack_ternary_codes(codes, width, 5)[batch - 1, steps * heads - 1, length - 1, width - 1] == hand
    values = cpu_kernels.unpack5_steps_into_batch(codes, alpha, width)
    expected = unpack_ternary(codes, ternary_table(alpha, 5, torch.float32, torch.float32), steps, width, True)
    assert values.shape == (steps * batch, heads, length, width)
    assert torch.equal(values, expected) and torch.equal(torch.signbit(values), torch.signbit(expected))


def tiny_converted(**overrides):
    calibration = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    return spikify(tiny_llama(), neuron="elastic", num_steps=4, calibration=calibration, **overrides)


@needs_kernel
def test_neuron_and_cache_kernels_leave_converted_decoding_bit_identical(monkeypatch):
    """With the linear left to MKL (max rows 0), the neuron and cache kernels on vs every kernel off: the same
    logits, bit for bit, at every decoding step (greedy, batch 2 with left padding)."""
    calls = count_calls(
        monkeypatch, cpu_kernels, "elastic_spikes", "spike_pack5", "unpack5_steps_into_batch", "few_rows_linear"
    )
    model = tiny_converted()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    monkeypatch.setenv(kernels.ROWS_ENV_VAR, "0")
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    on = model.generate(ids, **kwargs)
    assert calls.get("elastic_spikes") and calls.get("spike_pack5") and calls.get("unpack5_steps_into_batch")
    assert "few_rows_linear" not in calls
    with kernels.forced(False):
        off = model.generate(ids, **kwargs)
    assert torch.equal(on.sequences, off.sequences)
    for a, b in zip(on.logits, off.logits, strict=True):
        assert torch.equal(a, b)


@needs_kernel
def test_the_cache_kernels_step_aside_for_statistics_and_hooks(monkeypatch):
    calls = count_calls(monkeypatch, cpu_kernels, "spike_pack5")
    model = tiny_converted()
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kwargs)
    assert calls["spike_pack5"] == 2 * 2 * 2  # 2 layers x K and V x 2 decoding steps
    seen = []
    key_neuron = model.model.layers[0].self_attn.key_neuron
    handle = key_neuron.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    calls.clear()
    hooked = model.generate(ids, **kwargs)
    handle.remove()
    assert torch.equal(hooked, plain)
    assert len(seen) == 3  # the prompt and both decoding steps called the (hooked) neuron module
    assert calls["spike_pack5"] == 2 * 2  # layer 1 only: layer 0's K/V went through the PyTorch path


@needs_kernel
def test_a_float64_alpha_with_float32_input_gives_the_pytorch_loops_spikes():
    neuron = ElasticBiSpikingNeuron(4).double()  # alpha float64, input float32: the loop computes in float32
    x = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        neuron(x.double())  # alphas from a first batch
        fast = neuron(x)
        with kernels.forced(False):
            loop = neuron(x)
    assert neuron.alpha.dtype == torch.float64 and fast.dtype == torch.float32
    assert torch.equal(fast, loop)


@needs_kernel
@pytest.mark.parametrize("rows", [*range(1, 9), 9, 13, 16])
def test_few_rows_kernel_equals_the_float64_definition_bit_for_bit_on_real_sizes(rows):
    """SmolLM2-135M's shapes (576 -> 576/192/1536, 1536 -> 576): the kernel's float64 lanes and a float64 GEMM
    round the same sums: every output equal (a value within ~1e-13 of a float32 midpoint could differ; none here)."""
    gen = torch.Generator().manual_seed(rows)
    for k, n in ((576, 576), (576, 192), (576, 1536), (1536, 576), (37, 13)):
        x = torch.randn(rows, k, generator=gen)
        weight = torch.randn(n, k, generator=gen) / k**0.5
        bias = torch.randn(n, generator=gen)
        assert torch.equal(cpu_kernels.few_rows_linear(x, weight, bias), f64_linear(x, weight, bias)), (k, n)
        assert torch.equal(cpu_kernels.few_rows_linear(x, weight), f64_linear(x, weight)), (k, n)
        # the rows of a longer call: the same bits as each row alone (no dependence on the row count)
        for m in range(rows):
            assert torch.equal(
                cpu_kernels.few_rows_linear(x[m : m + 1], weight, bias)[0], f64_linear(x, weight, bias)[m]
            )
