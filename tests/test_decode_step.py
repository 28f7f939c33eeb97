"""A converted block's decoding step in one function (spikelm.conversion.decode_step) computes what its modules do.

Greedy generation with the step and with the block's own modules gives the same logits bit for bit (every recipe
family, LLaMA / Mistral / Qwen2 blocks, batch 1 and a left-padded batch of 2, kernels on and off); the step runs
where it should (one call per block and decoding step) and steps aside for what it would skip: a hook of the user's
on a module it bypasses (the hook then runs), a hook registered for every module, a prefill, another attention
implementation, the switch off; families whose block is not the one it mirrors keep their modules; ``detach``
removes it. The planned step (each dispatcher asked once per block, the answers kept while what they read holds) is
resolved once and gives the modules' bits, and follows a change made between two steps (a neuron's setting, a
buffer changed in place, a weight replaced, the saliency, the rotation, a hook, the threads, the switch) as the
modules do. The real SmolLM2-135M (slow): the step on and off give the same logits bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_model

from spikelm.conversion import decode_step, detach, spikify
from spikelm.conversion.recipes import recipe
from spikelm.errors import UserError
from spikelm.nn import cpu_kernels
from spikelm.nn import kernels as dispatcher

SIZES = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def family_model(name: str, seed: int = 1):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (None, None), "mistral": (MistralForCausalLM, MistralConfig)}
    classes["qwen2"] = (Qwen2ForCausalLM, Qwen2Config)
    extra = {"sliding_window": 4} if name == "mistral" else {}
    model = tiny_llama_model(*classes[name], seed=seed, **SIZES, **extra)
    with torch.no_grad():  # weights of a trained model's scale: logits of a few units
        for pname, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.5 / param.shape[1] ** 0.5 if "embed" not in pname else 1.0)
            elif pname.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def convert(model, recipe_name: str = "signed"):
    calibration = [torch.randint(3, SIZES["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(3))]
    return spikify(model, recipe(recipe_name), calibration=calibration)


class Counter:
    """Counts the decoding steps the blocks take in one function."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = decode_step.BlockStep.__call__

        def counted(step, *args, **kwargs):
            self.calls += 1
            return original(step, *args, **kwargs)

        monkeypatch.setattr(decode_step.BlockStep, "__call__", counted)


def generate(model, ids, mask=None, new: int = 6, step: bool | None = None):
    settings = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    with decode_step.forced(step), torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids) if mask is None else mask,
            return_dict_in_generate=True,
            output_logits=True,
            **settings,
        )
    return out.sequences, torch.stack(out.logits)


def left_padded(batch: int = 2, length: int = 7):
    ids = torch.randint(3, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("recipe_name", ["signed", "gif", "elastic"])
@pytest.mark.parametrize("kernels", [True, False])
def test_the_step_gives_the_modules_logits_bit_for_bit(family, recipe_name, kernels, monkeypatch):
    if kernels and cpu_kernels.kernel() is None:
        pytest.skip("the C++ kernels cannot be built here")
    model = convert(family_model(family), recipe_name)
    counter = Counter(monkeypatch)
    for batch in (1, 2):
        ids, mask = left_padded(batch, 12 if family == "mistral" else 7)  # longer than Mistral's window of 4
        with dispatcher.forced(kernels):
            before = counter.calls
            off = generate(model, ids, mask, step=False)
            assert counter.calls == before  # switched off: the modules ran
            on = generate(model, ids, mask, step=True)
        assert counter.calls - before == 5 * SIZES["num_hidden_layers"]  # 5 decoding steps after the prefill
        assert torch.equal(on[0], off[0])
        assert torch.equal(on[1], off[1])


def test_a_hook_on_a_bypassed_module_runs_and_its_block_keeps_its_modules(monkeypatch):
    model = convert(family_model("llama"))
    ids, mask = left_padded(1)
    reference = generate(model, ids, mask, step=False)
    counter = Counter(monkeypatch)
    seen = []
    attention = model.model.layers[1].self_attn
    handle = attention.register_forward_hook(lambda module, args, output: seen.append(output[0].shape[1]))
    try:
        hooked = generate(model, ids, mask)
    finally:
        handle.remove()
    assert seen == [7, 1, 1, 1, 1, 1]  # the prefill and every decoding step ran the attention module
    assert counter.calls == 5  # block 0 took the step, block 1 its modules
    assert torch.equal(hooked[1], reference[1])
    generate(model, ids, mask)
    assert counter.calls == 5 + 10  # the hook removed: both blocks again


def test_a_hook_registered_for_every_module_keeps_the_modules(monkeypatch):
    from torch.nn.modules.module import register_module_forward_pre_hook

    model = convert(family_model("llama"))
    ids, mask = left_padded(1)
    counter = Counter(monkeypatch)
    calls = []
    handle = register_module_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
    try:
        generate(model, ids, mask)
    finally:
        handle.remove()
    assert counter.calls == 0
    assert calls.count("SignedNeuron") > 0


def test_a_prefill_another_attention_or_no_cache_keep_the_modules(monkeypatch):
    model = convert(family_model("llama"))
    ids, mask = left_padded(1)
    counter = Counter(monkeypatch)
    with torch.no_grad():
        model(ids, attention_mask=mask)  # a prefill
        model(ids[:, :1], use_cache=False)  # one token without a cache
    assert counter.calls == 0
    layer = model.model.layers[0]
    step = layer.forward.args[1]
    cache = model(ids[:, :3], use_cache=True).past_key_values
    kwargs = dict(past_key_values=cache, position_embeddings=(torch.ones(1, 1, 16), torch.zeros(1, 1, 16)))
    hidden = torch.zeros(1, 1, SIZES["hidden_size"])
    assert step.runs(layer, hidden, kwargs)
    model.config._attn_implementation = "sdpa"  # set behind spikelm's back: the step must not run spikelm's
    try:
        assert not step.runs(layer, hidden, kwargs)
    finally:
        model.config._attn_implementation = "spikelm"
    model.train()
    assert not step.runs(layer, hidden, kwargs)
    model.eval()
    assert not step.runs(layer, hidden, {**kwargs, "position_embeddings": None})


def test_the_switch_and_its_environment_variable(monkeypatch):
    model = convert(family_model("llama"))
    ids, mask = left_padded(1)
    counter = Counter(monkeypatch)
    monkeypatch.setenv(decode_step.ENV_VAR, "0")
    generate(model, ids, mask)
    assert counter.calls == 0
    monkeypatch.setenv(decode_step.ENV_VAR, "1")
    generate(model, ids, mask)
    assert counter.calls == 10
    monkeypatch.setenv(decode_step.ENV_VAR, "maybe")
    with pytest.raises(UserError, match="SPIKELM_DECODE_STEP='maybe'"):
        generate(model, ids, mask)


def test_blocks_it_does_not_mirror_keep_their_forward_and_detach_removes_it():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen3 = convert(tiny_llama_model(Qwen3ForCausalLM, Qwen3Config, seed=2, **SIZES, head_dim=16))
    assert all("forward" not in vars(layer) for layer in qwen3.model.layers)  # q/k norms: not this block
    llama = convert(family_model("llama"))
    assert all("forward" in vars(layer) for layer in llama.model.layers)
    detach(llama)
    assert all("forward" not in vars(layer) for layer in llama.model.layers)


def test_a_block_with_an_unconverted_site_keeps_its_modules():
    model = family_model("llama")
    calibration = [torch.randint(3, SIZES["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(3))]
    fields = recipe("signed", overrides={"modules_to_not_convert": ["model.layers.1.mlp.gate_proj"]})
    model = spikify(model, fields, calibration=calibration)
    assert "forward" in vars(model.model.layers[0])
    assert "forward" not in vars(model.model.layers[1])


# ----------------------------------------------------------------------------------------------
# The planned step: resolved once, kept while what it read holds
# ----------------------------------------------------------------------------------------------


class PlanCounter:
    """Counts the blocks' plans resolved and their planned steps."""

    def __init__(self, monkeypatch):
        self.resolved = self.planned = 0
        resolve, planned = decode_step.BlockStep.resolve, decode_step.BlockStep.planned

        def counted_resolve(step, *args):
            plan = resolve(step, *args)
            self.resolved += plan is not None
            return plan

        def counted_planned(step, *args):
            self.planned += 1
            return planned(step, *args)

        monkeypatch.setattr(decode_step.BlockStep, "resolve", counted_resolve)
        monkeypatch.setattr(decode_step.BlockStep, "planned", counted_planned)


class At:
    """A logits processor that calls ``change(model)`` once, after the ``when``-th decoding step's logits: the
    steps after it run on the changed model."""

    def __init__(self, model, when: int, change):
        self.model, self.when, self.change, self.seen = model, when, change, 0

    def __call__(self, input_ids, scores):
        self.seen += 1
        if self.seen == self.when:
            self.change(self.model)
        return scores


def changed_generation(change, step: bool, new: int = 7, batch: int = 1):
    """Greedy logits of a fresh converted tiny LLaMA, ``change`` applied after the third step's logits."""
    from transformers import LogitsProcessorList

    model = convert(family_model("llama"))
    ids, mask = left_padded(batch)
    settings = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    processors = LogitsProcessorList([At(model, 3, change)]) if change is not None else None
    with decode_step.forced(step), torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            logits_processor=processors,
            return_dict_in_generate=True,
            output_logits=True,
            **settings,
        )
    return torch.stack(out.logits)


needs_kernels = pytest.mark.skipif(cpu_kernels.kernel() is None, reason="the C++ kernels cannot be built here")


@needs_kernels
@pytest.mark.parametrize("batch", [1, 2])
def test_the_plan_is_resolved_once_per_block_and_its_steps_equal_the_modules(batch, monkeypatch):
    off = changed_generation(None, step=False, batch=batch)
    counter = PlanCounter(monkeypatch)
    on = changed_generation(None, step=True, batch=batch)
    layers = SIZES["num_hidden_layers"]
    assert counter.resolved == layers  # once per block, kept over the 6 decoding steps
    assert counter.planned == 6 * layers
    assert torch.equal(on, off)


def _set_clip(model):
    model.model.layers[1].mlp.input_neuron.clip_ratio = 0.5


def _threshold_in_place(model):
    neuron = model.model.layers[0].self_attn.o_proj.input_neuron
    neuron.outlier_threshold.fill_(1e-3)  # every token an outlier: passed real-valued


def _new_weight(model):
    linear = model.model.layers[0].mlp.down_proj
    linear.weight = torch.nn.Parameter(torch.flip(linear.weight.detach(), [0]))


def _salient(model):
    neuron = model.model.layers[1].self_attn.input_neuron
    neuron.set_salient(torch.roll(neuron.salient, 5))


def _other_rotation_seed(model):
    model.model.layers[0].mlp.down_proj.online_rotation.seed = 11


@needs_kernels
@pytest.mark.parametrize(
    "change", [_set_clip, _threshold_in_place, _new_weight, _salient, _other_rotation_seed], ids=lambda f: f.__name__
)
def test_a_change_between_steps_is_followed_as_the_modules_follow_it(change, monkeypatch):
    unchanged = changed_generation(None, step=True)
    off = changed_generation(change, step=False)
    counter = PlanCounter(monkeypatch)
    on = changed_generation(change, step=True)
    assert not torch.equal(off[3:], unchanged[3:])  # the change matters from the fourth step
    assert torch.equal(on, off)
    assert counter.planned == 6 * SIZES["num_hidden_layers"]  # re-resolved, still planned
    assert counter.resolved > SIZES["num_hidden_layers"]


def _hook_on_neuron(model):
    model.model.layers[0].mlp.input_neuron.register_forward_hook(lambda m, a, o: o * 1.25)


@needs_kernels
def test_a_hook_on_a_neuron_after_the_plan_runs(monkeypatch):
    off = changed_generation(_hook_on_neuron, step=False)
    counter = PlanCounter(monkeypatch)
    on = changed_generation(_hook_on_neuron, step=True)
    assert torch.equal(on, off)
    # steps 1 and 2 planned in both blocks; from step 3 (after the hook) only in block 1
    assert counter.planned == 2 * SIZES["num_hidden_layers"] + 4
    assert not torch.equal(on, changed_generation(None, step=True))  # the hook changed the outputs


@needs_kernels
def test_the_threads_and_the_kernel_switch_are_asked_at_every_step(monkeypatch):
    threads = torch.get_num_threads()
    counter = PlanCounter(monkeypatch)
    try:
        on = changed_generation(lambda model: torch.set_num_threads(1), step=True)
    finally:
        torch.set_num_threads(threads)
    assert counter.resolved == 2 * SIZES["num_hidden_layers"]  # again after the thread count changed
    counter.resolved = counter.planned = 0
    try:
        switched = changed_generation(lambda model: dispatcher.set_enabled(False), step=True)
    finally:
        dispatcher.set_enabled(None)
    assert counter.planned == 2 * SIZES["num_hidden_layers"]  # the kernels off: the modules' path after
    assert torch.equal(switched, changed_generation(None, step=False))  # every path: the same bits
    assert torch.equal(on, switched)


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_step_on_and_off_give_the_same_logits_bit_for_bit(monkeypatch):
    from spikelm.data.pretrained import ModelSourceError, resolve_model_source

    try:
        source = resolve_model_source("smollm2-135m")
    except ModelSourceError:
        source = None
    if source is None or not (source / "config.json").exists():
        pytest.skip("SmolLM2-135M is not in the local cache")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model = spikify(model, recipe("signed"), calibration=[torch.randint(3, 49152, (2, 128))])
    ids = torch.randint(3, 49152, (1, 40), generator=torch.Generator().manual_seed(6))
    counter = Counter(monkeypatch)
    on = generate(model, ids, new=12, step=True)
    assert counter.calls == 11 * model.config.num_hidden_layers
    off = generate(model, ids, new=12, step=False)
    assert torch.equal(on[0], off[0])
    assert torch.equal(on[1], off[1])


# ----------------------------------------------------------------------------------------------
# The C++ mirrors of LLaMA's RMSNorm and rotary embedding
# ----------------------------------------------------------------------------------------------


def wide(shape, seed: int) -> torch.Tensor:
    """Values over many binades, exact zeros and negative zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))
    flat = x.view(-1)
    flat[::7] = 0.0
    flat[3::11] = -0.0
    return x


@pytest.mark.skipif(cpu_kernels.kernel() is None, reason="the C++ kernels cannot be built here")
@pytest.mark.parametrize("width", [576, 64, 7])
def test_the_cpp_rms_norm_equals_llamas(width):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(wide((width,), 1))
        for rows in ((1, 1), (3, 1), (2, 5), (64, 33)):  # a vectorised rsqrt over many rows too
            x = wide((*rows, width), 2 + rows[0])
            assert torch.equal(cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


@pytest.mark.skipif(cpu_kernels.kernel() is None, reason="the C++ kernels cannot be built here")
@pytest.mark.parametrize("head_dim", [64, 16, 7])
@pytest.mark.parametrize("cos_batch", [1, 3])
def test_the_cpp_rotary_embedding_equals_llamas(head_dim, cos_batch):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    for n in (1, 4):
        q = wide((3, 1, 9 * n, head_dim), 5).view(3, n, 9, head_dim).transpose(1, 2)  # the projection's layout
        k = wide((3, 3, n, head_dim), 6)
        cos, sin = wide((cos_batch, n, head_dim), 7), wide((cos_batch, n, head_dim), 8)
        q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
        q_out, k_out = cpu_kernels.rotary_embedding(q, k, cos, sin)
        assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
        assert torch.equal(torch.signbit(q_out), torch.signbit(q_ref))  # zeros keep their sign


@needs_kernels
def test_under_the_profiler_the_planned_calls_are_named_and_give_the_same_bits():
    from torch.profiler import ProfilerActivity, profile

    plain = changed_generation(None, step=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = changed_generation(None, step=True)
    names = {event.key for event in prof.key_averages()}
    assert {"spikelm::token_values_linears", "spikelm::rms_norm", "spikelm::rotary_embedding"} <= names
    assert torch.equal(plain, profiled)
