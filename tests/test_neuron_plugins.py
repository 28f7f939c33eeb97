"""Neurons as plug-ins (spikelm.nn.neurons): the registry, that no module outside the neurons' home asks which neuron
it holds, the spike statistics of GIF neurons (hand counts), and a neuron added as one class (docs/CONVERSION.md,
"Adding a neuron") that converts, caches, saves, loads, counts and describes itself with no other file changed."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_model

import spikelm
from spikelm.nn.neurons import SpikingNeuron, base, named_neurons, neuron_class, neuron_classes, neuron_names
from spikelm.nn.neurons.gif import dequantize, quantize_per_token

PACKAGE = Path(spikelm.__file__).parent
HOME = PACKAGE / "nn" / "neurons"
COMPARISONS = {"==", "!=", "in", "is"}


def _violations(text: str, classes: set[str], names: set[str]) -> list[str]:
    """Where ``text`` names a neuron class, holds the string "gif", or compares something with a neuron's name."""
    found = []
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(text).readline)
        if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)
    ]
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.string in classes:
            found.append(f"line {tok.start[0]}: names {tok.string}")
        if tok.type != tokenize.STRING:
            continue
        try:
            value = ast.literal_eval(tok.string)
        except (ValueError, SyntaxError):
            continue
        if not isinstance(value, str):
            continue
        if value.lower() == "gif":
            found.append(f"line {tok.start[0]}: the string {tok.string}")
        neighbours = {tokens[j].string for j in (i - 1, i + 1) if 0 <= j < len(tokens)}
        if value in names and neighbours & COMPARISONS:
            found.append(f"line {tok.start[0]}: compares with the neuron name {tok.string}")
    return found


def _neuron_words() -> tuple[set[str], set[str]]:
    classes = {cls.__name__ for cls in neuron_classes()} | {"ElasticBiSpikingNeuron", "GIFNeuron"}
    return classes, set(neuron_names())


def test_the_scan_finds_a_branch_on_the_neuron_type():
    classes, names = _neuron_words()
    snippet = (
        "if isinstance(n, GIFNeuron):\n    pass\n"
        "if config.neuron == 'gif':\n    pass\n"
        "if 'elastic' != kind:\n    pass\n"
        '"""A docstring about the gif neuron and ``neuron="gif"`` is prose."""\n'
    )
    found = _violations(snippet, classes, names)
    assert [f.split(":")[0] for f in found] == ["line 1", "line 3", "line 3", "line 5"]


def test_no_module_outside_the_neurons_home_branches_on_the_neuron_type():
    classes, names = _neuron_words()
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if HOME not in p.parents]
    assert len(files) > 50  # the whole package but the home is scanned
    problems = {
        str(p.relative_to(PACKAGE.parent)): found
        for p in files
        if (found := _violations(p.read_text(encoding="utf-8"), classes, names))
    }
    assert problems == {}


def test_registry_refuses_duplicates_and_unknown_names(monkeypatch):
    assert neuron_names()[:2] == ("elastic", "gif")
    with pytest.raises(ValueError, match=r"neuron must be one of \('elastic', 'gif'"):
        neuron_class("lif")

    class Other(SpikingNeuron):
        name = "gif"

    with pytest.raises(ValueError, match="already registered"):
        base.register_neuron(Other)
    with pytest.raises(TypeError):
        base.register_neuron(torch.nn.ReLU)


def test_old_import_paths_are_the_same_modules():
    import spikelm.nn.gif as old_gif
    import spikelm.nn.neuron as old_elastic
    from spikelm.nn.neurons import elastic, gif

    assert old_elastic is elastic and old_gif is gif
    assert spikelm.ElasticBiSpikingNeuron is elastic.ElasticBiSpikingNeuron


def test_config_fields_are_every_registered_neurons_fields():
    from spikelm.conversion.config import SpikeLMConversionConfig

    names = SpikeLMConversionConfig.field_names()
    for cls in neuron_classes():
        assert set(cls.config_fields) <= set(names)
        assert cls.recipe_defaults["neuron"] == cls.name
    with pytest.raises(ValueError, match="unknown spikelm conversion field"):
        SpikeLMConversionConfig(neuron="gif", gif_bitz=4)


# -- GIF spike statistics, counted by hand ----------------------------------------------------------------------------


def test_spike_statistics_cover_gif_neurons():
    from spikelm import spikify
    from spikelm.conversion.placement import placement
    from spikelm.nn.stats import collect_spike_stats, record_spike_stats

    model = tiny_llama_model()
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 10))
    spikify(model, neuron="gif", gif_bits=2, gif_extra_bits=1, saliency_fraction=0.25, calibration=ids)
    inputs = {}
    for name, neuron in named_neurons(model):
        neuron.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0].detach().clone()))
    with torch.no_grad(), record_spike_stats(model):
        model(ids, use_cache=False)
    stats = collect_spike_stats(model)
    assert set(stats) == {site.name for site in placement(model)}  # every placed neuron, K/V included
    for name, neuron in named_neurons(model):
        x = inputs[name]
        code = neuron.quantize(x)[0].long()  # the quantiser itself is tested in test_gif.py
        # n = 2: a spike carries at most 3, the membrane starts at the code and soft-resets: 3 then the rest
        first, second = code.clamp(max=3), code - code.clamp(max=3)
        assert int(second.max()) <= 3  # a = 1: every code drains in T = 2 steps
        salient = int(torch.broadcast_to(neuron.salient, x.shape).sum())
        assert salient > 0
        entry = stats[name]
        assert entry["spikes"] == [int((first > 0).sum()), int((second > 0).sum())]
        assert entry["levels"] == [int(first.sum()), int(second.sum())]
        assert entry["slots"] == [code.numel(), salient]
        assert entry["firing_rate"] == [int((first > 0).sum()) / code.numel(), int((second > 0).sum()) / salient]


# -- a neuron added as one class (docs/CONVERSION.md, "Adding a neuron") --------------------------------------------


class OneStepNeuron(SpikingNeuron):
    """n-bit integer spikes in a single step: per-token asymmetric quantisation of the input (the GIF neuron's
    quantiser without saliency); the value is the dequantised code."""

    name = "one_step"
    display_name = "one-step"
    config_fields = {"one_step_bits": 4}
    recipe_defaults = {"neuron": "one_step", "one_step_bits": 4}
    cache_layout = "token_codes"  # an integer code per value and a per-token grid: bits, quantize, dequantize

    def __init__(self, channels, bits: int = 4):
        super().__init__()
        self.channel_shape, self.bits, self.extra_bits = channels, bits, 0
        self.record_stats, self.stats = False, None

    @classmethod
    def check_config(cls, fields) -> None:
        bits = cls.field(fields, "one_step_bits")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"one_step_bits must be an integer in [1, 8], got {bits!r}")

    @classmethod
    def from_config(cls, fields, channels, per_step: bool):
        return cls(channels, cls.field(fields, "one_step_bits"))

    @classmethod
    def describe(cls, fields) -> str:
        return f"a one-step neuron of {cls.field(fields, 'one_step_bits')}-bit integer spikes"

    def quantize(self, x):
        return quantize_per_token(x, self.bits, 0)

    def dequantize(self, code, scale, zero):
        return dequantize(code, scale, zero)

    def forward(self, x):
        with torch.no_grad():
            code, scale, zero = self.quantize(x)
            if self.record_stats:
                events = int((code > 0).sum())
                self.stats = {"firing_rate": [events / code.numel()], "spikes": [events], "slots": [code.numel()]}
            out = self.dequantize(code, scale, zero).to(x.dtype)
        return out + (x - x.detach()) if x.requires_grad else out

    def spike_stats(self):
        return self.stats

    def step_spikes(self, x, output):
        code = self.quantize(x)[0].long()[None]
        return code, (code > 0).long()

    def reader_macs(self, steps, outputs):
        return torch.tensor([2 * outputs])  # one scale multiply and one zero-point term per output

    def attention_ops(self, product, steps, pairs, heads, head_dim, queries):
        extra = torch.tensor([queries * heads * head_dim if product == "scores" else 0])
        return torch.tensor([2 * pairs * heads]), extra


@pytest.fixture
def one_step_registered(monkeypatch):
    monkeypatch.setitem(base._REGISTRY, OneStepNeuron.name, OneStepNeuron)
    return OneStepNeuron


@pytest.mark.slow
def test_a_neuron_added_as_one_class_converts_saves_loads_counts_and_describes_itself(one_step_registered, tmp_path):
    from transformers import AutoModelForCausalLM

    from spikelm import spikify
    from spikelm.conversion.model_card import write_model_card
    from spikelm.conversion.recipes import recipe
    from spikelm.evaluation.energy import measure_energy
    from spikelm.nn.stats import collect_spike_stats, record_spike_stats

    source = tiny_llama_model()
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 12))
    with torch.no_grad():
        real = source(ids).logits
    model = spikify(source, recipe("one_step", None, {"rotation": "none", "online_down_proj_rotation": False}))
    assert {type(n) for _, n in named_neurons(model)} == {OneStepNeuron}
    with torch.no_grad():
        spiking = model(ids, use_cache=False).logits
        # the spike-code cache: prefill then one decoding step equals the full pass
        prefill = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True).logits
    assert not torch.equal(spiking, real)  # it spikes
    assert (spiking - real).abs().max() < 0.5 * real.abs().max()  # 4-bit inputs: close to the real model
    assert torch.equal(step[:, -1], spiking[:, -1])  # one model whatever the path (docs/CONVERSION.md)
    model.save_pretrained(tmp_path)
    assert '"one_step_bits": 4' in (tmp_path / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, spiking)
    with torch.no_grad(), record_spike_stats(model):
        model(ids, use_cache=False)
    assert len(collect_spike_stats(model)) == len(named_neurons(model))
    energy = measure_energy(model, [{"input_ids": ids}])
    assert energy["acs"] > 0 and energy["spiking"]
    card = write_model_card(tmp_path, model.config.quantization_config, "tiny").read_text()
    assert "a one-step neuron of 4-bit integer spikes" in card
    assert "The elastic and GIF neuron's fields, unused here, are left out" in card


# -- every registered neuron keeps the interface's contract ------------------------------------------------------------


@pytest.mark.parametrize("name", neuron_names())
def test_every_registered_neuron_keeps_the_interface(name):
    from spikelm.conversion.config import SpikeLMConversionConfig
    from spikelm.nn.exact import exact_linear

    cls = neuron_class(name)
    fields = SpikeLMConversionConfig(**cls.recipe()).to_dict()
    steps = cls.model_steps(fields)
    torch.manual_seed(0)
    width, weight, bias = 16, torch.randn(8, 16), torch.randn(8)
    x = torch.randn(steps * 3, 5, width)  # the copies of the network folded into the batch axis
    neuron = cls.from_config(fields, width, per_step=False)
    recorder = neuron.calibration_recorder([weight])
    if recorder is not None:  # calibrates on the real-valued input, which passes through meanwhile
        assert torch.equal(neuron(x), x)
        recorder.finish()
    neuron.record_stats = True
    out = neuron.spike_folded(x, steps)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    assert neuron.is_initialized()
    levels, fired = neuron.step_spikes(x, out)
    assert levels.dtype == fired.dtype == torch.int64 and (levels >= 0).all()
    assert torch.equal(fired, (levels > 0).long())
    counted = levels.shape[0]
    stats = neuron.spike_stats()
    assert {"firing_rate", "spikes", "slots"} <= set(stats)
    assert len(stats["spikes"]) == len(stats["slots"]) == len(stats["firing_rate"]) == neuron.step_counts().shape[1]
    assert neuron.step_counts().shape[0] == 3
    for counts in (neuron.slots(counted, 15, width), neuron.reader_macs(counted, 40)):
        assert counts.dtype == torch.int64 and counts.shape == (counted,) and (counts >= 0).all()
    reads = neuron.reader_weight_reads()  # constants a reader reads per output and token (the memory figure)
    assert isinstance(reads, int) and reads >= 0
    for product in ("scores", "context"):
        macs, extra = neuron.attention_ops(product, counted, pairs=10, heads=2, head_dim=8, queries=4)
        assert macs.shape == extra.shape == (counted,) and macs.dtype == extra.dtype == torch.int64
    time_major = neuron.spike_folded(x, steps)
    fast = neuron.linear(x.view(steps, -1, width) if steps > 1 else x, weight, bias)
    reference = exact_linear(time_major.view(fast.shape[:-1] + (width,)), weight, bias)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert isinstance(cls.describe(fields), str) and isinstance(cls.summary(fields), str)
    cls.check_config(fields)
