"""``spikelm distill`` (and ``spikelm finetune --teacher``): a tiny random LLaMA teacher, a perturbed copy (or a
causal SpikeLM) as the student; held-out KL falls, a killed run resumes exactly, bad input is one clear error
before any output directory exists."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikelm.commands.main import main
from spikelm.data.tokenization import sample_text_path

SONNETS = str(sample_text_path())
REPO = Path(__file__).resolve().parents[1]
# text that is in no training batch: the perplexity-vs-tokens curve's eval_text
OTHER_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. My dear Mr. Bennet, said his lady to him one "
    "day, have you heard that Netherfield Park is let at last? Mr. Bennet replied that he had not. But it is, "
    "returned she; for Mrs. Long has just been here, and she told me all about it. Mr. Bennet made no answer. "
) * 3
MICRO = [
    "--set",
    "max_length=32",
    "--set",
    "batch_size=8",
    "--set",
    "eval_examples=16",
    "--set",
    "log_every=1",
    "--set",
    "learning_rate=3e-3",
    "--set",
    "warmup_ratio=0.1",
]


def llama_config(vocab_size, **overrides):
    from transformers import LlamaConfig

    kwargs = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "initializer_range": 0.2,
        "tie_word_embeddings": False,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``teacher`` (tiny random LLaMA + a WordPiece tokenizer), ``student`` (its weights perturbed), ``spiking``
    (a causal SpikeLM over the same vocabulary, alphas not yet set), ``small_vocab`` and ``encoder`` (bad students)."""
    from transformers import BertConfig, BertForMaskedLM, LlamaForCausalLM

    from spikelm import SpikeLMConfig, SpikeLMForCausalLM
    from spikelm.data.tokenization import train_wordpiece

    root = tmp_path_factory.mktemp("models")
    tok = train_wordpiece(Path(SONNETS).read_text().split("\n"), 400)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(llama_config(len(tok), pad_token_id=tok.pad_token_id))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher.save_pretrained(root / "student")
    SpikeLMForCausalLM(
        SpikeLMConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_steps=2,
        )
    ).save_pretrained(root / "spiking")
    LlamaForCausalLM(llama_config(len(tok) + 8)).save_pretrained(root / "small_vocab")
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(root / "encoder")
    (root / "eval.txt").write_text(OTHER_TEXT)
    return {name: root / name for name in ("teacher", "student", "spiking", "small_vocab", "encoder", "eval.txt")}


def distill(models, out, *args, student="student"):
    return main(
        [
            "distill",
            "--teacher",
            str(models["teacher"]),
            "--student",
            str(models[student]),
            "--text-file",
            SONNETS,
            "--no-progress",
            *MICRO,
            *args,
            "--output-dir",
            str(out),
        ]
    )


def log_entries(run_dir, event):
    lines = (Path(run_dir) / "train_log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


# ----------------------------------------------------------------------------------------------
# a run
# ----------------------------------------------------------------------------------------------


def test_distillation_lowers_heldout_kl_and_writes_a_loadable_student(models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert (
        distill(
            models,
            out,
            "--max-steps",
            "30",
            "--set",
            "eval_every=10",
            "--set",
            "save_every=10",
            "--set",
            f"eval_text={models['eval.txt']}",
        )
        == 0
    )
    assert "held-out KL" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    start, end = metrics["initial_validation"], metrics["final_validation"]
    # held-out corpus blocks and a text in no training batch: the student moved toward the teacher on both
    assert end["validation"]["kl"] < 0.8 * start["validation"]["kl"]
    assert end["eval_text"]["kl"] < 0.8 * start["eval_text"]["kl"]
    assert end["validation"]["teacher_perplexity"] == start["validation"]["teacher_perplexity"]
    assert metrics["steps"] == 30 and metrics["train_tokens"] == 30 * 8 * 32 and metrics["tokens_per_second"] > 0
    # the curve: (tokens seen, held-out KL, perplexity) at the start, every 10 steps and the end
    evals = log_entries(out, "eval")
    assert [(e["step"], e["tokens"]) for e in evals] == [(s, s * 8 * 32) for s in (0, 10, 20, 30)]
    assert {"heldout_kl", "val_perplexity", "eval_text_perplexity", "teacher_val_perplexity"} <= set(evals[0])
    assert [e["step"] for e in log_entries(out, "train")] == list(range(1, 31))
    assert (out / "distill_curve.png").stat().st_size > 0 and list((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000030"
    # the student loads with the Auto class, beside the teacher's tokenizer
    student = AutoModelForCausalLM.from_pretrained(out)
    assert type(student).__name__ == "LlamaForCausalLM"
    assert (
        AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(models["teacher"]).get_vocab()
    )
    original = AutoModelForCausalLM.from_pretrained(models["student"])
    assert not torch.equal(student.model.embed_tokens.weight, original.model.embed_tokens.weight)


def test_validation_blocks_are_never_training_blocks(models):
    from transformers import AutoTokenizer

    from spikelm.data.corpora import load_corpus
    from spikelm.training.distill import resolve_distill_config
    from spikelm.training.pretrain import PretrainingData

    config = resolve_distill_config(
        sets=["max_length=32", "batch_size=8", "eval_examples=16"], teacher="t", student="s"
    )
    tok = AutoTokenizer.from_pretrained(models["teacher"])
    data = PretrainingData(config, tok, load_corpus(text_file=SONNETS), 1, 0)
    train = {tuple(row) for row in data.examples(0).input_ids.tolist()}
    held_out = [tuple(row) for b in data.validation_batches(8) for row in b["input_ids"].tolist()]
    assert len(held_out) == 16 and not train & set(held_out)
    assert data.validation.num_documents > 0  # the corpus's held-out documents


def test_spiking_student_trains_its_alphas(models, tmp_path):
    from transformers import AutoModelForCausalLM

    from spikelm import SpikeLMForCausalLM

    out = tmp_path / "spiking"
    assert distill(models, out, "--max-steps", "20", "--set", "eval_every=20", student="spiking") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["student_class"] == "SpikeLMForCausalLM"
    assert metrics["final_validation"]["validation"]["kl"] < metrics["initial_validation"]["validation"]["kl"]
    student = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(student, SpikeLMForCausalLM) and student.alphas_initialized
    assert student.config.learn_alpha
    # the alphas were set from the first training batch and then trained: not the data initialisation alone
    from transformers import AutoTokenizer

    from spikelm.data.corpora import load_corpus
    from spikelm.training.distill import resolve_distill_config
    from spikelm.training.pretrain import PretrainingData

    config = resolve_distill_config(sets=["max_length=32", "batch_size=8"], teacher="t", student="s")
    data = PretrainingData(
        config, AutoTokenizer.from_pretrained(models["teacher"]), load_corpus(text_file=SONNETS), 1, 0
    )
    initialised = AutoModelForCausalLM.from_pretrained(models["spiking"])
    with torch.no_grad():
        initialised(**{k: v for k, v in data.micro_batches(0, 0)[0].items() if k != "labels"})
    trained = dict(student.named_parameters())
    alphas = [n for n, _ in initialised.named_parameters() if n.endswith(".alpha")]
    assert alphas and all(torch.isfinite(trained[n]).all() for n in alphas)
    assert any(not torch.allclose(trained[n], initialised.get_parameter(n)) for n in alphas)


def test_trainable_parameters_follow_the_fields(models):
    from transformers import AutoModelForCausalLM

    from spikelm.training.distill import resolve_distill_config, set_trainable

    student = AutoModelForCausalLM.from_pretrained(models["student"])
    set_trainable(
        student,
        resolve_distill_config(sets=["freeze_embeddings=true", "freeze_lm_head=true"], teacher="t", student="s"),
    )
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen == {"model.embed_tokens.weight", "lm_head.weight"}

    spiking = AutoModelForCausalLM.from_pretrained(models["spiking"])
    set_trainable(spiking, resolve_distill_config(sets=["learn_alpha=false"], teacher="t", student="s"))
    alphas = [(n, p) for n, p in spiking.named_parameters() if "alpha" in n]
    assert alphas and not any(p.requires_grad for _, p in alphas)
    assert all(p.requires_grad for n, p in spiking.named_parameters() if "alpha" not in n)
    set_trainable(spiking, resolve_distill_config(teacher="t", student="s"))  # learn_alpha defaults to true
    assert all(p.requires_grad for _, p in alphas) and all(m.learn_alpha for _, m in spiking.neurons())


def test_hidden_state_loss(models):
    from transformers import AutoModelForCausalLM

    from spikelm.training.distill import DistillError, distillation_loss, resolve_distill_config

    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    batch = {"input_ids": torch.randint(5, 400, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    kl_only, parts = distillation_loss(student, teacher, batch, resolve_distill_config(teacher="t", student="s"))
    assert "hidden_mse" not in parts and kl_only > 0
    for layers in ("last", "all"):
        config = resolve_distill_config(sets=["hidden_weight=2", f"hidden_layers={layers}"], teacher="t", student="s")
        loss, parts = distillation_loss(student, teacher, batch, config)
        assert parts["hidden_mse"] > 0
        torch.testing.assert_close(loss.detach(), parts["kl"] + 2 * parts["hidden_mse"])
    # a teacher distilled into itself: zero KL, zero MSE
    config = resolve_distill_config(sets=["hidden_weight=1", "hidden_layers=all"], teacher="t", student="s")
    loss, _ = distillation_loss(teacher, teacher, batch, config)
    assert abs(float(loss.detach())) < 1e-5
    spiking = AutoModelForCausalLM.from_pretrained(models["spiking"])
    with pytest.raises(DistillError, match="as many layers"):
        distillation_loss(spiking, teacher, batch, config)


# ----------------------------------------------------------------------------------------------
# exact resume
# ----------------------------------------------------------------------------------------------


def test_killed_run_resumes_exactly(models, tmp_path):
    from safetensors.torch import load_file

    args = ["--max-steps", "10", "--set", "save_every=4", "--set", "eval_every=5"]
    full = tmp_path / "full"
    assert distill(models, full, *args) == 0

    # the same run, SIGKILLed right after its 6th optimizer step (its last checkpoint is step 4)
    killed = tmp_path / "killed"
    script = (
        "import os, signal, sys\n"
        "from torch.optim.lr_scheduler import LambdaLR\n"
        "step = LambdaLR.step\n"
        "def step_then_die(self, *args, **kwargs):\n"
        "    step(self, *args, **kwargs)\n"
        "    if self.last_epoch == 6:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "LambdaLR.step = step_then_die\n"
        "from spikelm.commands.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [
        sys.executable,
        "-c",
        script,
        "distill",
        "--teacher",
        str(models["teacher"]),
        "--student",
        str(models["student"]),
        "--text-file",
        SONNETS,
        "--no-progress",
        *MICRO,
        *args,
        "--output-dir",
        str(killed),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    assert res.returncode == -9, res.stderr[-2000:]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert not (killed / "metrics.json").exists() and max(e["step"] for e in log_entries(killed, "train")) == 5

    assert distill(models, killed, *args) == 2  # a started run is not restarted by accident
    assert distill(models, killed, *args, "--resume") == 0

    full_log, resumed_log = log_entries(full, "train"), log_entries(killed, "train")
    assert [e["step"] for e in resumed_log] == list(range(1, 11))
    for a, b in zip(full_log, resumed_log, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and a["tokens"] == b["tokens"], a["step"]
    assert [(e["step"], e["heldout_kl"]) for e in log_entries(full, "eval")] == [
        (e["step"], e["heldout_kl"]) for e in log_entries(killed, "eval")
    ]
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    m_full, m_resumed = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert m_full["final_validation"] == m_resumed["final_validation"]
    assert m_full["initial_validation"] == m_resumed["initial_validation"]
    assert m_full["train_tokens"] == m_resumed["train_tokens"]


# ----------------------------------------------------------------------------------------------
# bad input: one clear error, no output directory
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teacher": "missing"}, "--teacher.*missing.*(no such directory|neither a model directory)"),
        (
            {"student": "small_vocab"},
            "do not share a vocabulary: the teacher predicts over 400 tokens, the student over 408",
        ),
        ({"student": "encoder"}, "holds a BertForMaskedLM checkpoint, not a causal language model"),
        ({"resume": True}, "--resume: no checkpoint found"),
        ({"sets": ["temperature=0"]}, "temperature must be a finite number > 0"),
        ({"sets": ["eval_text=/no/such/file.txt"]}, "eval_text /no/such/file.txt does not exist"),
        ({"sets": ["tempreature=2"]}, "unknown config key 'tempreature'"),
        ({"sets": ["max_length=33"], "student": "spiking"}, "max_length 33 exceeds the student's 32 positions"),
    ],
)
def test_bad_input_is_one_clear_error_before_any_output(models, tmp_path, capsys, change, message):
    import re

    teacher = str(tmp_path / "missing") if change.get("teacher") else str(models["teacher"])
    student = str(models[change.get("student", "student")])
    out = tmp_path / "out"
    argv = [
        "distill",
        "--teacher",
        teacher,
        "--student",
        student,
        "--text-file",
        SONNETS,
        "--no-progress",
        *MICRO,
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
    ]
    for item in change.get("sets", []):
        argv += ["--set", item]
    if change.get("resume"):
        argv.append("--resume")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1
    assert not out.exists()


def test_spikified_student(models, tmp_path):
    """A student converted with ``spikelm.spikify`` (where the conversion has landed) loads spiking, learns its
    alphas, and its distilled copy loads spiking again through the quantization config."""
    conversion = pytest.importorskip("spikelm.conversion")
    if not hasattr(conversion, "spikify"):
        pytest.skip("spikelm.conversion.spikify has not landed in this tree")
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(models["student"])
    calibration = torch.randint(5, 400, (4, 32), generator=torch.Generator().manual_seed(0))
    conversion.spikify(student, {"num_steps": 2}, calibration=calibration)
    student.save_pretrained(tmp_path / "spikified")
    models = {**models, "spikified": tmp_path / "spikified"}
    out = tmp_path / "run"
    assert distill(models, out, "--max-steps", "15", "--set", "eval_every=15", student="spikified") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_validation"]["validation"]["kl"] < metrics["initial_validation"]["validation"]["kl"]
    distilled = AutoModelForCausalLM.from_pretrained(out)
    assert conversion.is_spiking(distilled) and distilled.config.quantization_config.learn_alpha
    before = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "spikified").named_parameters())
    alphas = [(n, p) for n, p in distilled.named_parameters() if n.endswith(".alpha")]
    assert alphas and any(not torch.equal(p, before[n]) for n, p in alphas)
    # every layer's hidden states line up with the teacher's (the T copies are averaged before they are recorded)
    from spikelm.training.distill import distillation_loss, resolve_distill_config

    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
    config = resolve_distill_config(sets=["hidden_weight=1", "hidden_layers=all"], teacher="t", student="s")
    loss, parts = distillation_loss(
        distilled, teacher, {"input_ids": calibration[:2, :16], "attention_mask": torch.ones(2, 16)}, config
    )
    assert torch.isfinite(loss) and parts["hidden_mse"] > 0


def test_named_sources_go_through_the_resolver(models):
    from spikelm.training.distill import DistillError, resolve_source

    names = {"tiny-teacher": models["teacher"]}
    assert resolve_source("tiny-teacher", "teacher", resolver=names.__getitem__) == models["teacher"]
    with pytest.raises(DistillError, match="--teacher: 'other'"):
        resolve_source("other", "teacher", resolver=names.__getitem__)
    with pytest.raises(DistillError, match="no config.json"):
        resolve_source("tiny-teacher", "teacher", resolver=lambda name: models["teacher"].parent)


# ----------------------------------------------------------------------------------------------
# spikelm finetune --teacher: KD on the classifier logits
# ----------------------------------------------------------------------------------------------

GLUE_SST2 = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
BERT_VOCAB = 30522  # the shipped bert-base-uncased tokenizer


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A tiny SpikeLM encoder (the student, pretraining heads) and tiny BERT classifiers (teachers, 2 or 3 labels)."""
    from transformers import BertConfig, BertForSequenceClassification

    from spikelm import SpikeLMConfig, SpikeLMForPreTraining

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    student = SpikeLMForPreTraining(
        SpikeLMConfig(
            vocab_size=BERT_VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_steps=2,
        )
    )
    with torch.no_grad():
        student(input_ids=torch.randint(1000, 5000, (4, 16)))
    student.save_pretrained(root / "student")
    for labels in (2, 3):
        BertForSequenceClassification(
            BertConfig(
                vocab_size=BERT_VOCAB,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
                num_labels=labels,
                initializer_range=0.5,
            )
        ).save_pretrained(root / f"teacher{labels}")
    return root


def finetune_kd(encoders, out, teacher, *extra):
    return main(
        [
            "finetune",
            "--model",
            str(encoders / "student"),
            "--task",
            "sst2",
            "--data-dir",
            str(GLUE_SST2),
            "--max-length",
            "32",
            "--batch-size",
            "8",
            "--learning-rate",
            "1e-3",
            "--epochs",
            "1",
            "--teacher",
            str(encoders / teacher),
            "--output-dir",
            str(out),
            *extra,
        ]
    )


def test_finetune_with_a_teacher_adds_the_kd_term(encoders, tmp_path):
    from spikelm.training.finetune import Settings, kd_loss, training_loss

    # distillation alone (kd_weight 1): the training loss is the KD term
    assert finetune_kd(encoders, tmp_path / "kd", "teacher2", "--kd-weight", "1", "--kd-temperature", "2") == 0
    record = json.loads((tmp_path / "kd" / "train_log.jsonl").read_text().splitlines()[0])
    assert record["train_kd_loss"] > 0 and record["train_loss"] == pytest.approx(record["train_kd_loss"])
    results = json.loads((tmp_path / "kd" / "eval_results.json").read_text())
    assert results["settings"]["teacher"] == str(encoders / "teacher2") and results["settings"]["kd_weight"] == 1.0
    # the mixed loss: (1 - w) * cross-entropy + w * T^2 * KL(teacher || student)
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(encoders / "teacher2").eval()
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "kd")
    batch = {
        "input_ids": torch.randint(1000, 5000, (4, 12)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    loss, kd = training_loss(student, batch, teacher, Settings(kd_weight=0.25, kd_temperature=2.0), False)
    with torch.no_grad():
        s_logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits
        t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ce = torch.nn.functional.cross_entropy(s_logits, batch["labels"])
    p_t = torch.softmax(t_logits / 2, -1)
    expected_kd = 4 * (p_t * (torch.log_softmax(t_logits / 2, -1) - torch.log_softmax(s_logits / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(kd.detach(), expected_kd, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss.detach(), 0.75 * ce + 0.25 * expected_kd, atol=1e-5, rtol=1e-4)
    assert float(kd_loss(t_logits, t_logits, 1.0, False)) == pytest.approx(0.0, abs=1e-6)


def test_finetune_teacher_with_other_labels_is_refused(encoders, tmp_path, capsys):
    assert finetune_kd(encoders, tmp_path / "out", "teacher3") == 2
    err = capsys.readouterr().err
    assert "predicts 3 label(s), but task sst2 has 2 labels" in err and not (tmp_path / "out").exists()
    assert finetune_kd(encoders, tmp_path / "out", "missing") == 2
    assert "no config.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_two_processes_run_the_same_distillation_as_one(models, tmp_path):
    """Data parallel (2 CPU processes over gloo, torchrun): the global batch is split, gradients averaged; the
    result equals the one-process run's up to float reduction order."""
    import os

    from safetensors.torch import load_file

    args = [
        "--teacher",
        str(models["teacher"]),
        "--student",
        str(models["student"]),
        "--text-file",
        SONNETS,
        "--no-progress",
        *MICRO,
        "--max-steps",
        "4",
        "--set",
        "eval_every=4",
    ]
    assert main(["distill", *args, "--output-dir", str(tmp_path / "one")]) == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "spikelm",
        "distill",
        *args,
        "--output-dir",
        str(tmp_path / "two"),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1  # one summary, from process 0
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["processes"] == 2 and two["train_tokens"] == one["train_tokens"]
    for key in ("kl", "perplexity"):
        assert two["final_validation"]["validation"][key] == pytest.approx(
            one["final_validation"]["validation"][key], rel=1e-4
        )
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4, msg=name)
