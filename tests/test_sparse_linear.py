"""The sparse-input linear kernel (spikelm/nn/sparse_linear.py): against F.linear (close on random sparse inputs,
equal where float sums are exact), its dispatch and switch, the fallback notice, and decoding with it on vs off
(native SpikeLM and a converted tiny LLaMA: logits close, spikes and greedy tokens counted)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_llama_model

from spikelm import SpikeLMForCausalLM
from spikelm.conversion import spikify
from spikelm.errors import UserError
from spikelm.nn import sparse_linear
from spikelm.nn.neuron import ElasticBiSpikingNeuron

needs_kernel = pytest.mark.skipif(sparse_linear.kernel() is None, reason="the extension cannot be built here")


@pytest.fixture(autouse=True)
def _switch_follows_environment(monkeypatch):
    monkeypatch.delenv(sparse_linear.ENV_VAR, raising=False)
    monkeypatch.delenv(sparse_linear.ROWS_ENV_VAR, raising=False)
    sparse_linear.set_enabled(None)
    yield
    sparse_linear.set_enabled(None)


def sparse_rows(rows, features, density=0.3, zero_rows=(), zero_cols=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g) * (torch.rand(rows, features, generator=g) < density)
    for r in zero_rows:
        x[r] = 0
    for c in zero_cols:
        x[:, c] = 0
    return x


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16, 33, 64])
@pytest.mark.parametrize(("k", "n"), [(37, 29), (576, 193), (130, 1031)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_is_close_to_f_linear_on_sparse_inputs(rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    weight = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = sparse_rows(rows, k, zero_rows=[0] if rows > 1 else [], zero_cols=range(0, k, 3), seed=rows)
    y = sparse_linear.sparse_input_linear(x, weight, b)
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
        one = sparse_linear.sparse_input_linear(x, weight, bias)
        torch.set_num_threads(3)
        three = sparse_linear.sparse_input_linear(x, weight, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)  # each output's sum runs in the same order whatever thread computes it
    torch.testing.assert_close(three, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_kernel_equals_f_linear_where_float_sums_are_exact():
    # small integers: every partial sum is an integer below 2**24, so any order of the sums gives the same float
    g = torch.Generator().manual_seed(3)
    weight = torch.randint(-8, 9, (211, 97), generator=g).float()
    bias = torch.randint(-8, 9, (211,), generator=g).float()
    x = torch.randint(-1, 2, (4, 97), generator=g).float() * 3.0  # ternary spikes times alpha = 3
    assert torch.equal(sparse_linear.sparse_input_linear(x, weight, bias), F.linear(x, weight, bias))
    hand = [sum(x[0, k].item() * weight[5, k].item() for k in range(97)) + bias[5].item()]
    assert sparse_linear.sparse_input_linear(x, weight, bias)[0, 5].item() == hand[0]


@needs_kernel
def test_kernel_keeps_leading_dimensions_and_follows_in_place_weight_changes():
    weight = torch.randn(24, 16)
    x = sparse_rows(6, 16).view(2, 3, 16)
    torch.testing.assert_close(sparse_linear.sparse_input_linear(x, weight), F.linear(x, weight))
    before = sparse_linear.transposed_bytes()
    assert before >= 24 * 16 * 4
    with torch.no_grad():
        weight.mul_(-2.0)  # the transposed copy is rebuilt, not reused
    torch.testing.assert_close(sparse_linear.sparse_input_linear(x, weight), F.linear(x, weight))


@needs_kernel
def test_dispatch_takes_the_kernel_for_few_rows_only_and_not_under_autograd_or_when_off(monkeypatch):
    calls = []
    real = sparse_linear.sparse_input_linear
    monkeypatch.setattr(sparse_linear, "sparse_input_linear", lambda *a: calls.append(1) or real(*a))
    weight, bias = torch.randn(10, 8), torch.randn(10)
    few = sparse_rows(sparse_linear.MAX_ROWS, 8)
    many = sparse_rows(sparse_linear.MAX_ROWS + 1, 8)
    torch.testing.assert_close(sparse_linear.spike_linear(few, weight, bias), F.linear(few, weight, bias))
    assert len(calls) == 1
    assert torch.equal(sparse_linear.spike_linear(many, weight, bias), F.linear(many, weight, bias))
    w = weight.clone().requires_grad_()
    assert sparse_linear.spike_linear(few, w, bias).requires_grad  # autograd: the GEMM, differentiable
    with torch.no_grad():
        sparse_linear.spike_linear(few, w, bias)
    assert len(calls) == 2
    sparse_linear.set_enabled(False)
    assert torch.equal(sparse_linear.spike_linear(few, weight, bias), F.linear(few, weight, bias))
    sparse_linear.set_enabled(None)
    monkeypatch.setenv(sparse_linear.ENV_VAR, "0")
    assert torch.equal(sparse_linear.spike_linear(few, weight, bias), F.linear(few, weight, bias))
    assert len(calls) == 2
    monkeypatch.setenv(sparse_linear.ENV_VAR, "1")
    monkeypatch.setenv(sparse_linear.ROWS_ENV_VAR, str(sparse_linear.MAX_ROWS + 1))  # the threshold moved
    torch.testing.assert_close(sparse_linear.spike_linear(many, weight, bias), F.linear(many, weight, bias))
    assert len(calls) == 3


def test_a_bad_switch_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(sparse_linear.ENV_VAR, "maybe")
    with pytest.raises(UserError, match="SPIKELM_SPARSE_LINEAR"):
        sparse_linear.enabled()
    monkeypatch.setenv(sparse_linear.ROWS_ENV_VAR, "-3")
    with pytest.raises(UserError, match="SPIKELM_SPARSE_LINEAR_MAX_ROWS='-3'"):
        sparse_linear.max_rows()
    with pytest.raises(TypeError):
        sparse_linear.set_enabled("yes")


def test_a_kernel_that_cannot_be_built_falls_back_to_the_gemm_with_one_notice(monkeypatch):
    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(sparse_linear, "_build", broken)
    monkeypatch.setattr(sparse_linear, "_module", [])
    monkeypatch.setattr(sparse_linear, "_build_error", [])
    monkeypatch.setattr(sparse_linear, "_warned", set())
    weight, x = torch.randn(5, 7), sparse_rows(4, 7)
    with pytest.warns(RuntimeWarning, match="could not be built .*no compiler here.* GEMM"):
        y = sparse_linear.spike_linear(x, weight)
    assert torch.equal(y, F.linear(x, weight))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not on every call
        assert torch.equal(sparse_linear.spike_linear(x, weight), F.linear(x, weight))


def test_other_dtypes_take_the_gemm_with_one_notice(monkeypatch):
    monkeypatch.setattr(sparse_linear, "_warned", set())
    weight, x = torch.randn(5, 7, dtype=torch.float64), sparse_rows(4, 7).double()
    with pytest.warns(RuntimeWarning, match="float32-only"):
        y = sparse_linear.spike_linear(x, weight)
    assert torch.equal(y, F.linear(x, weight))


# ----------------------------------------------------------------------------------------------
# Decoding with the kernel on vs off
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
    sparse_linear.set_enabled(on)
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
    calls = []
    real = sparse_linear.sparse_input_linear
    monkeypatch.setattr(sparse_linear, "sparse_input_linear", lambda *a: calls.append(1) or real(*a))
    calibration = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    model = spikify(tiny_llama(), neuron="elastic", num_steps=4, calibration=calibration)
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    agree, flips, total, diff, on, off = compare_decoding(model, ids, capsys)
    # 2 layers x 7 linears (q, k, v, o, gate, up, down) per decoding step take the kernel (4 rows each)
    assert len(calls) == 2 * 7 * (len(on.logits) - 1)
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
    calls = []
    real = sparse_linear.sparse_input_linear
    monkeypatch.setattr(sparse_linear, "sparse_input_linear", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == 2 * 7 * 2  # two decoding steps after the prompt's forward pass


@needs_kernel
def test_gif_readers_keep_the_gemm():
    calibration = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))
    model = spikify(tiny_llama(), neuron="gif", calibration=calibration)
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))


@needs_kernel
def test_native_decoding_with_the_kernel_is_close_to_the_gemm(monkeypatch, capsys):
    calls = []
    real = sparse_linear.sparse_input_linear
    monkeypatch.setattr(sparse_linear, "sparse_input_linear", lambda *a: calls.append(1) or real(*a))
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
    assert calls
    assert agree == len(on.logits)
    assert flips <= total // 1000
    if flips == 0:
        assert diff < 1e-4


def test_tensors_off_the_cpu_take_the_gemm_with_one_notice(monkeypatch):
    monkeypatch.setattr(sparse_linear, "_warned", set())
    weight, x = torch.randn(5, 7, device="meta"), torch.randn(4, 7, device="meta")  # any non-CPU device
    with pytest.warns(RuntimeWarning, match="CPU-only; spiking linears on meta use the GEMM"):
        y = sparse_linear.spike_linear(x, weight)
    assert y.device.type == "meta" and y.shape == (4, 5)
