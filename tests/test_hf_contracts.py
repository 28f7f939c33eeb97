"""The Hugging Face contracts users rely on: ``transformers.Trainer`` with ``compute_metrics`` and the
``fill-mask``, ``text-classification`` and ``text-generation`` pipelines on SpikeLM models built with the public
API and saved with the shipped bert-base-uncased tokenizer; the pyproject lower bounds are the tested versions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from spikelm import SpikeLMForCausalLM, SpikeLMForMaskedLM, SpikeLMForSequenceClassification
from spikelm.data.tokenization import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["the quick brown fox jumps.", "a lazy dog sleeps all day.", "spikes carry the signal.", "hello world."]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bert-base-uncased")


def _config(tokenizer, **overrides):
    return tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_steps=2, **overrides)


def _warmed_up(model, tokenizer):
    """The alphas set from a first batch (as after training), so that every later input sees the same model."""
    model.eval()
    with torch.no_grad():
        model(**tokenizer(SENTENCES, return_tensors="pt", padding=True))
    return model


def _training_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path / "trainer"),
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _masked_examples(tokenizer):
    """Fixed-length MLM examples: every third real token masked (labels -100 elsewhere)."""
    enc = tokenizer(SENTENCES, padding="max_length", max_length=16, truncation=True)
    examples = []
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True):
        ids, labels = list(ids), [-100] * len(ids)
        for i in range(1, sum(mask) - 1, 3):
            labels[i], ids[i] = ids[i], tokenizer.mask_token_id
        examples.append({"input_ids": ids, "attention_mask": list(mask), "labels": labels})
    return examples


def test_trainer_trains_and_evaluates_a_masked_lm_with_compute_metrics(tmp_path, tokenizer):
    """Trainer's evaluation loop hands compute_metrics logits of shape (N, L, V): its masked-token accuracy equals
    the one computed from the model's own forward pass."""
    from transformers import Trainer

    torch.manual_seed(0)
    model = SpikeLMForMaskedLM(_config(tokenizer))
    examples = _masked_examples(tokenizer)
    seen = {}

    def compute_metrics(prediction):
        logits, labels = prediction.predictions, prediction.label_ids
        seen["shape"] = logits.shape
        masked = labels != -100
        return {"masked_accuracy": float((logits.argmax(-1)[masked] == labels[masked]).mean())}

    trainer = Trainer(
        model=model,
        args=_training_args(tmp_path),
        train_dataset=examples,
        eval_dataset=examples,
        compute_metrics=compute_metrics,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert trainer.train().global_step == 2
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # it trained
    metrics = trainer.evaluate()
    assert seen["shape"] == (len(examples), 16, len(tokenizer))
    model.eval()
    with torch.no_grad():
        batch = {k: torch.tensor([e[k] for e in examples]) for k in examples[0]}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    masked = batch["labels"] != -100
    expected = (logits.argmax(-1)[masked] == batch["labels"][masked]).float().mean().item()
    assert metrics["eval_masked_accuracy"] == pytest.approx(expected)
    assert np.isfinite(metrics["eval_loss"])


def test_trainer_fine_tunes_a_classifier_with_compute_metrics(tmp_path, tokenizer):
    from transformers import Trainer

    torch.manual_seed(0)
    model = SpikeLMForSequenceClassification(_config(tokenizer, num_labels=2))
    enc = tokenizer(SENTENCES, padding="max_length", max_length=16)
    labels = [0, 1, 1, 0]
    examples = [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)
    ]

    def compute_metrics(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=_training_args(tmp_path),
        train_dataset=examples,
        eval_dataset=examples,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]))
    expected = (logits.logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(expected)


def test_fill_mask_pipeline_scores_are_the_models_softmax(tmp_path, tokenizer):
    from transformers import pipeline

    _warmed_up(SpikeLMForMaskedLM(_config(tokenizer)), tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    fill = pipeline("fill-mask", model=str(tmp_path), top_k=3)
    result = fill("the quick brown [MASK] jumps.")
    model = SpikeLMForMaskedLM.from_pretrained(tmp_path).eval()
    enc = tokenizer("the quick brown [MASK] jumps.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, enc["input_ids"][0].tolist().index(tokenizer.mask_token_id)]
    top = logits.softmax(-1).topk(3)
    assert [r["token"] for r in result] == top.indices.tolist()
    assert [r["score"] for r in result] == pytest.approx(top.values.tolist(), rel=1e-5)


def test_text_classification_pipeline_on_a_saved_classifier(tmp_path, tokenizer):
    from transformers import pipeline

    labels = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    model = _warmed_up(SpikeLMForSequenceClassification(_config(tokenizer, num_labels=2, **labels)), tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    classify = pipeline("text-classification", model=str(tmp_path))
    result = classify(SENTENCES[:2])
    reloaded = SpikeLMForSequenceClassification.from_pretrained(tmp_path).eval()
    for r, text in zip(result, SENTENCES[:2], strict=True):
        with torch.no_grad():
            p = reloaded(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
        assert r["label"] == reloaded.config.id2label[int(p.argmax())]
        assert r["score"] == pytest.approx(float(p.max()), rel=1e-5)


def test_text_generation_pipeline_on_a_saved_causal_model(tmp_path, tokenizer):
    from transformers import pipeline

    torch.manual_seed(0)
    model = _warmed_up(SpikeLMForCausalLM(_config(tokenizer, max_position_embeddings=64)), tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generate = pipeline("text-generation", model=str(tmp_path))
    out = generate("the quick brown fox", max_new_tokens=5, do_sample=False, return_full_text=False)
    reloaded = SpikeLMForCausalLM.from_pretrained(tmp_path).eval()
    enc = tokenizer("the quick brown fox", return_tensors="pt")
    ids = reloaded.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=5, do_sample=False)
    expected = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out[0]["generated_text"].strip() == expected.strip()
    assert ids.shape[1] == enc["input_ids"].shape[1] + 5


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _lower_bounds() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    bounds = {}
    for spec in specs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(>=|==)\s*([0-9][0-9A-Za-z.]*)\s*", spec)
        assert m, f"pyproject: {spec!r} has no lower bound (>= or ==)"
        bounds[m.group(1).lower().replace("_", "-")] = m.group(3)
    return bounds


def test_pyproject_lower_bounds_are_the_tested_versions():
    """Every lower bound is the release line pinned in requirements/constraints.txt (the versions the suite runs
    on): a bound below it would promise versions nobody tested."""
    pins, bounds = _pins(), _lower_bounds()
    for name, bound in bounds.items():
        assert name in pins, f"{name} is a dependency but not pinned in requirements/constraints.txt"
        pinned = pins[name].split("+")[0].split(".")
        parts = bound.split(".")
        assert pinned[: len(parts)] == parts, f"{name}>={bound} but the tested version is {pins[name]}"


def test_the_installed_versions_are_the_pinned_ones():
    from importlib.metadata import PackageNotFoundError, version

    checked = 0
    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:  # an optional extra not installed here
            continue
        assert installed.split("+")[0] == pinned, f"{name} {installed} installed, {pinned} pinned"
        checked += 1
    assert checked >= 10
