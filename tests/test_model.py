"""SpikeLM encoder models: parity with the authors and with BERT, every config option, HF conventions."""

import copy

import pytest
import torch
from conftest import load_fixture, random_batch, tiny_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForPreTraining,
    BertModel,
)

from spikelm import (
    ElasticBiSpikingNeuron,
    SpikeLinear,
    SpikeLMConfig,
    SpikeLMForMaskedLM,
    SpikeLMForPreTraining,
    SpikeLMForSequenceClassification,
    SpikeLMModel,
    collect_spike_stats,
    record_spike_stats,
)
from spikelm.conversion.official import bert_to_spikelm_state_dict


def official_model():
    from conftest import FIXTURES

    from spikelm.conversion.official import load_official_checkpoint

    return load_official_checkpoint(FIXTURES / "tiny_spikelm_bert_official_state_dict.safetensors")


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("output_attentions", [False, True])
def test_official_tiny_bert_logits(backend, output_attentions):
    io = load_fixture("tiny_spikelm_bert_official_io.safetensors")
    model = official_model()
    model.set_neuron_backend(backend)
    with torch.no_grad():
        out = model(
            input_ids=io["input_ids"],
            attention_mask=io["attention_mask"],
            token_type_ids=io["token_type_ids"],
            output_attentions=output_attentions,
        )
    torch.testing.assert_close(out.prediction_logits, io["prediction_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.seq_relationship_logits, io["seq_relationship_logits"], atol=1e-4, rtol=0)


def _bert_pair(**overrides):
    shape = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    shape.update(overrides)
    bert = BertForPreTraining(BertConfig(**shape)).eval()
    ours = SpikeLMForPreTraining(SpikeLMConfig(spiking=False, num_steps=4, **shape)).eval()
    ours.load_state_dict(bert_to_spikelm_state_dict(bert.state_dict()), strict=True)
    return bert, ours


def test_spiking_false_matches_transformers_bert():
    bert, ours = _bert_pair()
    batch = random_batch(ours.config)
    with torch.no_grad():
        b = bert(**batch, output_hidden_states=True)
        o = ours(**batch, output_hidden_states=True)
        bm = BertModel(bert.config).eval()
        bm.load_state_dict(bert.bert.state_dict(), strict=False)
        om = SpikeLMModel(ours.config).eval()
        om.load_state_dict(bert_to_spikelm_state_dict(bm.state_dict(), prefix=""), strict=True)
        bo, oo = bm(**batch), om(**batch)
    torch.testing.assert_close(o.prediction_logits, b.prediction_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.seq_relationship_logits, b.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    for x, y in zip(o.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oo.last_hidden_state, bo.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oo.pooler_output, bo.pooler_output, atol=1e-5, rtol=1e-5)


def test_spiking_false_has_no_neurons_and_no_time_copies():
    model = SpikeLMModel(tiny_config(spiking=False, num_steps=4))
    assert model.neurons() == []
    assert not any(isinstance(m, SpikeLinear) for m in model.modules())
    out = model(**random_batch(model.config), output_step_hidden_states=True)
    assert out.step_hidden_states[-1].shape[0] == 1


def test_every_linear_of_every_block_spikes_and_heads_do_not():
    config = tiny_config()
    model = SpikeLMForPreTraining(config)
    names = [n for n, _ in model.neurons()]
    per_layer = {
        "attention.self.qkv.neuron",
        "attention.self.key_spike",
        "attention.self.value_spike",
        "attention.output.dense.neuron",
        "intermediate.dense.neuron",
        "output.dense.neuron",
    }
    expected = {f"bert.encoder.layer.{i}.{n}" for i in range(config.num_hidden_layers) for n in per_layer}
    assert set(names) == expected
    for name, module in model.named_modules():
        if name.startswith(("cls", "bert.pooler", "bert.embeddings")):
            assert not isinstance(module, (SpikeLinear, ElasticBiSpikingNeuron))


def test_spike_levels_binary_emits_only_zero_and_alpha():
    model = SpikeLMModel(tiny_config(spike_levels="binary")).eval()
    spikes = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: spikes.__setitem__(n, (out, mod.alpha.detach())))
        for n, m in model.neurons()
    ]
    model(**random_batch(model.config))
    for h in hooks:
        h.remove()
    assert spikes
    for out, alpha in spikes.values():
        q = out / alpha.view(-1, *([1] * (out.dim() - 1)))
        assert set(q.unique().tolist()) <= {0.0, 1.0}


def test_ternary_model_emits_negative_spikes():
    model = SpikeLMModel(tiny_config()).eval()
    with record_spike_stats(model):
        model(**random_batch(model.config))
    stats = collect_spike_stats(model)
    assert len(stats) == len(model.neurons())
    assert all(sum(s["negative_rate"]) > 0 for s in stats.values())


@pytest.mark.parametrize("T", [1, 2, 4])
def test_num_steps_sets_time_axis_and_alpha_shape(T):
    model = SpikeLMModel(tiny_config(num_steps=T)).eval()
    out = model(**random_batch(model.config), output_step_hidden_states=True)
    assert all(h.shape[0] == T for h in out.step_hidden_states)
    assert all(n.alpha.shape == (T,) for _, n in model.neurons())
    torch.testing.assert_close(out.last_hidden_state, out.step_hidden_states[-1].mean(0))


def test_use_amplitude_false_and_numeric_alpha_init():
    model = SpikeLMModel(tiny_config(use_amplitude=False, alpha_init=0.3)).eval()
    assert model.alphas_initialized
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o)) for n, m in model.neurons()]
    model(**random_batch(model.config))
    for h in hooks:
        h.remove()
    assert all(set(o.unique().tolist()) <= {-1.0, 0.0, 1.0} for o in outs.values())
    assert all(torch.all(m.alpha == 0.3) for _, m in model.neurons())


def test_learn_alpha_gives_alpha_gradients_in_the_model():
    model = SpikeLMForSequenceClassification(tiny_config(learn_alpha=True, num_labels=3))
    batch = random_batch(model.config)
    model(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
    for name, neuron in model.neurons():
        assert neuron.alpha.requires_grad and neuron.alpha.grad is not None, name
    frozen = SpikeLMForSequenceClassification(tiny_config(num_labels=3))
    frozen(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert all(n.alpha.grad is None for _, n in frozen.neurons())
    assert frozen.bert.encoder.layer[0].attention.self.qkv.weight.grad is not None


def test_reset_option_changes_outputs():
    batch = random_batch(tiny_config())
    torch.manual_seed(1)
    a = SpikeLMModel(tiny_config(reset="official")).eval()
    b = SpikeLMModel(tiny_config(reset="symmetric")).eval()
    b.load_state_dict(a.state_dict())
    b.apply(lambda m: m.reset_alpha() if isinstance(m, ElasticBiSpikingNeuron) else None)
    assert not torch.allclose(a(**batch).last_hidden_state, b(**batch).last_hidden_state)


def test_hidden_act_and_head_hidden_act_are_separate():
    model = SpikeLMForPreTraining(tiny_config(hidden_act="gelu", head_hidden_act="relu"))
    assert isinstance(model.cls.predictions.transform.transform_act_fn, torch.nn.ReLU)
    assert "GELU" in type(model.bert.encoder.layer[0].intermediate.intermediate_act_fn).__name__


def test_block_layer_norm_eps_and_layer_norm_eps():
    model = SpikeLMForPreTraining(tiny_config(layer_norm_eps=1e-5, block_layer_norm_eps=1e-7))
    assert model.bert.embeddings.LayerNorm.eps == 1e-5
    assert model.cls.predictions.transform.LayerNorm.eps == 1e-5
    assert model.bert.encoder.layer[0].output.LayerNorm.eps == 1e-7


def test_padding_does_not_change_real_tokens_when_alphas_fixed():
    model = SpikeLMModel(tiny_config(alpha_init=0.5)).eval()
    ids = torch.randint(1, 97, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1).long()
    a = model(input_ids=ids).last_hidden_state
    b = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, :6]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_outputs_are_bert_shaped():
    config = tiny_config()
    model = SpikeLMModel(config).eval()
    batch = random_batch(config, batch=2, length=10)
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    assert out.last_hidden_state.shape == (2, 10, 32)
    assert out.pooler_output.shape == (2, 32)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 10, 32) for h in out.hidden_states)
    assert all(a.shape == (2, 2, 10, 10) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 2, 10))
    assert out.attentions[0][-1, :, :, 8:].abs().max() == 0  # padded keys get no attention
    tup = model(**batch, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.last_hidden_state)


def test_sdpa_and_explicit_attention_agree():
    model = SpikeLMForPreTraining(tiny_config()).eval()
    batch = random_batch(model.config)
    a = model(**batch).prediction_logits
    b = model(**batch, output_attentions=True).prediction_logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fused_and_reference_model_agree_with_gradients():
    torch.manual_seed(3)
    model = SpikeLMForPreTraining(tiny_config())
    ref = copy.deepcopy(model)
    ref.set_neuron_backend("reference")
    batch = random_batch(model.config)
    labels = torch.where(torch.rand(3, 12) < 0.3, batch["input_ids"], torch.full((3, 12), -100))
    lf = model(**batch, labels=labels, next_sentence_label=torch.tensor([0, 1, 0])).loss
    lr = ref(**batch, labels=labels, next_sentence_label=torch.tensor([0, 1, 0])).loss
    torch.testing.assert_close(lf, lr, atol=1e-5, rtol=1e-5)
    lf.backward()
    lr.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_pretraining_loss_mlm_and_nsp():
    model = SpikeLMForPreTraining(tiny_config()).eval()
    batch = random_batch(model.config)
    labels = batch["input_ids"].clone()
    labels[:, ::2] = -100
    nsp = torch.tensor([0, 1, 1])
    full = model(**batch)  # no labels: logits at every position
    assert full.prediction_logits.shape == (3, 12, 97) and full.loss is None
    out = model(**batch, labels=labels, next_sentence_label=nsp)
    mlm = torch.nn.functional.cross_entropy(full.prediction_logits.reshape(-1, 97), labels.reshape(-1))
    nsp_loss = torch.nn.functional.cross_entropy(out.seq_relationship_logits, nsp)
    torch.testing.assert_close(out.loss, mlm + nsp_loss)
    only_mlm = model(**batch, labels=labels)
    torch.testing.assert_close(only_mlm.loss, mlm)
    # by default the logits keep transformers' shape (B, L, V), labels or not
    assert out.prediction_logits.shape == (3, 12, 97) and out.seq_relationship_logits.shape == (3, 2)
    # masked_logits_only=True (pretraining's fast path): the head ran only at the masked positions
    fast = model(**batch, labels=labels, next_sentence_label=nsp, masked_logits_only=True)
    masked = labels != -100
    assert fast.prediction_logits.shape == (int(masked.sum()), 97)
    torch.testing.assert_close(fast.prediction_logits, full.prediction_logits[masked])
    torch.testing.assert_close(fast.loss, out.loss)


def test_masked_positions_loss_and_gradients_equal_the_full_computation():
    from spikelm import SpikeLMForMaskedLM

    torch.manual_seed(1)
    config = tiny_config(hidden_dropout_prob=0.0)
    model = SpikeLMForMaskedLM(config).train()
    batch = random_batch(config)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, 3], labels[1, 5], labels[2, 1] = 7, 11, 13
    model(**batch)  # initialise alpha
    out = model(**batch, labels=labels, masked_logits_only=True)
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(**batch).logits
    full = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), labels.reshape(-1))
    full.backward()
    torch.testing.assert_close(out.loss, full)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_masked_lm_and_classification_heads():
    config = tiny_config()
    mlm = SpikeLMForMaskedLM(config).eval()
    batch = random_batch(config)
    out = mlm(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (3, 12, 97) and out.loss.ndim == 0  # transformers' shape with labels too
    assert mlm(**batch, labels=batch["input_ids"], masked_logits_only=True).logits.shape == (36, 97)
    assert mlm(**batch).logits.shape == (3, 12, 97)
    reg = SpikeLMForSequenceClassification(tiny_config(num_labels=1)).eval()
    out = reg(**batch, labels=torch.tensor([0.5, 1.0, -2.0]))
    torch.testing.assert_close(
        out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, 1.0, -2.0]))
    )
    clf = SpikeLMForSequenceClassification(tiny_config(num_labels=3)).eval()
    out = clf(**batch, labels=torch.tensor([2, 0, 1]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([2, 0, 1])))


def test_decoder_tied_by_default():
    model = SpikeLMForPreTraining(tiny_config())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    untied = SpikeLMForPreTraining(tiny_config(tie_word_embeddings=False))
    assert untied.cls.predictions.decoder.weight is not untied.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize(
    "cls,auto",
    [
        (SpikeLMModel, AutoModel),
        (SpikeLMForPreTraining, AutoModelForPreTraining),
        (SpikeLMForMaskedLM, AutoModelForMaskedLM),
        (SpikeLMForSequenceClassification, AutoModelForSequenceClassification),
    ],
)
def test_save_load_roundtrip_with_auto_classes(tmp_path, cls, auto):
    model = cls(tiny_config(learn_alpha=True)).eval()
    batch = random_batch(model.config)
    with torch.no_grad():
        ref = model(**batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "spikelm"
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    assert loaded.alphas_initialized
    for (_, a), (_, b) in zip(model.neurons(), loaded.neurons(), strict=True):
        assert torch.equal(a.alpha, b.alpha) and b.alpha.requires_grad
    with torch.no_grad():
        out = loaded(**batch)
    torch.testing.assert_close(out[0], ref[0], atol=0, rtol=0)


def test_uninitialised_alphas_stay_uninitialised_through_save(tmp_path):
    model = SpikeLMForPreTraining(tiny_config())
    model.save_pretrained(tmp_path)
    loaded = SpikeLMForPreTraining.from_pretrained(tmp_path)
    assert not loaded.alphas_initialized


def test_deepcopy_works_and_is_independent():
    model = SpikeLMForPreTraining(tiny_config()).eval()
    batch = random_batch(model.config)
    model(**batch)
    clone = copy.deepcopy(model)
    assert clone.alphas_initialized
    torch.testing.assert_close(clone(**batch).prediction_logits, model(**batch).prediction_logits)
    with torch.no_grad():
        clone.bert.encoder.layer[0].attention.self.qkv.neuron.alpha.mul_(2)
    assert not torch.equal(
        clone.bert.encoder.layer[0].attention.self.qkv.neuron.alpha,
        model.bert.encoder.layer[0].attention.self.qkv.neuron.alpha,
    )


def test_config_roundtrip_keeps_every_spiking_field(tmp_path):
    config = tiny_config(
        num_steps=2,
        spike_levels="binary",
        use_amplitude=False,
        alpha_init=0.25,
        reset="symmetric",
        spiking=True,
        head_hidden_act="relu",
    )
    config.save_pretrained(tmp_path)
    loaded = SpikeLMConfig.from_pretrained(tmp_path)
    for field in (
        "num_steps",
        "spike_levels",
        "use_amplitude",
        "alpha_init",
        "learn_alpha",
        "reset",
        "spiking",
        "hidden_act",
        "head_hidden_act",
        "block_layer_norm_eps",
    ):
        assert getattr(loaded, field) == getattr(config, field), field


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spike_levels": "ternery"}, "spike_levels"),
        ({"reset": "hard"}, "reset"),
        ({"num_steps": 0}, "num_steps"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "multiple"),
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"spiking": "yes"}, "spiking"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_bad_model_inputs():
    model = SpikeLMModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids=torch.randint(0, 97, (12,)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.randint(0, 97, (1, 40)))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=torch.randint(0, 97, (2, 5)), attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_fill_mask_pipeline_and_trainer_shapes_on_a_saved_masked_lm(tmp_path):
    """transformers' contracts: pipeline("fill-mask") on a saved SpikeLMForMaskedLM with its tokenizer."""
    from transformers import pipeline

    from spikelm.data.tokenization import load_tokenizer

    tokenizer = load_tokenizer("bert-base-uncased")
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model = SpikeLMForMaskedLM(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    fill = pipeline("fill-mask", model=str(tmp_path), tokenizer=str(tmp_path), top_k=3)
    result = fill("the quick brown [MASK] jumps.")
    assert len(result) == 3 and all("token_str" in r and "score" in r for r in result)
    enc = tokenizer(["a [MASK] b"], return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    labels[0, 2] = 1996
    out = SpikeLMForMaskedLM.from_pretrained(tmp_path)(**enc, labels=labels)
    assert out.logits.shape == (*enc["input_ids"].shape, len(tokenizer))  # compute_metrics sees (B, L, V)
