"""The sweep: every subcommand fed bad inputs. Each must fail with exit status 2 and exactly one stderr line
``spikelm CMD: error: ...`` naming what is wrong, no traceback, and no new output directory left behind.
Run in-process through ``spikelm.commands.main.main``: every case fails before any heavy work."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from spikelm.commands.main import build_parser, main

# placeholders in argv, filled by the fixture
MODEL = "{model}"  # a directory with a config.json: past the --model check
DIR, FILE, BAD_UTF8, MISSING, NOCONFIG, BADCONFIG, PICKLE, OUT, OCCUPIED, BADYAML = (
    "{dir}",
    "{file}",
    "{bad_utf8}",
    "{missing}",
    "{noconfig}",
    "{badconfig}",
    "{pickle}",
    "{out}",
    "{occupied}",
    "{badyaml}",
)
# a classifier built with the public API (64 positions), a GLUE-layout SST-2 folder, offline suites
CLF, SST, SUITE, PARTIAL_SUITE = "{clf}", "{sst}", "{suite}", "{partial_suite}"
GPT2, EVIL_CLF, EVIL_GPT2, TRUNC_CLF, NOTJSON, BADFIELD, UNKNOWN_TYPE = (
    "{gpt2}",
    "{evil_clf}",
    "{evil_gpt2}",
    "{trunc_clf}",
    "{notjson}",
    "{badfield_clf}",
    "{unknown_type}",
)
NO_CUDA = not torch.cuda.is_available()


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Inputs users make themselves, built once (outside each test's tmp_path)."""
    from spikelm import SpikeLMConfig, SpikeLMForSequenceClassification
    from spikelm.data.tokenization import load_tokenizer

    root = tmp_path_factory.mktemp("shared")
    tokenizer = load_tokenizer("bert-base-uncased")
    config = SpikeLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_steps=2,
    )
    SpikeLMForSequenceClassification(config).save_pretrained(root / "clf")
    tokenizer.save_pretrained(root / "clf")
    sst = root / "sst"
    sst.mkdir()
    rows = "sentence\tlabel\n" + "".join(f"good film {i}\t1\nbad film {i}\t0\n" for i in range(4))
    for split in ("train", "dev"):
        (sst / f"{split}.tsv").write_text(rows)
    from spikelm.evaluation.glue.offline import OFFLINE_TASKS

    for suite, splits in (("suite", ("train", "dev", "dev_matched", "dev_mismatched")), ("partial_suite", ("train",))):
        for task in OFFLINE_TASKS:
            (root / suite / task).mkdir(parents=True)
            for split in splits:
                (root / suite / task / f"{split}.tsv").write_text("header\nrow\n")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=32)
    gpt2.bos_token_id = gpt2.eos_token_id = tokenizer.sep_token_id
    GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    # damaged model directories a user may hold: a pickle that runs code instead of weights, a truncated
    # safetensors file, a config.json that is not JSON, one with a field of the wrong type, an unknown model_type
    for name, source in (("evil_clf", "clf"), ("evil_gpt2", "gpt2"), ("trunc_clf", "clf"), ("notjson", "clf")):
        shutil.copytree(root / source, root / name)
    for name in ("evil_clf", "evil_gpt2"):
        (root / name / "model.safetensors").unlink()
        with open(root / name / "pytorch_model.bin", "wb") as f:
            pickle.dump({"w": Evil()}, f)
    data = (root / "trunc_clf" / "model.safetensors").read_bytes()
    (root / "trunc_clf" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "notjson" / "config.json").write_text("{not json")
    for name, field, value in (("badfield_clf", "hidden_size", "big"), ("unknown_type", "model_type", "nosuch")):
        shutil.copytree(root / "clf", root / name)
        config = json.loads((root / name / "config.json").read_text())
        config[field] = value
        (root / name / "config.json").write_text(json.dumps(config))
    names = ("clf", "sst", "suite", "partial_suite", "gpt2", "evil_clf", "evil_gpt2", "trunc_clf", "notjson")
    return {name: str(root / name) for name in (*names, "badfield_clf", "unknown_type")}


@pytest.fixture
def paths(tmp_path, shared):
    d = tmp_path / "a_directory"
    d.mkdir()
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox.\n\nJumps over the lazy dog.\n" * 20)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 10)
    noconfig = tmp_path / "empty_model"
    noconfig.mkdir()
    badconfig = tmp_path / "bad_model"
    badconfig.mkdir()
    (badconfig / "config.json").write_bytes(b'{"model_type": "spik\xff\xfe"}')
    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep me")
    badyaml = tmp_path / "bad.yaml"
    badyaml.write_text("learning_rate: [1, 2\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    unsupported = tmp_path / "t5_model"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    encoder = tmp_path / "bert_model"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    return {
        "unsupported": str(unsupported),
        "encoder": str(encoder),
        "model": str(model),
        "dir": str(d),
        "file": str(text),
        "bad_utf8": str(bad),
        "missing": str(tmp_path / "no_such_thing"),
        "noconfig": str(noconfig),
        "badconfig": str(badconfig),
        "pickle": str(evil),
        "out": str(tmp_path / "new_out"),
        "occupied": str(occupied),
        "badyaml": str(badyaml),
        **shared,
    }


def _o(*extra):
    return ["--output-dir", OUT, *extra]


COMMON_OUT = [  # output-dir cases, for commands whose other arguments are valid
    ("--output-dir", "/proc/x", "--output-dir /proc/x"),
    ("--output-dir", FILE, "exists and is not a directory"),
    ("--output-dir", OCCUPIED, "not empty"),
]

CASES = {
    "pretrain": [
        (["--text-file", DIR, *_o()], "--text-file"),
        (["--text-file", MISSING, *_o()], "no such file"),
        (["--text-file", BAD_UTF8, *_o()], "not UTF-8"),
        (["--config", DIR, *_o()], "--config"),
        (["--config", BADYAML, *_o()], "not valid YAML"),
        (["--set", "max_grad_norm=NaN", *_o()], "max_grad_norm"),
        (["--set", "warmup_ratio=-5", *_o()], "warmup_ratio"),
        (["--set", "learning_rate=inf", *_o()], "learning_rate"),
        (["--set", "hidden_dropout_prob=NaN", *_o()], "SpikeLMConfig.hidden_dropout_prob"),
        (["--set", "layer_norm_eps=-1", *_o()], "SpikeLMConfig.layer_norm_eps"),
        (["--set", "initializer_range=1e999", *_o()], "SpikeLMConfig.initializer_range"),
        (["--set", "alpha_init=1e999", *_o()], "alpha_init"),
        (["--set", "adam_beta2=1", *_o()], "adam_beta2"),
        (["--set", "hidden_size=0", *_o()], "hidden_size"),
        (["--set", "batch_size=-3", *_o()], "batch_size"),
        (["--set", "no_such_field=1", *_o()], "unknown config key"),
        (["--set", "novalue", *_o()], "FIELD=VALUE"),
        (["--max-steps", "0", *_o()], "--max-steps"),
        (["--max-steps", "ten", *_o()], "--max-steps"),
        (["--preset", "huge", *_o()], "unknown preset"),
        (["--objective", "gan", *_o()], "objective"),
        (["--resume", *_o()], "no checkpoint"),
        (["--text-file", FILE, "--corpus", "pypi", *_o()], "not both"),
        ([], "--output-dir"),
        (["--no-such-flag", *_o()], "unrecognized"),
    ],
    "data prepare-corpus": [
        (["--text-file", DIR, *_o()], "--text-file"),
        (["--text-file", MISSING, *_o()], "no such file"),
        (["--text-file", BAD_UTF8, *_o()], "not UTF-8"),
        (["no-such-corpus", *_o()], "no-such-corpus"),
        (["--no-such-flag"], "unrecognized"),
        (["a", "b", *_o()], "unrecognized"),
        (["--text-file", "", *_o()], "--text-file"),
        (["--text-file", FILE, "--output-dir", "/proc/x"], "--output-dir /proc/x"),
        (["--text-file", FILE, "--output-dir", FILE], "exists and is not a directory"),
        (["--text-file", FILE, "--output-dir", OCCUPIED], "not empty"),
    ],
    "data train-tokenizer": [
        (["--text-file", DIR, *_o()], "--text-file"),
        (["--text-file", MISSING, *_o()], "no such file"),
        (["--text-file", BAD_UTF8, *_o()], "not UTF-8"),
        (["--text-file", FILE, "--vocab-size", "10000000000000", *_o()], "--vocab-size"),
        (["--text-file", FILE, "--vocab-size", "0", *_o()], "--vocab-size"),
        (["--text-file", FILE, "--vocab-size", "x", *_o()], "--vocab-size"),
        (["--text-file", FILE], "--output-dir"),
        (["--text-file", FILE, "--output-dir", "/proc/x"], "--output-dir /proc/x"),
        (["--text-file", FILE, "--output-dir", FILE], "exists and is not a directory"),
        (["--text-file", FILE, "--output-dir", OCCUPIED], "not empty"),
    ],
    "data prepare-brown": [
        (["--output-dir", "/proc/x"], "--output-dir /proc/x"),
        (["--output-dir", FILE], "exists and is not a directory"),
        (["--output-dir", OCCUPIED], "not empty"),
        ([], "--output-dir"),
        (["--no-such-flag", *_o()], "unrecognized"),
        (["extra", *_o()], "unrecognized"),
        (["--output-dir"], "--output-dir"),
        (["--output-dir", ""], "--output-dir"),
        (["--output-dir", "/proc/x/y"], "--output-dir"),
        (["--output-dir", f"{FILE}/sub"], "--output-dir"),
    ],
    "data prepare-glue-offline": [
        (["--output-dir", "/proc/x"], "--output-dir /proc/x"),
        (["--output-dir", FILE], "exists and is not a directory"),
        (["--output-dir", OCCUPIED], "not empty"),
        ([], "--output-dir"),
        (["--no-such-flag", *_o()], "unrecognized"),
        (["extra", *_o()], "unrecognized"),
        (["--output-dir"], "--output-dir"),
        (["--output-dir", ""], "--output-dir"),
        (["--output-dir", "/proc/x/y"], "--output-dir"),
        (["--output-dir", f"{FILE}/sub"], "--output-dir"),
    ],
    "demo": [
        (["--text-file", DIR, *_o()], "--text-file"),
        (["--text-file", MISSING, *_o()], "no such file"),
        (["--text-file", BAD_UTF8, *_o()], "not UTF-8"),
        (["--text-file", FILE, *_o()], "--text-file"),  # far fewer bytes than the tokens the llm part needs
        (["--output-dir", OCCUPIED], "not empty"),
        (["--output-dir", FILE], "exists and is not a directory"),
        (["--minutes", "5", *_o()], "--minutes was removed"),
        (["--max-steps", "3", *_o()], "--max-steps was removed"),
        (["--corpus", "pypi", *_o()], "--corpus was removed"),
        (["--set", "hidden_size=8", *_o()], "--set was removed"),
        (["--parts", "classifier,pretrain", *_o()], "--parts"),
        (["--parts", "", *_o()], "--parts"),
        (["--parts", "energy", *_o()], "--parts energy"),
        (["--finetune-epochs", "-2", *_o()], "--finetune-epochs"),
        (["--finetune-lr", "inf", *_o()], "--finetune-lr"),
        (["--finetune-lr", "abc", *_o()], "--finetune-lr"),
        (["--eval-tokens", "100", *_o()], "--eval-tokens"),
        (["--no-such-flag", *_o()], "unrecognized"),
    ],
    "energy": [
        (["--model", MISSING, "--text-file", FILE, *_o()], "--model"),
        (["--model", NOCONFIG, "--text-file", FILE, *_o()], "config.json"),
        (["--model", BADCONFIG, "--text-file", FILE, *_o()], "not UTF-8"),
        (["--model", FILE, "--text-file", FILE, *_o()], "--model"),
        (["--model", MODEL, "--text-file", DIR, *_o()], "--text-file"),
        (["--model", MODEL, "--text-file", FILE, "--batch-size", "0", *_o()], "--batch-size"),
        (["--model", MODEL, "--text-file", FILE, "--ac-pj", "nan", *_o()], "--ac-pj"),
        (["--model", MODEL, "--text-file", FILE, "--mac-pj", "-1", *_o()], "--mac-pj"),
        (["--model", MODEL, "--text-file", FILE, "--max-length", "1", *_o()], "--max-length"),
        (["--model", MODEL, "--text-file", FILE, "--task", "sst2", *_o()], "not allowed with"),
        (["--model", MODEL, *_o()], "one of the arguments"),
        (["--model", BADFIELD, "--text-file", FILE, *_o()], "hidden_size"),
        (["--model", NOTJSON, "--text-file", FILE, *_o()], "not valid JSON"),
        (["--model", MODEL, "--text-file", FILE, "--device", "tpu9", *_o()], "--device"),
        (["--model", "no-such-model", "--text-file", FILE, *_o()], "neither a model directory nor a named source"),
        (["--model", MODEL, "--text-file", FILE, *_o()], "cannot read its config.json"),
        (["--model", "{unsupported}", "--text-file", FILE, *_o()], "model_type 't5'"),
    ]
    + (
        [(["--model", MODEL, "--text-file", FILE, "--device", "cuda", *_o()], "CUDA is not available")]
        if NO_CUDA
        else []
    ),
    "finetune": [
        (["--model", MISSING + "/", "--task", "sst2", *_o()], "--model"),
        (["--model", "./" + Path(MISSING).name, "--task", "sst2", *_o()], "--model"),
        (["--model", NOCONFIG, "--task", "sst2", *_o()], "config.json"),
        (["--model", BADCONFIG, "--task", "sst2", *_o()], "not UTF-8"),
        (["--model", "minilm", "--task", "sst2", "--learning-rate", "nan", *_o()], "--learning-rate"),
        (["--model", "minilm", "--task", "sst2", "--batch-size", "0", *_o()], "--batch-size"),
        (["--model", "minilm", "--task", "sst2", "--epochs", "-1", *_o()], "--epochs"),
        (["--model", "minilm", "--task", "sst2", "--max-length", "1", *_o()], "--max-length"),
        (["--model", "minilm", "--task", "sst2", "--data-dir", FILE, *_o()], "--data-dir"),
        (["--model", "minilm", "--task", "sst2", "--data-dir", MISSING, *_o()], "--data-dir"),
        (["--model", "minilm", "--task", "sst2", "--num-steps", "0", *_o()], "--num-steps"),
        (["--model", "minilm", *_o()], "--task"),
        (["--model", EVIL_CLF, "--task", "sst2", "--data-dir", SST, "--max-length", "32", *_o()], "refused to load"),
        (
            ["--model", TRUNC_CLF, "--task", "sst2", "--data-dir", SST, "--max-length", "32", *_o()],
            "model.safetensors cannot be read",
        ),
        (["--model", NOTJSON, "--task", "sst2", "--data-dir", SST, "--max-length", "32", *_o()], "not valid JSON"),
        (["--model", BADFIELD, "--task", "sst2", "--data-dir", SST, "--max-length", "32", *_o()], "hidden_size"),
        (
            ["--model", UNKNOWN_TYPE, "--task", "sst2", "--data-dir", SST, "--max-length", "32", *_o()],
            "model_type 'nosuch'",
        ),
        (["--model", CLF, "--task", "sst2", "--data-dir", SST, *_o()], "--max-length 128 exceeds"),
        (
            ["--model", CLF, "--task", "sst2", "--data-dir", SST, "--max-length", "64", "--kd-weight", "2", *_o()],
            "--kd-weight",
        ),
        (["--model", CLF, "--task", "sst2", "--data-dir", SST, "--kd-temperature", "inf", *_o()], "--kd-temperature"),
    ],
    "generate": [
        (["--model", MISSING, "--prompt", "hi"], "--model"),
        (["--model", NOCONFIG, "--prompt", "hi"], "config.json"),
        (["--model", BADCONFIG, "--prompt", "hi"], "not UTF-8"),
        (["--model", FILE, "--prompt", "hi"], "--model"),
        (["--model", MODEL], "--prompt"),
        (["--model", MODEL, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--model", MODEL, "--prompt", "hi", "--temperature", "nan"], "--temperature"),
        (["--model", MODEL, "--prompt", "hi", "--top-p", "1.5"], "--top-p"),
        (["--model", MODEL, "--prompt", "hi", "--top-k", "0"], "--top-k"),
        (["--model", MODEL, "--prompt", "hi", "--num-beams", "-1"], "--num-beams"),
        (["--model", MODEL, "--prompt", "hi", "--seed", "x"], "--seed"),
        (["--model", "no-such-model", "--prompt", "hi"], "neither a model directory nor a named source"),
        (["--model", MODEL, "--prompt", "hi"], "cannot read its config.json"),
        (["--model", "{unsupported}", "--prompt", "hi"], "model_type 't5'"),
        (["--model", "{encoder}", "--prompt", "hi"], "not a causal language model"),
        (["--model", "minilm", "--prompt", "hi"], "minilm is a BERT-family encoder"),
        (["--model", NOTJSON, "--prompt", "hi"], "not valid JSON"),
        (["--model", BADFIELD, "--prompt", "hi"], "hidden_size"),
        (["--model", UNKNOWN_TYPE, "--prompt", "hi"], "nosuch"),
    ],
    "glue": [
        (["--model", MISSING + "/", *_o()], "--model"),
        (["--model", FILE, *_o()], "--model"),
        (["--model", DIR, "--data-dir", FILE, *_o()], "--data-dir"),
        (["--model", DIR, "--data-dir", MISSING, *_o()], "--data-dir"),
        (["--model", DIR, "--learning-rate", "inf", *_o()], "--learning-rate"),
        (["--model", DIR, "--batch-size", "0", *_o()], "--batch-size"),
        (["--model", DIR, "--epochs", "0", *_o()], "--epochs"),
        (["--model", DIR, "--max-length", "0", *_o()], "--max-length"),
        (["--model", DIR, "--max-train-samples", "-5", *_o()], "--max-train-samples"),
        (["--model", DIR, "--seed", "-1", *_o()], "--seed"),
        ([*_o()], "--model"),
        (["--model", CLF, "--tasks", "sst2", "--data-dir", SST, "--max-length", "100000", *_o()], "--max-length"),
    ],
    "perplexity": [
        (["--model", MISSING, "--text-file", FILE], "--model"),
        (["--model", NOCONFIG, "--text-file", FILE], "config.json"),
        (["--model", BADCONFIG, "--text-file", FILE], "not UTF-8"),
        (["--model", FILE, "--text-file", FILE], "--model"),
        (["--model", MODEL, "--text-file", MISSING], "--text-file"),
        (["--model", MODEL, "--text-file", BAD_UTF8], "not UTF-8"),
        (["--model", MODEL, "--text-file", DIR], "no files"),
        (["--model", MODEL, "--text-file", FILE, "--max-length", "1"], "--max-length"),
        (["--model", MODEL, "--text-file", FILE, "--stride", "0"], "--stride"),
        (["--model", MODEL, "--text-file", FILE, "--batch-size", "zero"], "--batch-size"),
        (["--model", MODEL], "--text-file"),
        (["--model", "no-such-model", "--text-file", FILE], "neither a model directory nor a named source"),
        (["--model", MODEL, "--text-file", FILE, *_o()], "cannot read its config.json"),
        (["--model", "{unsupported}", "--text-file", FILE, *_o()], "model_type 't5'"),
        (["--model", "{encoder}", "--text-file", FILE, *_o()], "not a causal language model"),
        (["--model", "minilm", "--text-file", FILE, *_o()], "minilm is a BERT-family encoder"),
        (["--model", NOTJSON, "--text-file", FILE], "not valid JSON"),
        (["--model", BADFIELD, "--text-file", FILE], "hidden_size"),
    ],
    "serve": [  # --port 0: any free port, so that the model's checks are reached whatever listens on 8000
        ([MISSING, "--port", "0"], "MODEL"),
        ([NOCONFIG, "--port", "0"], "config.json"),
        ([BADCONFIG, "--port", "0"], "not UTF-8"),
        ([FILE, "--port", "0"], "MODEL"),
        ([], "MODEL"),
        ([MODEL, "--port", "x"], "--port"),
        ([MODEL, "--port", "70000"], "--port"),
        ([MODEL, "--port", "-1"], "--port"),
        ([MODEL, "--host", "203.0.113.7", "--port", "0"], "--host 203.0.113.7"),
        ([MODEL, "--continuous-batching"], "--continuous-batching"),
        ([MODEL, "--log-level", "loud"], "--log-level"),
        (["no-such-model", "--port", "0"], "neither a model directory nor a named source"),
        ([MODEL, "--port", "0"], "cannot read its config.json"),
        (["{unsupported}", "--port", "0"], "model_type 't5'"),
        (["{encoder}", "--port", "0"], "not a causal language model"),
        (["minilm", "--port", "0"], "minilm is a BERT-family encoder"),
        ([NOTJSON, "--port", "0"], "not valid JSON"),
    ],
    "spikify": [
        (["--model", MISSING, *_o()], "--model"),
        (["--model", FILE, *_o()], "--model"),
        (["--model", NOCONFIG, *_o()], "config.json"),
        (["--model", BADCONFIG, *_o()], "not UTF-8"),
        (["--model", EVIL_GPT2, "--eval-tokens", "0", "--calibration-text", FILE, *_o()], "refused to load"),
        (["--model", NOTJSON, *_o()], "not valid JSON"),
        (["--model", "no-such-source", *_o()], "no-such-source"),
        (["--model", MODEL, "--calibration-text", MISSING, *_o()], "--calibration-text"),
        (["--model", MODEL, "--calibration-text", BAD_UTF8, *_o()], "not UTF-8"),
        (["--model", MODEL, "--calibration-text", DIR, *_o()], "--calibration-text"),
        (["--model", MODEL, "--num-steps", "0", *_o()], "--num-steps"),
        (["--model", MODEL, "--num-steps", "3", *_o()], "power of two"),
        (["--model", MODEL, "--neuron", "lif", *_o()], "--neuron"),
        (["--model", MODEL, "--set", "no_such_field=1", *_o()], "no_such_field"),
        (["--model", MODEL, "--set", "gif_clip_ratio=2", *_o()], "clip_ratio"),
        (["--model", MODEL, "--set", "gif_group_size=-1", *_o()], "gif_group_size"),
        (["--model", MODEL, "--set", "smoothing_alpha=2", *_o()], "smoothing_alpha"),
        (["--model", MODEL, "--set", "gif_group_size=2.5", *_o()], "gif_group_size"),
        (["--model", MODEL, "--set", "gif_group_size=64", "--set", "gif_group_range=token", *_o()], "gif_group_size"),
        (["--model", MODEL, "--set", "modules_to_not_convert=5", *_o()], "modules_to_not_convert"),
        (["--model", MODEL, "--set", "modules_to_not_convert=down_proj", *_o()], "modules_to_not_convert"),
        (["--model", MODEL, "--eval-tokens", "100", *_o()], "--eval-tokens"),
        (["--model", MODEL, "--calibration-sequences", "0", *_o()], "--calibration-sequences"),
        (["--model", MODEL, *_o()], "config.json"),
        (["--model", MODEL], "--output-dir"),
    ],
    "distill": [
        (["--teacher", MISSING, "--student", MODEL, *_o()], "--teacher"),
        (["--teacher", FILE, "--student", MODEL, *_o()], "--teacher"),
        (["--teacher", NOCONFIG, "--student", MODEL, *_o()], "config.json"),
        (["--teacher", MODEL, "--student", MISSING, *_o()], "--student"),
        (["--teacher", MODEL, "--student", NOCONFIG, *_o()], "config.json"),
        (["--teacher", MODEL, "--student", BADCONFIG, *_o()], "not UTF-8"),
        (["--teacher", MODEL, "--student", MODEL, "--text-file", MISSING, *_o()], "--text-file"),
        (["--teacher", MODEL, "--student", MODEL, "--text-file", BAD_UTF8, *_o()], "not UTF-8"),
        (["--teacher", MODEL, "--student", MODEL, "--max-steps", "0", *_o()], "--max-steps"),
        (["--teacher", MODEL, "--student", MODEL, "--config", MISSING, *_o()], "--config"),
        (["--teacher", MODEL, "--student", MODEL, "--no-such-flag", *_o()], "unrecognized"),
        (["--teacher", EVIL_GPT2, "--student", GPT2, "--set", "max_length=32", *_o()], "--teacher refused to load"),
        (["--teacher", GPT2, "--student", NOTJSON, *_o()], "not valid JSON"),
        (["--teacher", MODEL, "--student", MODEL, "--set", "max_grad_norm=1e999", *_o()], "max_grad_norm"),
        (["--teacher", MODEL, "--student", MODEL, "--set", "learning_rate=NaN", *_o()], "learning_rate"),
        (["--teacher", MODEL, "--student", MODEL, "--set", "temperature=1e999", *_o()], "temperature"),
        (["--teacher", MODEL, "--student", MODEL, "--set", "kl_weight=NaN", *_o()], "kl_weight"),
        (["--teacher", MODEL, "--student", MODEL, "--set", "warmup_ratio=-5", *_o()], "warmup_ratio"),
        (["--teacher", MODEL, "--student", MODEL], "--output-dir"),
        (["--teacher", MODEL, "--student", "smollm2-135m", *_o()], "named (real-valued) source"),
    ],
    "convert-official": [
        ([MISSING, *_o()], "no such file"),
        ([DIR, *_o()], "is a directory"),
        ([PICKLE, *_o()], "refused to load"),
        ([FILE, *_o()], "checkpoint"),
        ([PICKLE, "--config", DIR, *_o()], "--config"),
        ([PICKLE, "--config", MISSING, *_o()], "--config"),
        ([PICKLE, "--config", BAD_UTF8, *_o()], "not UTF-8"),
        ([PICKLE], "--output-dir"),
        ([], "checkpoint"),
        ([PICKLE, "--no-such-flag", *_o()], "unrecognized"),
    ],
    "benchmark": [
        (["--repeats", "0", *_o()], "--repeats"),
        (["--repeats", "x", *_o()], "--repeats"),
        (["--device", "tpu", *_o()], "--device"),
        (["--dtype", "float8", *_o()], "--dtype"),
        (["--generation-lengths", "x", *_o()], "--generation-lengths"),
        (["--no-such-flag", *_o()], "unrecognized"),
        (["--generation-lengths", "0", *_o()], "--generation-lengths"),
        (["--output-dir", FILE], "exists and is not a directory"),
        (["--output-dir", OCCUPIED], "not empty"),
        (["--output-dir", "/proc/x"], "--output-dir /proc/x"),
        (["--model", MODEL, *_o()], "add --generation"),
        (["--generation", "--model", MISSING, *_o()], "--model"),
        (["--generation", "--model", NOCONFIG, *_o()], "config.json"),
        (["--generation", "--model", MODEL, *_o()], "cannot read its config.json"),
        (["--generation", "--model", MODEL, "--new-tokens", "1", *_o()], "--new-tokens"),
        (["--generation", "--model", MODEL, "--batch-sizes", "0", *_o()], "--batch-sizes"),
        (["--generation", "--model", MODEL, "--prompt-lengths", "x", *_o()], "--prompt-lengths"),
        (["--generation", "--model", MODEL, "--recipe", "lif", *_o()], "--recipe"),
        (["--generation", "--model", MODEL, "--threads", "0", *_o()], "--threads"),
        (["--generation", "--model", MODEL, "--calibration-text", MISSING, *_o()], "--calibration-text"),
    ]
    + ([(["--device", "cuda", *_o()], "CUDA is not available")] if NO_CUDA else []),
    "reproduce": [
        (["--pretrain-steps", "0", *_o()], "--pretrain-steps"),
        (["--train-samples", "-1", *_o()], "--train-samples"),
        (["--dev-samples", "x", *_o()], "--dev-samples"),
        (["--epochs", "0", *_o()], "--epochs"),
        (["--learning-rate", "nan", *_o()], "--learning-rate"),
        (["--batch-size", "0", *_o()], "--batch-size"),
        (["--max-length", "1", *_o()], "--max-length"),
        (["--energy-sequences", "0", *_o()], "--energy-sequences"),
        (["--max-minutes", "-inf", *_o()], "--max-minutes"),
        (["--suite", MISSING, *_o()], "build the suite"),
        (["--suite", FILE, *_o()], "build the suite"),
        (["--suite", PARTIAL_SUITE, *_o()], "dev.tsv"),
        (["--suite", SUITE, "--set", "hidden_dropout_prob=2", *_o()], "SpikeLMConfig.hidden_dropout_prob"),
        (["--suite", SUITE, "--set", "max_grad_norm=NaN", *_o()], "max_grad_norm"),
        (["--suite", SUITE, "--set", "warmup_ratio=-5", *_o()], "warmup_ratio"),
        (["--suite", SUITE, "--seeds", "-1", *_o()], "--seeds"),
        ([], "--output-dir"),
    ],
}


def test_every_subcommand_is_swept():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = set()
    for name, p in sub.choices.items():
        inner = [a for a in p._actions if getattr(a, "dest", None) == "data_command"]
        names |= {f"{name} {n}" for n in inner[0].choices} if inner else {name}
    assert names == set(CASES), sorted(names ^ set(CASES))
    for name, cases in CASES.items():
        assert len(cases) >= 10, name


def _fill(argv, paths):
    return [a.format(**paths) if "{" in a else a for a in argv]


@pytest.mark.parametrize(
    "command, argv, expected",
    [(cmd, argv, expected) for cmd, cases in CASES.items() for argv, expected in cases],
    ids=[f"{cmd}-{i}" for cmd, cases in CASES.items() for i in range(len(cases))],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(paths, capsys, tmp_path, command, argv, expected):
    before = sorted(p.name for p in tmp_path.iterdir())
    occupied = sorted(p.name for p in Path(paths["occupied"]).iterdir())
    try:
        status = main([*command.split(), *_fill(argv, paths)])
    except SystemExit as exit:  # argparse's refusals
        status = exit.code
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert status == 2, captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"spikelm {command}: error: "), lines[0]
    assert _fill([expected], paths)[0] in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no new output directory
    assert sorted(p.name for p in Path(paths["occupied"]).iterdir()) == occupied
    assert not Path("/proc/x").exists()


def test_set_nan_never_reaches_json(tmp_path, capsys):
    assert main(["pretrain", "--set", "max_grad_norm=NaN", "--output-dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    json.dumps({"ok": 1})


def test_an_internal_bug_keeps_its_traceback(monkeypatch):
    """main() turns only UserError into a one-liner: a ValueError from a bug propagates with its traceback."""
    import spikelm.commands.data_brown as brown

    def bug(args):
        raise ValueError("an internal bug")

    parser_build = build_parser

    def patched():
        parser = parser_build()
        sub = next(a for a in parser._actions if a.dest == "command").choices["data"]
        inner = next(a for a in sub._actions if getattr(a, "dest", None) == "data_command")
        inner.choices["prepare-brown"].set_defaults(func=bug)
        return parser

    monkeypatch.setattr("spikelm.commands.main.build_parser", patched)
    assert brown  # the module whose command is replaced
    with pytest.raises(ValueError, match="an internal bug"):
        main(["data", "prepare-brown", "--output-dir", "/tmp/never-used-by-this-test"])


def test_a_bad_cpu_kernels_switch_is_one_line_before_any_work(paths, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKELM_CPU_KERNELS", "maybe")
    out = tmp_path / "bench"
    status = main(["benchmark", "--generation", "--model", paths["model"], "--output-dir", str(out)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("spikelm benchmark: error: SPIKELM_CPU_KERNELS='maybe'"), lines[0]
    assert not out.exists()
