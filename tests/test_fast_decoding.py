"""The fast CPU decoding of the per-token code recipes (GIF, the default; signed) computes what the readable path does.

* The C++ pass of a neuron (``token_codes``: ranges per group, rounding, clamping, the saliency split and the
  dequantised value in one call) against the neuron's own PyTorch quantiser, bit for bit: codes, scales, zero points
  and the values its readers get, on inputs full of exact ties (values on a grid, constant tokens, empty groups).
* The cache's bit planes written by ``pack_bit_planes`` against :func:`spikelm.nn.packing.pack_bits`.
* The decoded copy the cache keeps (one token appended per step) against decoding every stored code.
* The real SmolLM2-135M (slow): kernels on and off give the same logits bit for bit, prefill and every decoding step,
  and cached greedy decoding equals uncached greedy decoding.
"""

from __future__ import annotations

import pytest
import torch

from spikelm.nn import cpu_kernels
from spikelm.nn import kernels as dispatcher
from spikelm.nn.neurons.gif import GIFNeuron
from spikelm.nn.neurons.signed import SignedNeuron
from spikelm.nn.packing import pack_bits

pytestmark = pytest.mark.skipif(cpu_kernels.kernel() is None, reason="the C++ kernels cannot be built here")


def tie_heavy(shape, seed: int) -> torch.Tensor:
    """Random tokens, a third of them on a grid of 1/8 (exact ties at rounding midpoints), one constant token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * (torch.rand(shape[-1], generator=g) * 4 + 0.1)
    flat = x.view(-1, shape[-1])
    flat[::3] = torch.round(flat[::3] * 8) / 8
    flat[1] = 0.75  # min == max: the scale floor
    return x


def pytorch_path(neuron, x):
    with dispatcher.forced(False), torch.no_grad():
        return neuron(x), neuron.quantize(x)


def salient_mask(shape, fraction: float, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < fraction


GIF_CASES = [
    dict(group_size=64, clip_ratio=0.9, fraction=0.1),  # the GIF recipe
    dict(group_size=8, clip_ratio=1.0, fraction=0.3),
    dict(group_size=0, clip_ratio=0.9, fraction=0.1),  # one range per channel set
    dict(group_size=0, clip_ratio=1.0, fraction=0.0),  # no saliency: one range per token
    dict(group_size=64, clip_ratio=0.9, fraction=1.0),  # every channel salient: the coarse groups empty
]


@pytest.mark.parametrize("case", GIF_CASES)
@pytest.mark.parametrize("channels", [(576,), (3, 1, 64)])
def test_gif_cpp_pass_equals_the_neurons_quantiser(case, channels):
    neuron = GIFNeuron(channels, 4, 1, case["fraction"], clip_ratio=case["clip_ratio"], group_size=case["group_size"])
    neuron.set_salient(
        salient_mask(channels, case["fraction"], 1) if case["fraction"] < 1 else torch.ones(channels, dtype=torch.bool)
    )
    x = tie_heavy((2, 3, 7, 64) if len(channels) == 3 else (2, 5, 576), seed=2)
    expected, (code, scale, zero) = pytorch_path(neuron, x)
    with dispatcher.forced(True), torch.no_grad():
        fast = neuron.fused_codes(x, want_code=True)
        out = neuron(x)
    assert fast is not None
    assert torch.equal(fast[1], code) and torch.equal(fast[2], scale) and torch.equal(fast[3], zero)
    assert torch.equal(fast[0], expected) and torch.equal(out, expected)
    # independently of the neuron's code: x_hat is (code - zero of its group) * scale of its group
    groups = neuron.code_plan()[0].long()
    index = torch.broadcast_to(groups.view(*channels[:-1], channels[-1]) if len(channels) == 3 else groups[0], x.shape)
    assert torch.equal(fast[0], (code - zero.gather(-1, index)) * scale.gather(-1, index))


def test_gif_whole_token_ranges_keep_the_pytorch_path():
    neuron = GIFNeuron(64, 4, 1, 0.2, group_range="token")
    neuron.set_salient(salient_mask((64,), 0.2, 3))
    x = tie_heavy((4, 64), seed=4)
    with dispatcher.forced(True), torch.no_grad():
        assert neuron.fused_codes(x) is None
        out = neuron(x)
    assert torch.equal(out, pytorch_path(neuron, x)[0])


def test_autograd_and_statistics_keep_the_pytorch_path():
    neuron = GIFNeuron(64, 4, 1, 0.2, group_size=16)
    neuron.set_salient(salient_mask((64,), 0.2, 5))
    x = tie_heavy((4, 64), seed=6).requires_grad_(True)
    with dispatcher.forced(True):
        assert neuron.fused_codes(x) is None
        out = neuron(x)
        out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # the straight-through gradient
    assert torch.equal(out.detach(), pytorch_path(neuron, x.detach())[0])


@pytest.mark.parametrize("dead_zone", [0.0, 0.7])
@pytest.mark.parametrize("learn_scale", [False, True])
@pytest.mark.parametrize("channels", [(576,), (3, 1, 64)])
def test_signed_cpp_pass_equals_the_neurons_quantiser(dead_zone, learn_scale, channels):
    neuron = SignedNeuron(channels, 4, 1, 64, 0.9, dead_zone, 6, 0.1, learn_scale=learn_scale)
    neuron.set_salient(salient_mask(channels, 0.1, 7))
    if learn_scale:
        with torch.no_grad():
            neuron.scale_factor.copy_(torch.tensor([0.93, 1.07]))
    x = tie_heavy((2, 3, 7, 64) if len(channels) == 3 else (2, 5, 576), seed=8)
    expected, (code, scale) = pytorch_path(neuron, x)
    with dispatcher.forced(True), torch.no_grad():
        fast = neuron.fused_codes(x, want_code=True)
        out = neuron(x)
    assert fast is not None and fast[3] is None
    assert torch.equal(fast[1], code) and torch.equal(fast[2], scale)
    assert torch.equal(fast[0], expected) and torch.equal(out, expected)
    top = neuron.code_plan()[1]
    assert int(code.abs().max()) <= int(top.max())


def test_the_kernels_switch_turns_the_cpp_pass_off():
    neuron = GIFNeuron(64, 4, 1, 0.2, group_size=16)
    x = tie_heavy((4, 64), seed=9)
    with dispatcher.forced(False):
        assert neuron.fused_codes(x) is None


@pytest.mark.parametrize("bits", [1, 5, 6, 9])
def test_pack_bit_planes_equals_pack_bits(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 61), generator=g, dtype=torch.int32)
    assert torch.equal(cpu_kernels.pack_bit_planes(codes, bits), pack_bits(codes, bits).flatten(-2))


@pytest.mark.parametrize("offset", [0, 15])
def test_token_codes_packs_the_codes_as_pack_bits_does(offset):
    neuron = GIFNeuron((3, 1, 64), 4, 1, 0.1, clip_ratio=0.9, group_size=64)
    neuron.set_salient(salient_mask((3, 1, 64), 0.1, 12))
    x = tie_heavy((2, 3, 5, 64), seed=13)
    with dispatcher.forced(True), torch.no_grad():
        plain = neuron.fused_codes(x, want_code=True)
        packed = neuron.fused_codes(x, want_code=True, pack_bits=6, code_offset=offset)
    assert torch.equal(packed.code, pack_bits(plain.code + offset, 6).flatten(-2))
    assert torch.equal(packed.x_hat, plain.x_hat) and torch.equal(packed.grid, plain.grid)


@pytest.mark.parametrize("neuron_name", ["gif", "signed"])
def test_the_kept_decoded_cache_equals_decoding_every_stored_code(neuron_name):
    from spikelm.conversion.cache import GIFCodeLayer, SignedCodeLayer

    if neuron_name == "gif":
        make = lambda: GIFNeuron((3, 1, 64), 4, 1, 0.1, clip_ratio=0.9, group_size=64)  # noqa: E731
        layer_class = GIFCodeLayer
    else:
        make = lambda: SignedNeuron((3, 1, 64), 4, 1, 64, 1.0, 0.0, 5, 0.1)  # noqa: E731
        layer_class = SignedCodeLayer
    key_neuron, value_neuron = make(), make()
    key_neuron.set_salient(salient_mask((3, 1, 64), 0.1, 10))
    value_neuron.set_salient(salient_mask((3, 1, 64), 0.1, 11))
    fast, slow = layer_class(key_neuron, value_neuron), layer_class(key_neuron, value_neuron)
    with torch.no_grad():
        for step, length in enumerate((9, 1, 1, 3, 1) * 14):  # past the first capacities (64, 96, 144)
            k, v = tie_heavy((1, 3, length, 64), seed=20 + step), tie_heavy((1, 3, length, 64), seed=90 + step)
            with dispatcher.forced(True):
                keys, values = fast.update(k, v)
            with dispatcher.forced(False):
                slow_keys, slow_values = slow.update(k, v)
            assert keys.dtype == torch.float64  # the attention's accumulation type: nothing to convert per step
            assert torch.equal(keys, slow_keys.double()) and torch.equal(values, slow_values.double())
            assert torch.equal(fast.keys, slow.keys) and torch.equal(fast.key_grid, slow.key_grid)
            assert torch.equal(fast.values, slow.values) and torch.equal(fast.value_grid, slow.value_grid)
        held = fast.held_bytes()
        assert held["decoded"] >= 2 * keys.numel() * 8 and held["codes"] < held["decoded"]
        fast.crop(-2)  # the decoded copy is dropped and rebuilt from the codes
        slow.crop(-2)
        k, v = tie_heavy((1, 3, 1, 64), seed=1), tie_heavy((1, 3, 1, 64), seed=2)
        with dispatcher.forced(True):
            keys, values = fast.update(k, v)
        with dispatcher.forced(False):
            slow_keys, slow_values = slow.update(k, v)
        assert torch.equal(keys, slow_keys.double()) and torch.equal(values, slow_values.double())


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M
# ----------------------------------------------------------------------------------------------


def _real_source():
    from spikelm.data.pretrained import ModelSourceError, resolve_model_source

    try:
        path = resolve_model_source("smollm2-135m")
    except ModelSourceError:
        return None
    return path if (path / "config.json").exists() else None


@pytest.fixture(scope="module", params=["gif", "signed"])
def real_converted(request):
    source = _real_source()
    if source is None:
        pytest.skip("SmolLM2-135M is not in the local cache")
    from transformers import AutoModelForCausalLM

    from spikelm.conversion import spikify
    from spikelm.conversion.recipes import recipe

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    calibration = [torch.randint(3, 49152, (2, 128), generator=torch.Generator().manual_seed(5))]
    return spikify(model, recipe(request.param), calibration=calibration)


@pytest.mark.slow
def test_real_smollm2_kernels_on_and_off_give_the_same_logits_bit_for_bit(real_converted):
    ids = torch.randint(3, 49152, (1, 40), generator=torch.Generator().manual_seed(6))
    settings = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    runs = {}
    for kernels in (True, False):
        with dispatcher.forced(kernels), torch.no_grad():
            prefill = real_converted(ids, use_cache=False).logits
            out = real_converted.generate(ids, return_dict_in_generate=True, output_logits=True, **settings)
        runs[kernels] = prefill, out
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1].sequences, runs[False][1].sequences)
    for on, off in zip(runs[True][1].logits, runs[False][1].logits, strict=True):
        assert torch.equal(on, off)


@pytest.mark.slow
def test_real_smollm2_cached_greedy_equals_uncached_greedy(real_converted):
    ids = torch.randint(3, 49152, (1, 24), generator=torch.Generator().manual_seed(7))
    settings = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    with dispatcher.forced(True), torch.no_grad():
        cached = real_converted.generate(ids, **settings)
        uncached = real_converted.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_a_cache_filled_under_inference_mode_keeps_decoding_outside_it():
    from spikelm.conversion.cache import GIFCodeLayer

    neurons = [GIFNeuron((3, 1, 64), 4, 1, 0.1, clip_ratio=0.9, group_size=64) for _ in range(2)]
    fast, slow = GIFCodeLayer(*neurons), GIFCodeLayer(*neurons)
    prompt, step = tie_heavy((1, 3, 5, 64), seed=30), tie_heavy((1, 3, 1, 64), seed=31)
    with dispatcher.forced(True):
        with torch.inference_mode():
            fast.update(prompt, prompt)
        with torch.no_grad():
            keys, _ = fast.update(step, step)
    with dispatcher.forced(False), torch.no_grad():
        slow.update(prompt, prompt)
        slow_keys, _ = slow.update(step, step)
    assert torch.equal(keys, slow_keys.double())


def test_a_build_without_avx512_is_announced_once(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "has_avx512", lambda: False)
    monkeypatch.setattr(dispatcher, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no AVX-512 on this CPU or compiler") as caught:
        assert dispatcher.cpp_built()
        assert dispatcher.cpp_built()
    assert len([w for w in caught if "AVX-512" in str(w.message)]) == 1
