"""Energy of converted models and their real-valued sources: the counter against hand counts.

Hand counts here are computed from the spikes the neurons emit (re-run step by step with the GIF reference path,
or read off the elastic neuron's output) and from the config's shapes, never from the counter's own helpers.
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import spikelm
from spikelm.conversion import neurons
from spikelm.evaluation.energy import measure_decode_energy, measure_energy
from spikelm.nn.gif import reference_gif_spikes

H, HKV, D, HIDDEN, INTER, VOCAB = 4, 2, 8, 32, 48, 40


def _config(layers=1):
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        max_position_embeddings=64,
    )


def _gif_model(layers=1):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(layers)).eval()
    calibration = torch.randint(0, VOCAB, (2, 12))
    spikelm.spikify(model, neuron="gif", rotation="none", online_down_proj_rotation=False, calibration=calibration)
    return model


def _capture(model):
    """Every neuron's inputs, in call order, recorded by hooks of the test's own."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        n.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, []).append(a[0].detach()))
        for name, n in neurons(model)
    ]
    return seen, handles


def _levels(neuron, x):
    """Spikes of a GIF neuron on x, step by step (the reference path), as int64 (T, ..., C)."""
    code = neuron.quantize(x)[0]
    return reference_gif_spikes(code, neuron.bits, neuron.num_steps).long()


OUT = {  # out_features of each reader, from the config
    "self_attn.q_proj": H * D,
    "self_attn.k_proj": HKV * D,
    "self_attn.v_proj": HKV * D,
    "self_attn.o_proj": HIDDEN,
    "mlp.gate_proj": INTER,
    "mlp.up_proj": INTER,
    "mlp.down_proj": HIDDEN,
}
HOSTS = {
    "self_attn.q_proj": "self_attn",
    "self_attn.k_proj": "self_attn",
    "self_attn.v_proj": "self_attn",
    "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp",
    "mlp.up_proj": "mlp",
    "mlp.down_proj": "mlp.down_proj",
}


def test_gif_forward_counts_equal_a_hand_count_with_padding():
    model = _gif_model()
    for _, n in neurons(model):
        assert n.has_saliency()  # two groups, two scales: 4 MACs per output (2 scale multiplies + 2 zero points)
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # right padding: tokens 5 and 6 of row 1 are not counted
    seen, handles = _capture(model)
    summary = measure_energy(model, [{"input_ids": ids, "attention_mask": mask}])
    for h in handles:
        h.remove()
    real = mask.bool()
    tokens = int(real.sum())
    layer = {e["group"]: e for e in summary["per_layer"]}
    n_seq = 2
    for reader, host in HOSTS.items():
        neuron = model.get_submodule(f"model.layers.0.{host}.input_neuron")
        x = seen[f"model.layers.0.{host}.input_neuron"][0]  # (B, L, C)
        levels = _levels(neuron, x).sum(dim=(0, 3))  # (B, L): sum of |level| over steps and channels
        hand_acs = int(levels[real].sum()) * OUT[reader]
        assert layer[reader]["acs"] * n_seq == hand_acs, reader
        assert layer[reader]["macs"] * n_seq == tokens * OUT[reader] * 4, reader
    # attention: keys j are read by the real queries i >= j of the same row, by H / HKV query heads each
    lengths = real.sum(1).tolist()
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    for product, kind in (("self_attn.scores", "key"), ("self_attn.context", "value")):
        neuron = model.get_submodule(f"model.layers.0.self_attn.{kind}_neuron")
        x = seen[f"model.layers.0.self_attn.{kind}_neuron"][0]  # (B, HKV, L, D)
        per_key = _levels(neuron, x).sum(dim=(0, 2, 4))  # (B, L)
        hand = 0
        for b, n in enumerate(lengths):
            for j in range(n):
                hand += int(per_key[b, j]) * (n - j) * (H // HKV)
        if kind == "key":
            hand += tokens * H * D  # row sums of Q for the zero-point term
        assert layer[product]["acs"] * n_seq == hand, product
        assert layer[product]["macs"] * n_seq == H * pairs * 4, product
        assert layer[product]["ann_macs"] * n_seq == pairs * H * D, product
    # firing rates per site: step 0 over every channel of the real tokens, step 1 over the salient ones
    neuron = model.get_submodule("model.layers.0.mlp.input_neuron")
    spikes = _levels(neuron, seen["model.layers.0.mlp.input_neuron"][0])
    rates = summary["neurons"]["model.layers.0.mlp.input_neuron"]["firing_rate"]
    assert rates[0] == pytest.approx(int((spikes[0][real] > 0).sum()) / (tokens * HIDDEN))
    assert rates[1] == pytest.approx(int((spikes[1][real] > 0).sum()) / (tokens * int(neuron.salient.sum())))


def test_gif_decode_step_counts_every_cached_key_once_for_the_new_query():
    model = _gif_model()
    ids = torch.randint(0, VOCAB, (1, 9))
    seen, handles = _capture(model)
    summary = measure_decode_energy(model, [{"input_ids": ids}])
    for h in handles:
        h.remove()
    layer = {e["group"]: e for e in summary["per_layer"]}
    assert summary["tokens_per_sequence"] == 1 and summary["context_tokens"] == 8
    for reader, host in HOSTS.items():
        name = f"model.layers.0.{host}.input_neuron"
        x = seen[name][-1]  # the decode step's input: (1, 1, C)
        assert x.shape[:2] == (1, 1)
        assert layer[reader]["acs"] == int(_levels(model.get_submodule(name), x).sum()) * OUT[reader]
        assert layer[reader]["macs"] == OUT[reader] * 4
    for product, kind in (("self_attn.scores", "key"), ("self_attn.context", "value")):
        name = f"model.layers.0.self_attn.{kind}_neuron"
        neuron = model.get_submodule(name)
        prefill, step = seen[name]  # 8 cached keys, then the new one
        assert prefill.shape[2] == 8 and step.shape[2] == 1
        levels = int(_levels(neuron, prefill).sum()) + int(_levels(neuron, step).sum())
        hand = levels * 1 * (H // HKV) + (H * D if kind == "key" else 0)
        assert layer[product]["acs"] == hand
        assert layer[product]["macs"] == H * 9 * 4  # one query, nine keys
        assert layer[product]["ann_macs"] == 9 * H * D


def _ann_per_token_linear_macs(config) -> int:
    """MACs per token of the block linears, from the config alone: in x out of each (q, k, v, o, gate, up, down)."""
    h, i = config.hidden_size, config.intermediate_size
    d = h // config.num_attention_heads
    kv = config.num_key_value_heads * d
    return config.num_hidden_layers * (h * h + 2 * h * kv + h * h + 3 * h * i)


def test_ann_count_of_the_source_is_the_hand_formula():
    torch.manual_seed(0)
    config = _config(layers=2)
    model = LlamaForCausalLM(config).eval()
    length = 6
    summary = measure_energy(model, [{"input_ids": torch.randint(0, VOCAB, (3, length))}])
    assert summary["spiking"] is False and summary["snn_mJ_per_sequence"] is None
    linear = _ann_per_token_linear_macs(config)
    # ~ the block parameters: every weight of the blocks' linear layers is one MAC per token (norms aside)
    weights = sum(p.numel() for n, p in model.model.layers.named_parameters() if n.endswith("proj.weight"))
    assert linear == weights
    pairs = length * (length + 1) // 2
    attention = 2 * config.num_hidden_layers * pairs * H * D
    assert summary["ann_macs"] == length * linear + attention
    assert summary["heads"]["macs"] == length * HIDDEN * VOCAB  # the LM head, real-valued
    # the decode step: one token through every linear, one query against `length` keys
    decode = measure_decode_energy(model, [{"input_ids": torch.randint(0, VOCAB, (2, length + 1))}])
    assert decode["ann_macs"] == linear + 2 * config.num_hidden_layers * (length + 1) * H * D
    assert decode["heads"]["macs"] == HIDDEN * VOCAB


def test_a_converted_model_reports_its_sources_ann_figure():
    torch.manual_seed(0)
    source = LlamaForCausalLM(_config(layers=2)).eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    ann = measure_energy(source, [{"input_ids": ids}])
    spikelm.spikify(source, neuron="elastic", num_steps=2, calibration=ids, rotation="none")
    spiking = measure_energy(source, [{"input_ids": ids}])
    assert spiking["spiking"] and spiking["ann_macs"] == ann["ann_macs"]
    assert spiking["whole_model"]["ann_mJ_per_sequence"] == pytest.approx(ann["whole_model"]["ann_mJ_per_sequence"])


def test_elastic_converted_linear_counts_are_nonzero_spikes_times_fan_out():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    spikelm.spikify(model, neuron="elastic", num_steps=2, calibration=ids, rotation="none")
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        n.register_forward_hook(lambda m, a, o, name=name: outputs.setdefault(name, o.detach()))
        for name, n in neurons(model)
    ]
    for _, n in neurons(model):
        n.backend = "reference"
    summary = measure_energy(model, [{"input_ids": ids}])
    for h in handles:
        h.remove()
    layer = {e["group"]: e for e in summary["per_layer"]}
    spikes = outputs["model.layers.0.mlp.input_neuron"]  # (T, B*L, C), alpha_t * s_t
    assert spikes.shape[0] == 2
    per_step = (spikes != 0).sum(dim=(1, 2))
    assert layer["mlp.gate_proj"]["acs_per_step"] == [float(v * INTER) / 2 for v in per_step]
    assert layer["mlp.gate_proj"]["macs"] == 2 * 6 * INTER  # one alpha per output and step, per sequence
    keys = outputs["model.layers.0.self_attn.key_neuron"]  # (T, B, HKV, L, D)
    per_key = (keys != 0).sum(dim=(0, 2, 4))  # (B, L)
    hand = sum(int(per_key[b, j]) * (6 - j) * (H // HKV) for b in range(2) for j in range(6))
    assert layer["self_attn.scores"]["acs"] * 2 == hand


# ---------------------------------------------------------------------------------------------
# The commands on a converted tiny LLaMA and its source
# ---------------------------------------------------------------------------------------------

WORDS = "the quick brown fox jumps over a lazy dog and runs far away into woods".split()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    source, spiking = root / "source", root / "spiking"
    tok = save_tiny_llama(source, WORDS, hidden_size=32, intermediate_size=64, tie_word_embeddings=False)
    vocab = tok.get_vocab()
    model = LlamaForCausalLM.from_pretrained(source)
    spikelm.spikify(model, neuron="gif", calibration=torch.randint(3, len(vocab), (2, 16)))
    model.save_pretrained(spiking)
    tok.save_pretrained(spiking)
    text = root / "text.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(400)))
    return {"source": source, "spiking": spiking, "text": text, "tokenizer": tok}


def test_generate_on_a_converted_model_uses_the_spike_cache_and_equals_full_forwards(
    converted, tmp_path, capsys, monkeypatch
):
    import json

    from transformers import AutoModelForCausalLM

    from spikelm.commands.main import main
    from spikelm.conversion.cache import GIFCodeLayer

    updates = []
    original = GIFCodeLayer.update
    monkeypatch.setattr(GIFCodeLayer, "update", lambda self, *a, **k: updates.append(1) or original(self, *a, **k))
    prompt, new = "the quick brown fox", 8
    out = tmp_path / "gen"
    code = main(
        ["generate", "--model", str(converted["spiking"]), "--prompt", prompt, "--max-new-tokens", str(new),
         "--output-dir", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert updates, "generate() did not go through the spike-code cache"
    continuation = json.loads((out / "generations.json").read_text())["generations"][0]["continuation"]
    # the reference: greedy decoding with a full forward pass per token, no cache
    tok = converted["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(converted["spiking"]).eval()
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    assert continuation == tok.decode(ids[0, start:], skip_special_tokens=True)
    assert len(continuation.split()) >= 1


def test_energy_command_on_converted_and_source_gives_both_figures(converted, tmp_path, capsys):
    import json

    from spikelm.commands.main import main

    results = {}
    for kind in ("source", "spiking"):
        out = tmp_path / kind
        args = ["energy", "--model", str(converted[kind]), "--text-file", str(converted["text"]), "--max-length", "24"]
        assert main([*args, "--max-sequences", "3", "--output-dir", str(out)]) == 0, capsys.readouterr().err
        results[kind] = json.loads((out / "energy.json").read_text())
        assert (out / "report.md").is_file()
    source, spiking = results["source"], results["spiking"]
    assert source["model_kind"] == "source" and source["snn_mJ_per_sequence"] is None
    assert spiking["model_kind"] == "converted" and spiking["snn_mJ_per_sequence"] > 0
    assert spiking["ann_macs"] == source["ann_macs"]  # the converted model's ANN figure is its source's
    for summary in (source, spiking):
        generated = summary["per_generated_token"]
        assert generated["context_tokens"] == 23 and generated["ann_mJ_per_sequence"] > 0
    assert spiking["per_generated_token"]["snn_mJ_per_sequence"] > 0
    assert spiking["neurons"] and all(0 <= r <= 1 for n in spiking["neurons"].values() for r in n["firing_rate"])


def test_elastic_decode_step_reads_every_cached_spike_once_per_query_head():
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    ids = torch.randint(0, VOCAB, (1, 7))
    spikelm.spikify(model, neuron="elastic", num_steps=2, calibration=ids, rotation="none")
    for _, n in neurons(model):
        n.backend = "reference"
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        n.register_forward_hook(lambda m, a, o, name=name: outputs.setdefault(name, []).append(o.detach()))
        for name, n in neurons(model)
    ]
    summary = measure_decode_energy(model, [{"input_ids": ids}])
    for h in handles:
        h.remove()
    layer = {e["group"]: e for e in summary["per_layer"]}
    for kind, product in (("key", "self_attn.scores"), ("value", "self_attn.context")):
        prefill, step = outputs[f"model.layers.0.self_attn.{kind}_neuron"]  # (T, 1, HKV, 6 | 1, D)
        assert prefill.shape[3] == 6 and step.shape[3] == 1
        per_step = (prefill != 0).sum(dim=(1, 2, 3, 4)) + (step != 0).sum(dim=(1, 2, 3, 4))
        assert layer[product]["acs_per_step"] == [float(v) * (H // HKV) for v in per_step]
        alphas = H * 7 if kind == "key" else H * D  # one alpha per score (7 keys) or per context output, per step
        assert layer[product]["macs_per_step"] == [float(alphas)] * 2
    gate = outputs["model.layers.0.mlp.input_neuron"][-1]  # the decode step's spikes (T, 1, C)
    assert layer["mlp.gate_proj"]["acs"] == int((gate != 0).sum()) * INTER


def test_gif_range_groups_count_one_scale_and_one_zero_point_per_group():
    import math

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    size = 3
    spikelm.spikify(
        model,
        neuron="gif",
        rotation="none",
        online_down_proj_rotation=False,
        gif_group_size=size,
        calibration=torch.randint(0, VOCAB, (2, 12)),
    )
    ids = torch.randint(0, VOCAB, (1, 6))
    summary = measure_energy(model, [{"input_ids": ids}])
    layer = {e["group"]: e for e in summary["per_layer"]}

    def groups(mask):  # range groups of one row of channels: the salient ones in runs of 3, then the others
        salient = int(mask.sum())
        return math.ceil(salient / size) + math.ceil((mask.numel() - salient) / size)

    for reader, host in HOSTS.items():
        neuron = model.get_submodule(f"model.layers.0.{host}.input_neuron")
        per_output = 2 * groups(neuron.salient)  # a scale multiply and a zero-point term per range group
        assert groups(neuron.salient) > 2, reader  # more ranges than the two channel sets
        assert layer[reader]["macs"] == 6 * OUT[reader] * per_output, reader
    pairs = 6 * 7 // 2
    for product, kind in (("self_attn.scores", "key"), ("self_attn.context", "value")):
        neuron = model.get_submodule(f"model.layers.0.self_attn.{kind}_neuron")
        per_head = [2 * groups(neuron.salient[h, 0]) for h in range(HKV)]
        assert layer[product]["macs"] == pairs * (H // HKV) * sum(per_head), product
