"""Packed spike KV caches: the packing itself (hand-worked bytes), and packed == unpacked cache (logits bit for bit)
for the native causal SpikeLM and converted models: T in {1, 2, 4}, both resets, GIF, beam search, left padding."""

from __future__ import annotations

import pytest
import torch
from conftest import count_calls, tiny_config, tiny_llama_model

from spikelm import SpikeLMCache, SpikeLMForCausalLM
from spikelm.conversion import spike_code_cache, spikify
from spikelm.nn import cpu_kernels, kernels
from spikelm.nn.packing import (
    pack_bits,
    pack_ternary,
    ternary_table,
    unpack_bits,
    unpack_ternary,
    unpack_ternary_codes,
    unpack_ternary_words,
)

# ----------------------------------------------------------------------------------------------
# The packing
# ----------------------------------------------------------------------------------------------


def test_ternary_bytes_are_base_3_digits_of_q_plus_1():
    codes = torch.tensor([[1, 0, -1, 0, 1, -1, -1]], dtype=torch.int8)
    # 5 per byte: digits 2,1,0,1,2 -> 2 + 3 + 0 + 27 + 2*81 = 194;
    # then 0,0 and three padding zeros (digit 1): 0 + 0 + 9 + 27 + 81 = 117
    assert pack_ternary(codes, 5).tolist() == [[194, 117]]
    # 4 per byte, 2 bits each, groups of 16 values (padded with digit 1): byte i holds value 4k + i in bits 2k..2k+1
    # byte 0: values 0, 4, 8, 12 -> digits 2, 2, 1, 1 -> 2 + 2*4 + 1*16 + 1*64 = 90; byte 1: values 1, 5, 9, 13 ->
    # 1, 0, 1, 1 -> 81; byte 2: values 2, 6, 10, 14 -> 0, 0, 1, 1 -> 80; byte 3: values 3, 7, 11, 15 -> 85
    assert pack_ternary(codes, 4).tolist() == [[90, 81, 80, 85]]


@pytest.mark.parametrize("per_byte", [4, 5])
@pytest.mark.parametrize("width", [1, 8, 10, 64, 67])
def test_ternary_round_trip(per_byte, width):
    codes = torch.randint(-1, 2, (2, 3, 5, width), dtype=torch.int8)
    packed = pack_ternary(codes, per_byte)
    expected_bytes = -(-width // 16) * 4 if per_byte == 4 else -(-width // per_byte)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == expected_bytes
    assert torch.equal(unpack_ternary_codes(packed, width, per_byte), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("per_byte", [4, 5])
@pytest.mark.parametrize("steps_into_batch", [False, True])
def test_decoding_packed_codes_equals_decoding_int8_codes(dtype, per_byte, steps_into_batch):
    steps, heads, width = 3, 2, 13
    codes = torch.randint(-1, 2, (2, steps * heads, 6, width), dtype=torch.int8)
    scale = torch.rand(steps) + 0.1
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    packed = pack_ternary(codes, per_byte)
    if per_byte == 4:
        decoded = unpack_ternary_words(packed, scale, width, dtype, compute, steps_into_batch)
    else:
        table = ternary_table(scale, per_byte, dtype, compute)
        decoded = unpack_ternary(packed, table, steps, width, steps_into_batch)
    expected = (codes.view(2, steps, heads, 6, width).to(compute) * scale.to(compute).view(1, steps, 1, 1, 1)).to(dtype)
    if steps_into_batch:  # (T*B, H, L, d): time-major in the batch axis
        expected = expected.transpose(0, 1).reshape(steps * 2, heads, 6, width)
    else:
        expected = expected.view(2, steps * heads, 6, width)
    assert decoded.dtype == dtype
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_bit_planes_round_trip_and_hold_bit_k_of_8_values_per_byte(bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 4, 13), dtype=torch.int32)
    planes = pack_bits(codes, bits)
    assert planes.shape == (2, 3, 4, bits, 2) and planes.dtype == torch.uint8
    assert torch.equal(unpack_bits(planes, 13, torch.uint8), codes.to(torch.uint8))
    first = [int(c) for c in codes[0, 0, 0, :8]]
    assert int(planes[0, 0, 0, 0, 0]) == sum(((c >> 0) & 1) << i for i, c in enumerate(first))


# ----------------------------------------------------------------------------------------------
# Native causal SpikeLM
# ----------------------------------------------------------------------------------------------


def native(num_steps, reset="official"):
    torch.manual_seed(0)
    config = tiny_config(num_steps=num_steps, reset=reset, max_position_embeddings=48, position_embedding_type="rotary")
    model = SpikeLMForCausalLM(config).eval()
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (4, 24)))
    return model


def generate(model, ids, cache, **kwargs):
    kwargs.setdefault("max_new_tokens", 8)
    return model.generate(
        ids,
        past_key_values=cache,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.logits) == len(b.logits)
    for x, y in zip(a.logits, b.logits, strict=True):
        assert torch.equal(x, y)  # bit for bit


@pytest.mark.parametrize("num_steps", [1, 2, 4])
@pytest.mark.parametrize("reset", ["official", "symmetric"])
def test_native_packed_cache_gives_the_unpacked_cache_logits(num_steps, reset):
    model = native(num_steps, reset)
    ids = torch.randint(1, 97, (2, 7))
    packed = generate(model, ids, SpikeLMCache(model.config))
    unpacked = generate(model, ids, SpikeLMCache(model.config, packing=None))
    assert packed.past_key_values.layers[0].keys.dtype == torch.uint8
    assert unpacked.past_key_values.layers[0].keys.dtype == torch.int8
    assert_same_generation(packed, unpacked)
    default = generate(model, ids, None)  # generate() makes the packed cache itself
    assert default.past_key_values.layers[0].packing == 5
    assert_same_generation(default, unpacked)


def test_native_packed_cache_under_beam_search_and_left_padding():
    model = native(4)
    ids = torch.randint(1, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask, num_beams=3, num_return_sequences=2, output_scores=True)
    for packing in (4, 5):
        packed = generate(model, ids, SpikeLMCache(model.config, packing=packing), **kwargs)
        unpacked = generate(model, ids, SpikeLMCache(model.config, packing=None), **kwargs)
        assert_same_generation(packed, unpacked)
        assert torch.equal(packed.sequences_scores, unpacked.sequences_scores)


def test_native_packed_cache_bytes_per_token():
    model = native(4)
    with torch.no_grad():
        packed = model(torch.randint(1, 97, (1, 10)), use_cache=True).past_key_values
        unpacked = model(torch.randint(1, 97, (1, 10)), past_key_values=SpikeLMCache(model.config, packing=None))
    unpacked = unpacked.past_key_values
    head_dim = 32 // 2
    for p, u in zip(packed.layers, unpacked.layers, strict=True):
        # 16 int8 codes per head and step -> ceil(16 / 5) = 4 bytes
        assert p.keys.numel() * p.keys.element_size() * head_dim == u.keys.numel() * u.keys.element_size() * 4


# ----------------------------------------------------------------------------------------------
# Converted models
# ----------------------------------------------------------------------------------------------


def tiny_llama(seed=0):
    return tiny_llama_model(seed=seed, hidden_size=40)  # head_dim 10: 5 per byte fits, 4 per byte pads


def calibration():
    return torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(5))


def prompts(batch=2, length=9, seed=1):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_steps", [1, 2, 4])
@pytest.mark.parametrize("reset", ["official", "symmetric"])
def test_converted_packed_cache_gives_the_unpacked_cache_logits(num_steps, reset):
    model = spikify(tiny_llama(), neuron="elastic", num_steps=num_steps, reset=reset, calibration=calibration())
    ids = prompts()
    mask = torch.ones_like(ids)
    unpacked = generate(model, ids, spike_code_cache(model, packing=None), attention_mask=mask)
    assert unpacked.past_key_values.layers[0].keys.dtype == torch.int8
    for packing in (4, 5):
        packed = generate(model, ids, spike_code_cache(model, packing=packing), attention_mask=mask)
        assert packed.past_key_values.layers[0].keys.dtype == torch.uint8
        assert_same_generation(packed, unpacked)
    default = generate(model, ids, None, attention_mask=mask)
    assert default.past_key_values.layers[0].packing == 5
    assert_same_generation(default, unpacked)


@pytest.mark.parametrize("neuron", ["elastic", "gif"])
def test_converted_packed_cache_under_beam_search_and_left_padding(neuron):
    model = spikify(tiny_llama(), neuron=neuron, calibration=calibration())
    ids = prompts(3, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask, num_beams=3, num_return_sequences=2, output_scores=True, max_new_tokens=6)
    packed = generate(model, ids, spike_code_cache(model), **kwargs)
    unpacked = generate(model, ids, spike_code_cache(model, packing=None), **kwargs)
    assert packed.past_key_values.layers[0].keys.dtype == torch.uint8
    assert_same_generation(packed, unpacked)
    assert torch.equal(packed.sequences_scores, unpacked.sequences_scores)


def test_converted_gif_packed_cache_gives_the_unpacked_cache_logits_and_stores_5_bits():
    model = spikify(tiny_llama(), neuron="gif", calibration=calibration())  # n = 4, a = 1: codes 0..30, 5 bits
    ids = prompts()
    packed = generate(model, ids, None, attention_mask=torch.ones_like(ids))
    unpacked = generate(model, ids, spike_code_cache(model, packing=None), attention_mask=torch.ones_like(ids))
    assert_same_generation(packed, unpacked)
    p, u = packed.past_key_values.layers[0], unpacked.past_key_values.layers[0]
    assert u.keys.dtype == torch.uint8 and u.keys.shape[-1] == 10
    assert p.keys.shape[-1] == 5 * 2  # 5 bit planes of ceil(10 / 8) = 2 bytes
    assert torch.equal(p.codes("keys"), u.keys) and torch.equal(p.codes("values"), u.values)


@pytest.mark.skipif(cpu_kernels.kernel() is None, reason="the C++ decoding kernels cannot be built here")
def test_packed_cache_equals_unpacked_with_the_cpu_kernels_taken(monkeypatch):
    for name in (kernels.ENV_VAR, kernels.CPU_ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    calls = count_calls(
        monkeypatch, cpu_kernels, "few_rows_linear", "elastic_spikes", "spike_pack5", "unpack5_steps_into_batch"
    )
    converted = spikify(tiny_llama(), neuron="elastic", num_steps=4, calibration=calibration())
    ids, mask = prompts(), torch.ones(2, 9, dtype=torch.long)
    unpacked = generate(converted, ids, spike_code_cache(converted, packing=None), attention_mask=mask)
    assert calls.get("few_rows_linear") and calls.get("elastic_spikes")  # decoding steps of 2 x 4 rows
    assert "spike_pack5" not in calls  # the unpacked cache keeps the PyTorch path
    for packing in (4, 5):
        assert_same_generation(generate(converted, ids, spike_code_cache(converted, packing=packing)), unpacked)
    assert calls.get("spike_pack5") and calls.get("unpack5_steps_into_batch")  # 5 per byte: K/V in C++
    calls.clear()
    model = native(4)
    ids = torch.randint(1, 97, (2, 7))
    unpacked = generate(model, ids, SpikeLMCache(model.config, packing=None))
    assert calls.get("few_rows_linear") and calls.get("elastic_spikes")
    assert_same_generation(generate(model, ids, SpikeLMCache(model.config)), unpacked)
