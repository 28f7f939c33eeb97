"""The honest energy report: both models at the same weight precision, and the memory-inclusive figure.

Every expected number is computed here from the neurons' own spikes (re-run step by step on the reference path, or
read off the elastic neuron's output), the config's shapes and Horowitz's table typed from the source, never from
the counter's helpers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import spikelm
from spikelm import SpikeLinear
from spikelm.conversion import neurons
from spikelm.evaluation.energy import OperationCounter, measure_decode_energy, measure_energy
from spikelm.evaluation.energy_constants import MEMORY_PJ_PER_BIT, PRECISIONS
from spikelm.nn.gif import reference_gif_spikes
from spikelm.nn.neurons import SpikingNeuron

H, HKV, D, HIDDEN, INTER, VOCAB = 4, 2, 8, 32, 48, 40
OUT = {"q_proj": H * D, "k_proj": HKV * D, "v_proj": HKV * D, "o_proj": HIDDEN, "gate_proj": INTER,
       "up_proj": INTER, "down_proj": HIDDEN}  # fmt: skip
IN = {"q_proj": HIDDEN, "k_proj": HIDDEN, "v_proj": HIDDEN, "o_proj": H * D, "gate_proj": HIDDEN,
      "up_proj": HIDDEN, "down_proj": INTER}  # fmt: skip
SITE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp.down_proj"}  # fmt: skip
GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip

# Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm, 0.9 V, typed from the
# source: (add, multiply) in pJ per operation; the multiply-add is the two together.
HOROWITZ = {"int8": (0.03, 0.2), "fp16": (0.4, 1.1), "fp32": (0.9, 3.7)}
HOROWITZ_MAC = {"int8": 0.23, "fp16": 1.5, "fp32": 4.6}
BITS = {"fp32": 32, "bf16": 16, "int8": 8}
ROW = {"fp32": "fp32", "bf16": "fp16", "int8": "int8"}  # bfloat16 is priced with the source's 16-bit float row


def _config():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _model(seed=0, **recipe):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config()).eval()
    options = {"neuron": "gif", "rotation": "none", "online_down_proj_rotation": False, **recipe}
    spikelm.spikify(model, calibration=torch.randint(0, VOCAB, (2, 12)), **options)
    return model


def _run(model, ids, mask=None, decode=False):
    """The summary, and every neuron's inputs and outputs in call order (hooks of the test's own)."""
    seen: dict[str, list] = {}
    handles = [
        n.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, []).append((a[0], o)))
        for name, n in neurons(model)
    ]
    batch = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    summary = (measure_decode_energy if decode else measure_energy)(model, [batch])
    for h in handles:
        h.remove()
    return summary, seen


def _gif_levels(neuron, x):
    """|levels| (T, ..., C) of a GIF neuron on x, step by step."""
    return reference_gif_spikes(neuron.quantize(x)[0], neuron.bits, neuron.num_steps).long().abs()


def _range_groups(salient: torch.Tensor, size: int) -> int:
    """Zero-point groups of one row of channels: with group size G the salient channels in runs of G, then the
    others; without, one group per channel set that exists."""
    n_salient = int(salient.sum())
    if size:
        return math.ceil(n_salient / size) + math.ceil((salient.numel() - n_salient) / size)
    return (n_salient > 0) + (salient.numel() - n_salient > 0)


def test_precision_table_is_horowitzs():
    assert [p.name for p in PRECISIONS] == ["fp32", "bf16", "int8"]
    for p in PRECISIONS:
        add, multiply = HOROWITZ[ROW[p.name]]
        assert (p.add_pJ, p.multiply_pJ, p.weight_bits) == (add, multiply, BITS[p.name])
        assert p.mac_pJ == pytest.approx(HOROWITZ_MAC[ROW[p.name]])
        assert p.note
    assert MEMORY_PJ_PER_BIT == pytest.approx(1300 / 64)  # DRAM, the low end of 1.3-2.6 nJ per 64-bit read


@pytest.mark.parametrize("group_size", [0, 3])
def test_gif_precisions_and_weight_reads_equal_a_hand_count(group_size):
    model = _model(gif_group_size=group_size)
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding is not counted
    summary, seen = _run(model, ids, mask)
    real = mask.bool()
    tokens = int(real.sum())
    lengths = real.sum(1).tolist()
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    layer = {e["group"]: e for e in summary["per_layer"]}

    acs = macs = ann_macs = 0
    snn_reads = ann_reads = 0
    skipped = 0
    for proj, out in OUT.items():
        name = f"model.layers.0.{SITE[proj]}.input_neuron"
        neuron = model.get_submodule(name)
        levels = _gif_levels(neuron, seen[name][0][0])  # (T, B, L, C)
        groups = _range_groups(neuron.salient, group_size)
        scales = groups if group_size else (2 if groups == 2 else 1)  # per-group ranges: one scale per group
        acs += int(levels.sum(dim=(0, 3))[real].sum()) * out
        macs += tokens * out * (scales + groups)
        ann_macs += tokens * IN[proj] * out
        silent = int((levels.sum(0) == 0)[real].sum())  # (token, channel) pairs that fire nothing at any step
        skipped += silent * out
        reads = (tokens * IN[proj] - silent) * out + tokens * groups * out  # weight rows + row sums of W
        assert layer[f"{GROUP[proj]}.{proj}"]["weight_reads"] * 2 == reads, proj
        assert layer[f"{GROUP[proj]}.{proj}"]["ann_weight_reads"] * 2 == tokens * IN[proj] * out
        snn_reads += reads
        ann_reads += tokens * IN[proj] * out
    assert skipped > 0  # the lowest channel of each range sits at code 0: its row is skipped
    for kind, suffix in (("key", "scores"), ("value", "context")):
        name = f"model.layers.0.self_attn.{kind}_neuron"
        neuron = model.get_submodule(name)
        per_key = _gif_levels(neuron, seen[name][0][0]).sum(dim=(0, 2, 4))  # (B, L)
        acs += sum(int(per_key[b, j]) * (n - j) * (H // HKV) for b, n in enumerate(lengths) for j in range(n))
        acs += tokens * H * D if kind == "key" else 0  # the row sums of Q for the zero-point term
        terms = sum(
            (_range_groups(neuron.salient[h, 0], group_size) * 2 if group_size else 4) for h in range(HKV)
        )  # a scale multiply and a zero-point term per range group, per K/V head
        macs += pairs * (H // HKV) * terms
        ann_macs += pairs * H * D
        assert layer[f"self_attn.{suffix}"]["weight_reads"] == 0  # no weights in Q K^T or P V
    assert summary["acs"] * 2 == acs and summary["macs"] * 2 == macs and summary["ann_macs"] * 2 == ann_macs

    # the whole model: + the LM head (real-valued), embedding rows, norm gains; element-wise ops as MACs
    head = tokens * HIDDEN * VOCAB
    elementwise = summary["elementwise"]
    ew_snn = sum(sum(ops.values()) for ops in elementwise["snn"].values()) * 2
    ew_ann = sum(sum(ops.values()) for ops in elementwise["ann"].values()) * 2
    other_reads = tokens * (HIDDEN * VOCAB + HIDDEN + 3 * HIDDEN)  # LM head, embedding row, 3 RMSNorm gains
    memory = summary["memory"]
    assert memory["blocks"]["snn_weight_reads_per_token"] == pytest.approx(snn_reads / tokens)
    assert memory["blocks"]["ann_weight_reads_per_token"] == pytest.approx(ann_reads / tokens)
    assert memory["whole_model"]["snn_weight_reads_per_token"] == pytest.approx((snn_reads + other_reads) / tokens)
    assert memory["whole_model"]["ann_weight_reads_per_token"] == pytest.approx((ann_reads + other_reads) / tokens)
    assert memory["blocks"]["skipped_fraction"] == pytest.approx(1 - snn_reads / ann_reads)
    for name, bits in BITS.items():
        add, multiply = HOROWITZ[ROW[name]]
        mac = add + multiply
        p = summary["precisions"][name]
        blocks_snn = (add * acs + mac * macs) * 1e-9 / tokens
        blocks_ann = mac * ann_macs * 1e-9 / tokens
        whole_snn = (add * acs + mac * (macs + head + ew_snn)) * 1e-9 / tokens
        whole_ann = mac * (ann_macs + head + ew_ann) * 1e-9 / tokens
        pj = MEMORY_PJ_PER_BIT * bits * 1e-9 / tokens
        expected = {
            "blocks": (blocks_snn, blocks_ann),
            "whole_model": (whole_snn, whole_ann),
            "blocks_with_memory": (blocks_snn + snn_reads * pj, blocks_ann + ann_reads * pj),
            "whole_model_with_memory": (
                whole_snn + (snn_reads + other_reads) * pj,
                whole_ann + (ann_reads + other_reads) * pj,
            ),
        }
        for scope, (snn, ann) in expected.items():
            assert p[scope]["snn_mJ_per_token"] == pytest.approx(snn, rel=1e-12), (name, scope)
            assert p[scope]["ann_mJ_per_token"] == pytest.approx(ann, rel=1e-12), (name, scope)
            assert p[scope]["snn_over_ann"] == pytest.approx(snn / ann, rel=1e-12), (name, scope)
    # fp32 at the default constants is the headline
    assert summary["precisions"]["fp32"]["blocks"]["snn_mJ_per_token"] == pytest.approx(summary["snn_mJ_per_token"])
    # spike generation: one per channel-step slot a neuron runs, in the whole model (SNN) only
    # (T = 2: every channel at step 0, the salient ones at step 1)
    slots = sum(tokens * (n.salient.numel() + int(n.salient.sum())) for _, n in neurons(model))
    assert elementwise["snn"]["blocks"]["spike_generation"] * 2 == slots
    assert elementwise["ann"]["blocks"]["spike_generation"] == 0


def test_elastic_weight_reads_skip_the_rows_of_silent_channels():
    model = _model(neuron="elastic", num_steps=2)
    for _, n in neurons(model):
        n.backend = "reference"
    ids = torch.randint(0, VOCAB, (1, 6))
    summary, seen = _run(model, ids)
    layer = {e["group"]: e for e in summary["per_layer"]}
    skipped_any = False
    for proj, out in OUT.items():
        spikes = seen[f"model.layers.0.{SITE[proj]}.input_neuron"][0][1]  # (T, B*L, C): alpha_t * s_t, ternary
        fired = int((spikes != 0).any(0).sum())  # (token, channel) pairs that fire at some step
        skipped_any |= fired < 6 * IN[proj]
        assert layer[f"{GROUP[proj]}.{proj}"]["weight_reads"] == fired * out, proj  # no row sums, no bias
        assert layer[f"{GROUP[proj]}.{proj}"]["acs"] == int((spikes != 0).sum()) * out  # one AC per |level| 1
    assert skipped_any


def test_native_spike_linear_reads_the_rows_of_channels_that_fire_and_its_bias():
    T, B, L, d_in, d_out = 3, 2, 5, 6, 7
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    layer = SpikeLinear(d_in, d_out, num_steps=T, alpha_init=1.0, reset="symmetric")
    x = 3.0 * torch.randint(-1, 2, (T, B, L, d_in)).float()  # every nonzero entry fires with its sign
    x[:, ~mask.bool()] = 3.0
    counter = OperationCounter(layer)
    with torch.no_grad(), counter, counter.tokens(mask):
        layer(x)
    real = mask.bool()
    fired = int((x != 0).any(0)[real].sum())
    assert fired < 8 * d_in  # some channel is silent at every step
    product = counter.products["SpikeLinear"]
    assert product.weight_reads == fired * d_out + 8 * d_out  # rows of the channels that fired + the bias
    assert product.ann_weight_reads == 8 * (d_in * d_out + d_out)


def test_decode_step_reads_the_rows_its_one_token_fires():
    model = _model(gif_group_size=4)
    summary, seen = _run(model, torch.randint(0, VOCAB, (1, 9)), decode=True)
    layer = {e["group"]: e for e in summary["per_layer"]}
    for proj, out in OUT.items():
        name = f"model.layers.0.{SITE[proj]}.input_neuron"
        neuron = model.get_submodule(name)
        x = seen[name][-1][0]  # the decode step's input (1, 1, C)
        fired = int((_gif_levels(neuron, x).sum(0) > 0).sum())
        groups = _range_groups(neuron.salient, 4)
        assert layer[f"{GROUP[proj]}.{proj}"]["weight_reads"] == (fired + groups) * out, proj
    assert summary["precisions"]["int8"]["whole_model_with_memory"]["snn_mJ_per_token"] > 0


def test_the_same_seed_gives_the_same_numbers():
    def once():
        model = _model(seed=3, gif_group_size=4)
        torch.manual_seed(4)
        ids = torch.randint(0, VOCAB, (2, 8))
        return json.dumps(measure_energy(model, [{"input_ids": ids}]), sort_keys=True)

    assert once() == once()


def test_the_source_reports_the_ann_figures_only():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    summary = measure_energy(model, [{"input_ids": torch.randint(0, VOCAB, (1, 5))}])
    linear = sum(IN[p] * OUT[p] for p in OUT)
    assert summary["memory"]["blocks"]["ann_weight_reads_per_token"] == linear
    assert summary["memory"]["blocks"]["snn_weight_reads_per_token"] is None
    for name, p in summary["precisions"].items():
        assert p["blocks"]["snn_mJ_per_token"] is None and p["blocks"]["snn_over_ann"] is None
        memory = linear * BITS[name] * MEMORY_PJ_PER_BIT * 1e-9
        assert p["blocks_with_memory"]["ann_mJ_per_token"] == pytest.approx(p["blocks"]["ann_mJ_per_token"] + memory)


def test_the_command_writes_and_prints_every_figure(tmp_path, capsys):
    from conftest import save_tiny_llama

    from spikelm.commands.main import main

    words = "the quick brown fox jumps over a lazy dog and runs far away into woods".split()
    source = tmp_path / "source"
    tok = save_tiny_llama(source, words, hidden_size=32, intermediate_size=64, tie_word_embeddings=False)
    model = LlamaForCausalLM.from_pretrained(source)
    spikelm.spikify(model, neuron="gif", calibration=torch.randint(3, len(tok.get_vocab()), (2, 16)))
    model.save_pretrained(tmp_path / "spiking")
    tok.save_pretrained(tmp_path / "spiking")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[i % len(words)] for i in range(200)))
    out = tmp_path / "out"
    args = ["energy", "--model", str(tmp_path / "spiking"), "--text-file", str(text), "--max-length", "24"]
    assert main([*args, "--max-sequences", "2", "--memory-pj-per-bit", "1.5", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "energy.json").read_text())
    assert summary["memory"]["pJ_per_bit"] == 1.5
    for name in ("fp32", "bf16", "int8"):
        assert f"  {name} (add " in printed
        assert summary["per_generated_token"]["precisions"][name]["whole_model_with_memory"]["snn_mJ_per_token"] > 0
    report = (out / "report.md").read_text()
    assert "## Both models at the same weight precision" in report and "**Not counted anywhere**" in report
    for key in summary["figures"]:
        assert f"`{key}`" in report
    assert main([*args, "--memory-pj-per-bit", "-1", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "--memory-pj-per-bit" in capsys.readouterr().err


# -- signed multi-level spikes, through the plug-in interface ----------------------------------------------------


class SignedLevelsNeuron(SpikingNeuron):
    """Signed codes -3..3 per token (scale max|x| / 3), a dead zone (|x| below that fraction of max|x| fires
    nothing), spikes over two
    steps of at most 2 levels (soft reset): a code of 3 fires 2 then 1. A reader multiplies each output by the
    token's scale once; no zero point."""

    name = "signed_levels_test"
    config_fields = {"signed_levels_test_dead_zone": 0.0}
    recipe_defaults = {"neuron": "signed_levels_test", "signed_levels_test_dead_zone": 0.0}
    cache_layout = "token_codes"

    def __init__(self, channels, dead_zone: float = 0.0):
        super().__init__()
        self.channel_shape, self.dead_zone = channels, dead_zone

    @classmethod
    def from_config(cls, fields, channels, per_step: bool):
        return cls(channels, cls.field(fields, "signed_levels_test_dead_zone"))

    def code(self, x):
        top = x.abs().amax(-1, keepdim=True).clamp_min(1e-8)
        code = torch.clamp(torch.round(x / (top / 3)), -3, 3)
        return torch.where(x.abs() < self.dead_zone * top, torch.zeros_like(code), code), top / 3

    def forward(self, x):
        with torch.no_grad():
            code, scale = self.code(x)
            out = (code * scale).to(x.dtype)
        return out + (x - x.detach()) if x.requires_grad else out

    def step_spikes(self, x, output):
        code = self.code(x)[0].long()
        first = code.sign() * code.abs().clamp(max=2)
        levels = torch.stack([first.abs(), (code - first).abs()])
        return levels, (levels > 0).long()

    def reader_macs(self, steps, outputs):
        return torch.tensor([outputs] + [0] * (steps - 1))

    def attention_ops(self, product, steps, pairs, heads, head_dim, queries):
        return torch.tensor([pairs * heads] + [0] * (steps - 1)), torch.zeros(steps, dtype=torch.int64)


@pytest.mark.parametrize("dead_zone", [0.0, 0.3])
def test_signed_levels_cost_one_ac_per_level_and_fan_out_and_silent_channels_skip_their_rows(monkeypatch, dead_zone):
    from spikelm.conversion.recipes import recipe
    from spikelm.nn.neurons import base

    monkeypatch.setitem(base._REGISTRY, SignedLevelsNeuron.name, SignedLevelsNeuron)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    model.config.use_cache = False  # full passes: the energy counted here needs no cache layer
    fields = {"rotation": "none", "online_down_proj_rotation": False, "signed_levels_test_dead_zone": dead_zone}
    spikelm.spikify(model, recipe(SignedLevelsNeuron.name, None, fields))
    ids = torch.randint(0, VOCAB, (1, 6))
    summary, seen = _run(model, ids)
    layer = {e["group"]: e for e in summary["per_layer"]}
    silent = 0
    for proj, out in OUT.items():
        name = f"model.layers.0.{SITE[proj]}.input_neuron"
        neuron = model.get_submodule(name)
        x = seen[name][0][0]
        code = neuron.code(x)[0]  # (1, 6, C)
        levels, _ = neuron.step_spikes(x, None)
        assert torch.equal(levels.sum(0), code.abs().long())  # a code of 3 fires 2 + 1 levels
        assert int((code.abs() == 3).sum()) > 0
        # a signed spike of level k into a linear of fan-out `out` costs k x out additions
        assert layer[f"{GROUP[proj]}.{proj}"]["acs"] == int(code.abs().sum()) * out, proj
        assert layer[f"{GROUP[proj]}.{proj}"]["macs"] == 6 * out, proj  # one scale multiply per output
        nonzero = int((code != 0).sum())
        silent += 6 * IN[proj] - nonzero
        assert layer[f"{GROUP[proj]}.{proj}"]["weight_reads"] == nonzero * out, proj  # no zero point, no row sums
    if dead_zone:
        assert silent > 0  # the dead zone silences channels: their rows are skipped
    for kind, suffix in (("key", "scores"), ("value", "context")):
        name = f"model.layers.0.self_attn.{kind}_neuron"
        per_key = model.get_submodule(name).code(seen[name][0][0])[0].abs().sum(dim=(1, 3))  # (B, L)
        hand = sum(int(per_key[0, j]) * (6 - j) * (H // HKV) for j in range(6))
        assert layer[f"self_attn.{suffix}"]["acs"] == hand, suffix
