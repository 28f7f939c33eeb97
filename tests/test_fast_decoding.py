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

import warnings

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


@pytest.mark.parametrize("channels", [(576,), (8,)])
def test_signed_cpp_pass_lets_outlier_tokens_through_as_the_readable_path(channels):
    """The outlier-token rule (a token whose max |x| exceeds the calibrated threshold passes real-valued) runs in
    the same C++ pass: the neuron's value equals the PyTorch path's, and the rows that pass are the input's own."""
    width = channels[0]
    neuron = SignedNeuron(channels, 4, 1, 64, 1.0, 0.0, 5, 0.1, outlier_ratio=4.0)
    neuron.set_salient(salient_mask(channels, 0.1, 3))
    x = tie_heavy((3, 6, width), seed=12)
    peaks = x.abs().amax(-1)
    threshold = float(peaks.median())  # about half the tokens pass
    x.view(-1, width)[4, 2] = threshold  # max |x| == threshold: not above it, the token is coded
    x.view(-1, width)[4].clamp_(-threshold, threshold)
    neuron.outlier_threshold.fill_(threshold)
    expected, _ = pytorch_path(neuron, x)
    with dispatcher.forced(True), torch.no_grad():
        out = neuron(x)
        coded = neuron.fused_codes(x)[0]  # without the rule: every token coded
    assert torch.equal(out, expected)
    passing = x.abs().amax(-1) > torch.tensor(threshold, dtype=torch.float32)  # a hand comparison, not the neuron's
    assert 0 < int(passing.sum()) < passing.numel() and not bool(passing.view(-1)[4])
    assert torch.equal(out[passing], x[passing]) and torch.equal(out[~passing], coded[~passing])
    neuron.outlier_threshold.fill_(2 * float(peaks.max()))  # a new calibration is read at the next call
    with dispatcher.forced(True), torch.no_grad():
        assert torch.equal(neuron(x), coded)


@pytest.mark.parametrize("size", [1536, 1024, 64, 12, 40])
def test_the_cpp_online_hadamard_equals_its_float64_products(size):
    """The C++ online Hadamard of a decoding step's rows (its ATen operations called from C++) equals the PyTorch
    path bit for bit on the same rows (values on a grid included, where float64 sums cancel), and is the rotation
    (against the dense matrix of rotation_matrix, an independent product, within float32 rounding)."""
    from spikelm.conversion.rotation import OnlineHadamard, rotation_matrix

    rotation = OnlineHadamard(size, seed=3)
    assert rotation.kind == "hadamard"
    dense, _ = rotation_matrix(size, "hadamard", 3)
    g = torch.Generator().manual_seed(size)
    x = torch.randn(64, 1, size, generator=g) * torch.rand(64, 1, 1, generator=g) * 20
    x[::5] = torch.round(x[::5] * 4) / 4
    with torch.no_grad():
        with dispatcher.forced(True):
            assert dispatcher.rotation_kernel(x[:16]) == dispatcher.CPP
            assert dispatcher.rotation_kernel(x) == dispatcher.PYTORCH  # a prefill's many rows: MKL's products
            fast = [rotation(x[i : i + 4]) for i in range(0, 64, 4)] + [rotation(x[5:6, 0])]
        with dispatcher.forced(False):
            slow = [rotation(x[i : i + 4]) for i in range(0, 64, 4)] + [rotation(x[5:6, 0])]
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(torch.cat(fast[:-1]), (x.double() @ dense).float(), rtol=1e-5, atol=1e-5)


def test_the_cpp_decoding_step_attention_equals_exact_attention():
    """One query per head against the cache's float64 K/V (views of a larger buffer, as the cache returns them),
    with no mask, a bool mask, an additive mask and a softcap: the C++ call equals exact_attention bit for bit."""
    from spikelm.conversion.attention import spiking_attention
    from spikelm.nn.exact import exact_attention

    g = torch.Generator().manual_seed(4)
    for case in range(12):
        batch, heads, kv_heads, dim = (1, 9, 3, 64) if case % 2 else (2, 4, 2, 16)
        length = [1, 5, 64, 200][case % 4]
        buffer = (torch.randn(2, batch, kv_heads, length + 9, dim, generator=g) * 2).float().double()
        key, value = buffer[0, :, :, :length], buffer[1, :, :, :length]
        value[..., ::3, :] = torch.round(value[..., ::3, :] * 8) / 8
        query = torch.randn(batch, heads, 1, dim, generator=g)
        mask = [None, torch.rand(batch, 1, 1, length, generator=g) > 0.3, None][case % 3]
        if case % 3 == 2:
            mask = (torch.randn(batch, heads, 1, length, generator=g) * 3).clamp_max(0.0)
        if case == 4:
            mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool)  # every key masked: zeros
        softcap = 20.0 if case % 5 == 0 else None
        expected = exact_attention(query, key, value, mask, None, False, softcap).transpose(1, 2)
        with dispatcher.forced(True), torch.no_grad():
            assert dispatcher.attention_kernel(query, key, value) == dispatcher.CPP
            assert dispatcher.attention_kernel(query, key.float(), value.float()) == dispatcher.PYTORCH
            module = torch.nn.Module()
            out, _ = spiking_attention(module, query, key, value, mask, softcap=softcap)
        assert torch.equal(out, expected)
        if case == 4:
            assert not bool(out.any())


# The orders the hand-written loops reproduce were measured on this project's machine (an Intel CPU with AVX-512,
# PyTorch's MKL); elsewhere the dispatcher's check may rightly refuse them (tested below with a forced refusal).
MEASURED_MACHINE = (
    torch.backends.mkl.is_available() and cpu_kernels.has_avx512() and "Intel" in cpu_kernels._cpu_signature()
)
on_measured_machine = pytest.mark.skipif(not MEASURED_MACHINE, reason="MKL's orders were measured on Intel AVX-512")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns (signed zeros and NaN payloads told apart, which == does not)."""
    return t.contiguous().view({4: torch.int32, 8: torch.int64}[t.element_size()])


def wide_range(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """randn * exp(3 randn) (values over many binades, where a sum's order shows in its last bit), a quarter of the
    entries on a grid of 1/4, some exact zeros and one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp(
        3 * torch.randn(shape, generator=g, dtype=torch.float64)
    )
    flat = x.view(-1, shape[-1])
    flat[:, ::4] = torch.round(flat[:, ::4] * 4) / 4
    flat[:, 1::7] = 0.0
    flat[-1] = 0.0
    return x.to(dtype)


@on_measured_machine
@pytest.mark.parametrize("size", [1536, 576, 1024, 40, 12, 128, 256])
@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (4, 1), (16,), (3, 5, 1)])
def test_the_hand_written_hadamard_equals_the_readable_path_bit_for_bit(size, lead):
    """The C++ loops (one fused multiply-add chain per output; a single factor of 128 or more on one row, MKL's
    matrix-vector product, in two halves on two threads) against OnlineHadamard.forward with the kernels off:
    the same float32 bits, and the same float64 product before the rounding as the ATen operations (decisive: another
    summation order differs in hundreds of the float64 outputs)."""
    from spikelm.conversion.rotation import OnlineHadamard, _online_operands

    rotation = OnlineHadamard(size, seed=5)
    signs, mats = _online_operands(rotation.kind, size, 5, "cpu", torch.float64)
    for seed in range(3):
        x = wide_range((*lead, size), seed=size + seed)
        with torch.no_grad():
            with dispatcher.forced(True):
                assert dispatcher.rotation_kernel(x) == dispatcher.CPP and dispatcher.rotation_loops(x, signs, mats)
                fast = rotation(x)
            with dispatcher.forced(False):
                slow = rotation(x)
        assert torch.equal(bits(fast), bits(slow))
        loops = dispatcher.rotation_loops(x, signs, mats)
        hand = cpu_kernels.online_hadamard(x, signs, mats, hand=loops, keep_double=True)
        aten = cpu_kernels.online_hadamard(x, signs, mats, keep_double=True)
        assert torch.equal(bits(hand), bits(aten))


@on_measured_machine
@pytest.mark.parametrize("threads", [1, 2])
def test_a_one_row_single_factor_hadamard_takes_the_loops_at_each_thread_count(threads):
    """MKL sums a one-row product by a single factor (128 x 128 here) as a matrix-vector product: one chain on one
    thread, two halves on two; the check finds the loop that matches at each thread count (never the fallback)."""
    from spikelm.conversion.rotation import OnlineHadamard, _online_operands

    rotation = OnlineHadamard(128, seed=1)
    signs, mats = _online_operands(rotation.kind, 128, 1, "cpu", torch.float64)
    x = wide_range((1, 1, 128), seed=11)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            with dispatcher.forced(True):
                assert dispatcher.rotation_loops(x, signs, mats) == (2 if threads > 1 else 1)
                fast = rotation(x)
            with dispatcher.forced(False):
                slow = rotation(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(bits(fast), bits(slow))


def _attention_case(batch, kv_heads, groups, dim, length, seed, mask_kind):
    g = torch.Generator().manual_seed(seed)
    buffer = wide_range((2, batch, kv_heads, length + 5, dim), seed, torch.float64) * 0.1
    buffer[1] = torch.randn(buffer[1].shape, generator=g, dtype=torch.float64)
    buffer[1, ..., ::3, :] = torch.round(buffer[1, ..., ::3, :] * 8) / 8  # values on a grid
    key, value = buffer[0, :, :, :length], buffer[1, :, :, :length]  # views of a larger buffer, as the cache's
    query = torch.randn(batch, kv_heads * groups, 1, dim, generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, 1, length, generator=g) > 0.3
        mask[0] = False  # a row with every key masked: zeros
    elif mask_kind == "additive":
        mask = (torch.randn(batch, kv_heads * groups, 1, length, generator=g) * 3).clamp_max(0.0)
    return query, key, value, mask


ATTENTION_SETTINGS = [(1, 3, 3, 64), (2, 2, 2, 16), (1, 3, 1, 64), (1, 2, 4, 32)]


@on_measured_machine
@pytest.mark.parametrize("setting", ATTENTION_SETTINGS)
@pytest.mark.parametrize("length", [1, 2, 3, 7, 64, 255, 384, 385, 512, 513, 1000, 1056, 2048, 4100])
def test_the_hand_written_attention_equals_exact_attention_bit_for_bit(setting, length):
    """The C++ loops of a decoding step's attention (the scores and probs @ V in MKL's summation orders, its blocks
    over the keys included) against exact_attention, the readable path: the same float32 bits, with no mask, a bool
    mask (a fully masked row), an additive mask and a softcap, grouped query heads, cache lengths across ATen's small
    loop, one chain and MKL's blocks; and the same float64 output before the rounding as the ATen operations."""
    from spikelm.conversion.attention import spiking_attention
    from spikelm.nn.exact import exact_attention

    batch, kv_heads, groups, dim = setting
    for case, (mask_kind, softcap) in enumerate([(None, None), ("bool", None), ("additive", 30.0)]):
        query, key, value, mask = _attention_case(batch, kv_heads, groups, dim, length, length + case, mask_kind)
        expected = exact_attention(query, key, value, mask, None, False, softcap).transpose(1, 2)
        with dispatcher.forced(True), torch.no_grad():
            assert dispatcher.attention_kernel(query, key, value) == dispatcher.CPP
            found = dispatcher.attention_order(query, key, value)
            assert found is not None
            out, _ = spiking_attention(torch.nn.Module(), query, key, value, mask, softcap=softcap)
        assert torch.equal(bits(out), bits(expected))
        order, block = found
        scale = dim**-0.5
        hand = cpu_kernels.one_query_attention(
            query, key, value, mask, scale, softcap, order=order, block=block, keep_double=True
        )
        aten = cpu_kernels.one_query_attention(query, key, value, mask, scale, softcap, keep_double=True)
        assert torch.equal(bits(hand), bits(aten))
        if mask_kind == "bool":
            assert not bool(out[0].any())


@on_measured_machine
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_the_hand_written_attention_at_batch_sizes(batch):
    from spikelm.nn.exact import exact_attention

    for length in (3, 200, 769):
        query, key, value, mask = _attention_case(batch, 3, 3, 64, length, batch + length, "bool")
        expected = exact_attention(query, key, value, mask).transpose(1, 2)
        order, block = dispatcher.attention_order(query, key, value)
        out = cpu_kernels.one_query_attention(query, key, value, mask, 0.125, order=order, block=block)
        assert torch.equal(bits(out), bits(expected))


def test_another_summation_order_is_caught_by_one_probe():
    """The dispatcher's check is decisive: each order other than the one it found differs from the ATen operations
    in many float64 outputs of one random probe (of 9 rows x 64 outputs)."""
    g = torch.Generator().manual_seed(7)
    key, value = torch.randn(2, 1, 3, 1001, 64, generator=g, dtype=torch.float64)
    query = torch.randn(1, 9, 1, 64, generator=g)
    found = dispatcher.attention_order(query, key, value)
    aten = cpu_kernels.one_query_attention(query, key, value, None, 0.125, keep_double=True)
    others = [pair for pair in dispatcher._attention_candidates(3, 64) if pair != found]
    assert len(others) >= 4
    for order, block in others:
        hand = cpu_kernels.one_query_attention(
            query, key, value, None, 0.125, order=order, block=block, keep_double=True
        )
        assert int((hand != aten).sum()) > 100, (order, block)


def _perturbed(function, flag):
    """``function`` whose hand-written results are one ulp off (as another BLAS's order would leave them)."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(kwargs.get(flag))
        out = function(*args, **kwargs)
        if (flag == "hand" and kwargs.get(flag)) or (flag == "block" and kwargs.get(flag) is not None):  # the loops
            out = torch.nextafter(out, torch.full_like(out, float("inf")))
        return out

    return wrapper, calls


def test_a_failed_order_check_runs_the_aten_operations_announced_once(monkeypatch):
    """Where the loops do not reproduce the BLAS's bits (forced here: their results nudged by one ulp), the check
    says so in one line, once, and the C++ calls run the ATen operations: still the readable path's bits."""
    from spikelm.conversion.attention import spiking_attention
    from spikelm.conversion.rotation import OnlineHadamard
    from spikelm.nn.exact import exact_attention

    monkeypatch.setattr(dispatcher, "_warned", set())
    monkeypatch.setattr(dispatcher, "_rotation_orders", {})
    monkeypatch.setattr(dispatcher, "_attention_orders", {})
    hadamard, hadamard_calls = _perturbed(cpu_kernels.online_hadamard, "hand")
    attention, attention_calls = _perturbed(cpu_kernels.one_query_attention, "block")
    monkeypatch.setattr(cpu_kernels, "online_hadamard", hadamard)
    monkeypatch.setattr(cpu_kernels, "one_query_attention", attention)
    rotation = OnlineHadamard(1536, seed=2)
    x = wide_range((1, 1, 1536), seed=3)
    query, key, value, mask = _attention_case(1, 3, 3, 64, 300, 4, "bool")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dispatcher.forced(True), torch.no_grad():
            fast = [rotation(x), rotation(x)]
            outs = [spiking_attention(torch.nn.Module(), query, key, value, mask)[0] for _ in range(2)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages  # one line each, not one per call
    assert all("\n" not in m and "do not sum as this machine's float64 matmul does" in m for m in messages)
    assert messages[0].startswith("spikelm: the C++ online Hadamard's own loops")
    assert messages[1].startswith("spikelm: the C++ decoding-step attention's own loops")
    assert hadamard_calls[-2:] == [False, False] and attention_calls[-2:] == [None, None]  # the ATen operations
    with dispatcher.forced(False), torch.no_grad():
        slow = rotation(x)
    expected = exact_attention(query, key, value, mask).transpose(1, 2)
    assert all(torch.equal(bits(f), bits(slow)) for f in fast)
    assert all(torch.equal(bits(o), bits(expected)) for o in outs)


def test_a_head_size_the_loops_do_not_cover_runs_the_aten_operations_announced(monkeypatch):
    from spikelm.conversion.attention import spiking_attention
    from spikelm.nn.exact import exact_attention

    monkeypatch.setattr(dispatcher, "_warned", set())
    monkeypatch.setattr(dispatcher, "_attention_orders", {})
    query, key, value, mask = _attention_case(1, 3, 3, 20, 50, 8, "additive")
    with pytest.warns(RuntimeWarning, match="multiples of 8, not 20"), dispatcher.forced(True), torch.no_grad():
        assert dispatcher.attention_order(query, key, value) is None
        out, _ = spiking_attention(torch.nn.Module(), query, key, value, mask)
    assert torch.equal(bits(out), bits(exact_attention(query, key, value, mask).transpose(1, 2)))


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


@pytest.mark.parametrize("width", [13, 20, 64])  # the 8-channel masks, a tail, both
@pytest.mark.parametrize("bits", [3, 5])
def test_signed_token_codes_pack_the_codes_as_pack_bits_does(width, bits):
    neuron = SignedNeuron((3, 1, width), bits, 1, 8, 1.0, 0.0, bits + 1, 0.2)
    neuron.set_salient(salient_mask((3, 1, width), 0.2, 5))
    offset = int(neuron.code_plan()[1].max())
    x = tie_heavy((2, 3, 4, width), seed=width)
    with dispatcher.forced(True), torch.no_grad():
        plain = neuron.fused_codes(x, want_code=True)
        packed = neuron.fused_codes(x, want_code=True, pack_bits=(2 * offset).bit_length(), code_offset=offset)
    assert int(plain.code.min()) < 0 < int(plain.code.max())  # signed codes, stored offset to 0..2Q
    planes = pack_bits(plain.code + offset, (2 * offset).bit_length()).flatten(-2)
    assert torch.equal(packed.code, planes)
    assert torch.equal(packed.x_hat, plain.x_hat) and torch.equal(packed.grid, plain.grid)


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
def test_the_kept_decoded_cache_equals_decoding_every_stored_code(neuron_name, monkeypatch):
    from conftest import count_calls

    from spikelm.conversion.cache import GIFCodeLayer, SignedCodeLayer

    calls = count_calls(monkeypatch, cpu_kernels, "kv_codes_append")  # the signed layer's one-call step

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
        assert calls["kv_codes_append"] == (70 if neuron_name == "signed" else 0)
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


def test_the_fused_paths_step_aside_for_hooks_and_statistics():
    """A fused path that skips the neuron's call (the K/V cache step, a linear input with its readers) is taken only
    where the call would run nothing else: a hook of the neuron, a hook registered for every module, or statistics
    turn it off."""
    neuron = SignedNeuron(8, bits=4, group_size=4)
    x = torch.randn(1, 8)
    states = torch.randn(1, 2, 1, 4)  # (B, heads, L, head_dim) for a K/V neuron of 4 channels
    kv = SignedNeuron(4, bits=4, group_size=4)
    assert neuron.value_plan(x) is not None and kv.kv_plan(states) is not None
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert neuron.value_plan(x) is None and kv.kv_plan(states) is None
    finally:
        handle.remove()
    own = kv.register_forward_pre_hook(lambda module, args: None)
    assert kv.kv_plan(states) is None
    own.remove()
    kv.record_stats = True
    assert kv.kv_plan(states) is None
