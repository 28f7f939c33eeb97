"""Energy estimate: operation counts against hand counts, the paper's BERT-base check, padding, the command."""

import json
from pathlib import Path

import pytest
import torch
from conftest import random_batch, tiny_config

from spikelm import (
    SpikeLinear,
    SpikeLMConfig,
    SpikeLMForPreTraining,
    SpikeLMModel,
    collect_spike_stats,
    record_spike_stats,
)
from spikelm.commands.main import main
from spikelm.data.tokenization import load_bert_tokenizer, sample_text_path
from spikelm.evaluation.energy import EnergyConstants, OperationCounter, attention_fan_out, measure_energy
from spikelm.models.modeling_spikelm import SpikeLMSelfAttention, additive_attention_mask


def ternary_input(shape, mask):
    """Entries in {-3, 0, +3}: with alpha = 1 and the symmetric reset every nonzero entry fires with its sign
    and every zero stays silent, so the spikes are sign(x) and their number is known. Padding rows are nonzero
    too, so counting them would show."""
    x = 3.0 * torch.randint(-1, 2, shape).float()
    x[:, ~mask.bool()] = 3.0
    return x


def count(module, mask, *inputs, **kwargs):
    counter = OperationCounter(module)
    with torch.no_grad(), counter, counter.tokens(mask):
        module(*inputs, **kwargs)
    return counter


def test_spike_linear_hand_count():
    T, B, L, d_in, d_out = 3, 2, 5, 6, 7
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    layer = SpikeLinear(d_in, d_out, num_steps=T, alpha_init=1.0, reset="symmetric")
    x = ternary_input((T, B, L, d_in), mask)
    counter = count(layer, mask, x)

    real = mask.bool()
    nonzero = [int((x[t][real] != 0).sum()) for t in range(T)]
    product = counter.products["SpikeLinear"]
    assert product.acs.tolist() == [n * d_out for n in nonzero]  # nonzero inputs x fan-out
    assert product.macs.tolist() == [8 * d_out] * T  # one alpha per output, 8 real tokens
    assert product.ann_macs == 8 * d_in * d_out
    neuron = counter.neurons["neuron"]
    assert neuron.positive.tolist() == [int((x[t][real] > 0).sum()) for t in range(T)]
    assert neuron.negative.tolist() == [int((x[t][real] < 0).sum()) for t in range(T)]
    assert neuron.slots.tolist() == [8 * d_in] * T
    assert layer.neuron.backend == "auto"  # restored after counting


def test_no_alpha_multiplication_without_amplitude():
    mask = torch.ones(1, 4, dtype=torch.long)
    layer = SpikeLinear(3, 2, num_steps=2, alpha_init=1.0, reset="symmetric", use_amplitude=False)
    counter = count(layer, mask, ternary_input((2, 1, 4, 3), mask))
    assert counter.products["SpikeLinear"].macs.tolist() == [0, 0]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_hand_count(causal):
    """Q K^T and P V with ternary K and V: each nonzero K (or V) entry is used once per query attending to it.

    ``causal`` marks the module causal (as the decoder's attention will be): only the counting changes.
    """
    T, B, L, D, H = 2, 3, 6, 4, 2
    config = tiny_config(hidden_size=D, num_attention_heads=H, num_steps=T, alpha_init=1.0, reset="symmetric")
    attention = SpikeLMSelfAttention(config).eval()
    attention.is_causal = causal
    with torch.no_grad():  # Q = K = V = the input spikes; K and V re-spike them unchanged (alpha = 1)
        attention.qkv.weight.copy_(torch.cat([torch.eye(D)] * 3))
        attention.qkv.bias.zero_()
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    x = ternary_input((T, B, L, D), mask)
    counter = count(attention, mask, x, additive_attention_mask(mask, x.dtype))

    real = mask.bool()
    nonzero = [int((x[t][real] != 0).sum()) for t in range(T)]
    # a nonzero entry at key j of sequence b feeds every real query i of b that attends to j
    attends = [
        [[real[b, i] and real[b, j] and (i >= j or not causal) for j in range(L)] for i in range(L)] for b in range(B)
    ]
    fan_out = [[sum(attends[b][i][j] for i in range(L)) for j in range(L)] for b in range(B)]
    pairs = sum(map(sum, fan_out))
    fanned = [sum(int((x[t, b, j] != 0).sum()) * fan_out[b][j] for b in range(B) for j in range(L)) for t in range(T)]
    qkv = counter.products["qkv"]
    assert qkv.acs.tolist() == [n * 3 * D for n in nonzero]
    assert qkv.macs.tolist() == [12 * 3 * D] * T
    scores = counter.products["SpikeLMSelfAttention.scores"]
    assert scores.acs.tolist() == fanned
    assert scores.macs.tolist() == [H * pairs] * T  # one alpha per score and head
    assert scores.ann_macs == pairs * D
    context = counter.products["SpikeLMSelfAttention.context"]
    assert context.acs.tolist() == fanned
    assert context.macs.tolist() == [12 * D] * T  # one alpha per context output
    assert context.ann_macs == pairs * D
    assert counter.elementwise["blocks"]["softmax"] == T * H * pairs
    assert counter.neurons["key_spike"].positive.tolist() == [int((x[t][real] > 0).sum()) for t in range(T)]


def test_attention_fan_out():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert attention_fan_out(mask).tolist() == [[3, 3, 3, 0], [4, 4, 4, 4]]
    assert attention_fan_out(mask, causal=True).tolist() == [[3, 2, 1, 0], [4, 3, 2, 1]]  # queries at or after


def test_bert_base_ann_check():
    """SPEC section 6: BERT-base at 128 tokens = 11.17 G MACs = 51.40 mJ (the score scaling left out)."""
    config = SpikeLMConfig(spiking=False)
    model = SpikeLMModel(config)
    summary = measure_energy(model, [{"input_ids": torch.randint(1000, 2000, (1, 128))}])
    N, L, D, F = config.num_hidden_layers, 128, config.hidden_size, config.intermediate_size
    linear, attention = N * L * (4 * D * D + 2 * D * F), 2 * N * L * L * D
    assert summary["ann_macs"] == linear + attention
    assert round(summary["ann_macs"] / 1e9, 2) == 11.17 and round(summary["ann_mJ_per_sequence"], 2) == 51.40
    assert summary["elementwise"]["ann"]["blocks"]["score_scaling"] == N * config.num_attention_heads * L * L
    assert summary["heads"]["macs"] == D * D  # the pooler, on the first token only
    assert not summary["spiking"] and summary["snn_mJ_per_sequence"] is None and summary["ratio"] is None


def test_ann_figure_equals_the_real_valued_model():
    batch = random_batch(tiny_config())
    spiking = measure_energy(SpikeLMForPreTraining(tiny_config(num_steps=3)), [batch])
    ann = measure_energy(SpikeLMForPreTraining(tiny_config(spiking=False)), [batch])
    assert [e["ann_macs"] for e in spiking["per_layer"]] == [e["macs"] for e in ann["per_layer"]]
    assert [e["name"] for e in spiking["per_layer"]] == [e["name"] for e in ann["per_layer"]]
    assert spiking["ann_mJ_per_sequence"] == ann["ann_mJ_per_sequence"]
    assert spiking["heads"]["macs"] == ann["heads"]["macs"]
    assert spiking["elementwise"]["ann"] == ann["elementwise"]["ann"]
    assert spiking["elementwise"]["snn"]["blocks"]["layernorm"] == 3 * ann["elementwise"]["ann"]["blocks"]["layernorm"]


def test_counts_agree_with_the_neurons_own_counters():
    """Every neuron is seen, with the spikes the fused path emits; each linear's ACs = its spikes x fan-out."""
    model = SpikeLMForPreTraining(tiny_config(num_steps=4)).eval()
    batch = random_batch(model.config, pad_from=12)  # no padding
    with torch.no_grad(), record_spike_stats(model):
        model(**batch)
    fused = collect_spike_stats(model)
    counter = OperationCounter(model)
    with torch.no_grad(), counter, counter.tokens(batch["attention_mask"]):
        model(**batch)
    assert set(counter.neurons) == set(fused) == {name for name, _ in model.neurons()}
    for name, stats in fused.items():
        assert counter.neurons[name].positive.tolist() == [
            round(r * s) for r, s in zip(stats["positive_rate"], stats["slots"], strict=True)
        ]
        assert counter.neurons[name].slots.tolist() == stats["slots"]
    for name, product in counter.products.items():
        if product.kind == "linear" and product.neuron is not None:
            spikes = counter.neurons[product.neuron].positive + counter.neurons[product.neuron].negative
            assert product.acs.tolist() == (spikes * model.get_submodule(name).out_features).tolist()
    summary = counter.summary()
    assert summary["mean_firing_rate"] == pytest.approx(
        sum(sum(s["spikes"]) for s in fused.values()) / sum(sum(s["slots"]) for s in fused.values())
    )
    assert all(n.backend == "auto" for _, n in model.neurons())


def test_padded_batch_counts_only_real_tokens():
    """A padded batch counts exactly what its examples count one by one without padding."""
    from spikelm.evaluation.energy_report import padded_batches

    tokenizer = load_bert_tokenizer()
    model = SpikeLMModel(tiny_config(vocab_size=tokenizer.vocab_size, num_steps=2)).eval()
    sentences = ["shall i compare thee to a summer's day?", "thou art more lovely"]
    features = [tokenizer(s) for s in sentences]
    with torch.no_grad():  # alpha is set on the first batch (padding included): fix it before comparing
        model(**next(padded_batches(features, tokenizer, 2)))

    def run(batches):
        counter = OperationCounter(model)
        with torch.no_grad(), counter:
            for batch in batches:
                with counter.tokens(batch["attention_mask"]):
                    model(**batch)
        return counter

    padded = run(padded_batches(features, tokenizer, 2))
    single = run(padded_batches(features, tokenizer, 1))
    assert padded.num_tokens == single.num_tokens == sum(len(f["input_ids"]) for f in features)
    assert int((next(padded_batches(features, tokenizer, 2))["attention_mask"] == 0).sum()) > 0
    for name, product in padded.products.items():
        other = single.products[name]
        for attr in ("acs", "macs"):  # the pooler has no ACs
            mine, theirs = getattr(product, attr), getattr(other, attr)
            assert (mine is None and theirs is None) or mine.tolist() == theirs.tolist(), (name, attr)
        assert product.ann_macs == other.ann_macs, name
    for name, neuron in padded.neurons.items():
        assert neuron.slots.tolist() == single.neurons[name].slots.tolist()


def test_summary_energy_formula():
    model = SpikeLMForPreTraining(tiny_config(num_steps=2))
    constants = EnergyConstants(ac_pJ=1.5, mac_pJ=7.0)
    s = measure_energy(model, [random_batch(model.config)], constants)
    assert s["snn_mJ_per_sequence"] == pytest.approx((1.5 * s["acs"] + 7.0 * s["macs"]) * 1e-9)
    assert s["ann_mJ_per_sequence"] == pytest.approx(7.0 * s["ann_macs"] * 1e-9)
    assert s["ratio"] == pytest.approx(s["ann_mJ_per_sequence"] / s["snn_mJ_per_sequence"])
    assert s["acs"] == pytest.approx(sum(e["acs"] for e in s["per_layer"]))
    assert model.training  # measure_energy restores the mode


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    shape = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=48
    )
    torch.manual_seed(0)
    SpikeLMForPreTraining(SpikeLMConfig(num_steps=2, **shape)).save_pretrained(root / "snn")
    SpikeLMForPreTraining(SpikeLMConfig(spiking=False, **shape)).save_pretrained(root / "ann")
    return root


def test_energy_command(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "energy",
            "--model",
            str(model_dirs / "snn"),
            "--text-file",
            str(sample_text_path()),
            "--max-length",
            "32",
            "--max-sequences",
            "6",
            "--batch-size",
            "4",
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / "energy.json").read_text())
    assert result["num_sequences"] == 6 and result["sequence_length"] == 32 and result["tokens_per_sequence"] == 32
    assert result["constants_pJ"] == {"ac": 0.9, "mac": 4.6}
    assert result["ratio"] == pytest.approx(result["ann_mJ_per_sequence"] / result["snn_mJ_per_sequence"])
    assert 0 < result["mean_firing_rate"] < 1
    assert len(result["per_layer"]) == 2 * 6  # qkv, Q K^T, P V, attention output, FFN up, FFN down per block
    for entry in result["per_layer"]:
        assert {"name", "kind", "acs", "macs", "firing_rate", "alpha"} <= set(entry)
        assert len(entry["firing_rate"]) == len(entry["alpha"]) == 2
    for png in ("firing_rate_heatmap.png", "spike_signs.png", "energy_by_layer_type.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "E = E_AC x ACs + E_MAC x MACs" in report and "0.9 pJ" in report and "4.6 pJ" in report
    assert "ratio ANN/SNN" in capsys.readouterr().out


def test_energy_command_non_spiking_model(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "energy",
            "--model",
            str(model_dirs / "ann"),
            "--text-file",
            str(sample_text_path()),
            "--max-length",
            "32",
            "--max-sequences",
            "2",
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    assert "not spiking" in capsys.readouterr().out
    result = json.loads((out / "energy.json").read_text())
    assert result["snn_mJ_per_sequence"] is None and result["ratio"] is None and result["ann_mJ_per_sequence"] > 0
    assert (out / "energy_by_layer_type.png").is_file() and not (out / "firing_rate_heatmap.png").exists()
    assert "not spiking" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "text, extra, message",
    [
        ("", [], "is empty"),
        ("  \n\n ", [], "is empty"),
        ("a few words only", [], "fewer than one full window"),
        (None, [], "no such file"),
        ("plenty of text " * 50, ["--max-length", "64"], "--max-length 64 exceeds"),
        ("plenty of text " * 50, ["--max-length", "0"], "argument --max-length: must be at least 2"),
    ],
)
def test_energy_command_bad_input(model_dirs, tmp_path, capsys, text, extra, message):
    text_file = tmp_path / "text.txt"
    if text is not None:
        text_file.write_text(text)
    out = tmp_path / "out"
    rc = main(
        [
            "energy",
            "--model",
            str(model_dirs / "snn"),
            "--text-file",
            str(text_file),
            "--max-length",
            "32",
            *extra,
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_energy_command_missing_model(tmp_path, capsys):
    rc = main(
        [
            "energy",
            "--model",
            str(tmp_path),
            "--text-file",
            str(sample_text_path()),
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2 and "no config.json" in capsys.readouterr().err


def test_causal_decoder_attention_counts_use_causal_fan_out():
    from spikelm import SpikeLMConfig
    from spikelm.models.modeling_spikelm_causal import SpikeLMForCausalLM

    cfg = SpikeLMConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_steps=2,
    )
    model = SpikeLMForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 10))
    seen = {}
    attention = next(m for m in model.modules() if getattr(m, "key_spike", None) is not None)
    hook = attention.key_spike.register_forward_hook(lambda mod, i, out: seen.__setitem__("k", out.detach()))
    from spikelm.evaluation.energy import measure_energy

    result = measure_energy(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    hook.remove()
    k = seen["k"].flatten(3)  # (T, B, L, H*d), whatever the head layout
    fan_out = torch.arange(10, 0, -1)  # key j is read by the queries j..L-1
    expected = int(((k != 0).sum(-1) * fan_out).sum()) / 2  # per sequence
    scores = next(p for p in result["per_layer"] if p["kind"] == "attention_scores")
    assert scores["acs"] == expected


def test_energy_command_on_a_task_counts_real_tokens_only(model_dirs, tmp_path):
    from spikelm.data.tokenization import load_bert_tokenizer

    data_dir = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
    out = tmp_path / "task"
    rc = main(
        [
            "energy",
            "--model",
            str(model_dirs / "snn"),
            "--task",
            "sst2",
            "--data-dir",
            str(data_dir),
            "--max-length",
            "32",
            "--batch-size",
            "4",
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / "energy.json").read_text())
    rows = (data_dir / "dev.tsv").read_text().splitlines()[1:]
    sentences = [r.split("\t")[0] for r in rows if r.strip()]
    lengths = [len(ids) for ids in load_bert_tokenizer()(sentences, truncation=True, max_length=32)["input_ids"]]
    assert result["num_sequences"] == len(sentences)
    assert result["tokens_per_sequence"] == pytest.approx(sum(lengths) / len(lengths))
    assert "sst2/dev" in result["source"]


def test_energy_task_errors(model_dirs, tmp_path, capsys):
    rc = main(
        [
            "energy",
            "--model",
            str(model_dirs / "snn"),
            "--task",
            "sst2",
            "--data-dir",
            str(tmp_path),
            "--max-length",
            "32",
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "no dev.tsv" in capsys.readouterr().err
    data_dir = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
    rc = main(
        [
            "energy",
            "--model",
            str(model_dirs / "snn"),
            "--task",
            "sst2",
            "--data-dir",
            str(data_dir),
            "--split",
            "validation",
            "--max-length",
            "32",
            "--output-dir",
            str(tmp_path / "o2"),
        ]
    )
    assert rc == 2 and "not a split" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
