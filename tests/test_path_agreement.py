"""One model whatever the path, on real-sized models (SmolLM2-135M's shapes with random weights).

Every code path of a converted model must compute the same codes: the full forward pass with the C++ kernels on and
off, a prompt of a few tokens (the few-row kernel) or many (the GEMM), cached decoding after any prefill split. The
tiny models of the other tests hid the discrepancies these catch (few rows, one range group, one or two heads), so
the shapes here are SmolLM2-135M's: hidden 576, 9 heads of 64, 3 KV heads, FFN 1,536, range groups of 64. Each
spiking layer's input (the dequantised codes or spikes the reader linears get) is recorded token by token and
compared across paths: the number of differing values (flips) must be zero, and logits agree within float32
summation noise.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_model
from torch import nn

from spikelm.conversion import spikify
from spikelm.conversion.recipes import recipe
from spikelm.nn import cpu_kernels
from spikelm.nn import kernels as dispatcher

REAL_SIZES = dict(
    vocab_size=256,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=2,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
RECIPES = {
    "gif": recipe("gif"),  # GIF T=2, ranges per 64 channels, clip 0.9, both Hadamard rotations
    "gif-token-ranges": recipe("gif", overrides={"gif_group_range": "token"}),
    "gif-no-saliency": recipe("gif", overrides={"saliency_fraction": 0.0}),
    "elastic": recipe("elastic"),  # ternary T=4, symmetric reset, same rotations
    # the default: signed 4-bit codes per 64 channels, unclipped, the top 10 % at 5 bits, both Hadamard rotations
    # and the per-head value/output rotation
    "signed": recipe("signed"),
    "signed-options": recipe(  # saliency (more levels, more steps), a dead zone, per-site bits, T=2
        "signed",
        num_steps=2,
        overrides={
            "signed_salient_bits": 6,
            "saliency_fraction": 0.05,
            "signed_dead_zone": 0.75,
            "signed_site_bits": {"down_input": 5, "k": 5},
        },
    ),
}
LOGIT_TOLERANCE = 1e-4  # float32 summation noise of the real-valued LM head (its input bits are equal)


@pytest.fixture(scope="module", params=list(RECIPES))
def converted(request):
    model = tiny_llama_model(seed=1, **REAL_SIZES)
    with torch.no_grad():  # weights of a trained model's scale: logits of a few units
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0, 0.5 / param.shape[1] ** 0.5 if "embed" not in name else 1.0)
    calibration = [torch.randint(3, 256, (2, 64), generator=torch.Generator().manual_seed(3))]
    return spikify(model, RECIPES[request.param], calibration=calibration)


def record_spiking_inputs(model: nn.Module) -> tuple[dict[str, list[torch.Tensor]], list]:
    """Forward pre-hooks on every linear that reads a neuron: its input (the spiking layer's output) per call."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "forward" in vars(module):  # the readers spikify routes

            def hook(mod, args, name=name):
                store.setdefault(name, []).append(args[0].detach().clone())

            handles.append(module.register_forward_pre_hook(hook))
    return store, handles


def by_token(calls: list[torch.Tensor]) -> torch.Tensor:
    """The calls of one layer joined along the sequence axis (the second to last)."""
    return torch.cat(calls, dim=-2)


def count_flips(a: dict, b: dict) -> int:
    assert a.keys() == b.keys() and a
    return sum(int((by_token(a[k]) != by_token(b[k])).sum()) for k in a)


def prompt(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(100 * batch + length))


@torch.no_grad()
def full_forward(model, ids):
    store, handles = record_spiking_inputs(model)
    try:
        logits = model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, store


@torch.no_grad()
def split_forward(model, ids, prefill: int):
    """Prefill ``prefill`` tokens with the cache, then one cached step per remaining token."""
    store, handles = record_spiking_inputs(model)
    try:
        out = model(ids[:, :prefill], use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for i in range(prefill, ids.shape[1]):
            out = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    finally:
        for h in handles:
            h.remove()
    return torch.cat(logits, 1), store


# prompts on both sides of every row threshold: the few-row kernel takes at most 8 rows (GIF: one row per token;
# elastic T=4: four rows per token), and a decoding step is one token
LENGTHS = (1, 2, 3, 8, 9, 20)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_kernels_on_and_off_compute_the_same_codes_and_logits(converted, batch):
    if cpu_kernels.kernel() is None:
        pytest.skip("the C++ kernels cannot be built here")
    for length in LENGTHS:
        ids = prompt(batch, length)
        with dispatcher.forced(True):
            on, codes_on = full_forward(converted, ids)
        with dispatcher.forced(False):
            off, codes_off = full_forward(converted, ids)
        assert count_flips(codes_on, codes_off) == 0, length
        assert float((on - off).abs().max()) <= LOGIT_TOLERANCE, length


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_every_prefill_split_equals_the_full_forward_token_by_token(converted, batch):
    ids = prompt(batch, 12)
    full, codes = full_forward(converted, ids)
    for prefill in (1, 2, 3, 7, 9, 11):
        split, split_codes = split_forward(converted, ids, prefill)
        assert count_flips(codes, split_codes) == 0, prefill
        assert float((split - full).abs().max()) <= LOGIT_TOLERANCE, prefill


@pytest.mark.slow
def test_prefixes_compute_what_the_longer_prompt_computes(converted):
    """Causality: a prompt's first tokens give the same codes and logits alone as inside a longer prompt."""
    ids = prompt(1, 20)
    full, codes = full_forward(converted, ids)
    for length in (1, 2, 3, 8, 9):
        part, part_codes = full_forward(converted, ids[:, :length])
        assert float((part - full[:, :length]).abs().max()) <= LOGIT_TOLERANCE, length
        flips = sum(int((by_token(part_codes[k]) != by_token(codes[k])[..., :length, :]).sum()) for k in codes)
        assert flips == 0, length


@pytest.mark.slow
def test_cached_generation_equals_the_full_forward_logit_by_logit_and_uncached_greedy(converted):
    ids = prompt(2, 5)
    settings = dict(do_sample=False, max_new_tokens=10, pad_token_id=0)
    for kernels in (True, False):
        with dispatcher.forced(kernels), torch.no_grad():
            out = converted.generate(ids, return_dict_in_generate=True, output_logits=True, **settings)
            full = converted(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
            assert float((torch.stack(out.logits, 1) - full).abs().max()) <= LOGIT_TOLERANCE
            uncached = converted.generate(ids, use_cache=False, **settings)
        assert torch.equal(uncached, out.sequences)


@pytest.mark.slow
def test_gradients_do_not_change_the_forward_values(converted):
    """With autograd recording (a user who forgot torch.no_grad, or training) the forward pass is the same model."""
    ids = prompt(1, 6)
    with torch.no_grad():
        expected = converted(ids, use_cache=False).logits
    converted.model.embed_tokens.weight.requires_grad_(True)
    try:
        recorded = converted(ids, use_cache=False).logits
    finally:
        converted.model.embed_tokens.weight.requires_grad_(False)
    assert recorded.requires_grad
    assert float((recorded.detach() - expected).abs().max()) <= LOGIT_TOLERANCE
