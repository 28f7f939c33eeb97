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
from conftest import save_tiny_spikelm_classifier

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

    root = tmp_path_factory.mktemp("shared")
    tokenizer = save_tiny_spikelm_classifier(root / "clf")
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
        (["--model", MODEL, "--neuron", "gif", "--num-steps", "3", *_o()], "power of two"),
        (["--model", MODEL, "--neuron", "lif", *_o()], "--neuron"),
        (["--model", MODEL, "--set", "no_such_field=1", *_o()], "no_such_field"),
        (["--model", MODEL, "--neuron", "gif", "--set", "gif_clip_ratio=2", *_o()], "clip_ratio"),
        (["--model", MODEL, "--neuron", "gif", "--set", "gif_group_size=-1", *_o()], "gif_group_size"),
        (["--model", MODEL, "--set", "smoothing_alpha=2", *_o()], "smoothing_alpha"),
        # another neuron's field, which the chosen neuron would ignore
        (["--model", MODEL, "--set", "gif_group_size=32", *_o()], "--set gif_group_size: a field of the gif neuron"),
        (["--model", MODEL, "--neuron", "gif", "--set", "signed_bits=3", *_o()], "which --neuron gif does not read"),
        (["--model", MODEL, "--neuron", "elastic", "--set", "saliency_fraction=0.2", *_o()], "saliency_fraction"),
        (["--model", MODEL, "--neuron", "gif", "--set", "gif_group_size=2.5", *_o()], "gif_group_size"),
        (
            [
                "--model",
                MODEL,
                "--neuron",
                "gif",
                "--set",
                "gif_group_size=64",
                "--set",
                "gif_group_range=token",
                *_o(),
            ],
            "gif_group_size",
        ),
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


@pytest.mark.parametrize("variable", ["SPIKELM_CPU_KERNELS", "SPIKELM_DECODE_STEP"])
def test_a_bad_cpu_kernels_switch_is_one_line_before_any_work(variable, paths, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(variable, "maybe")
    out = tmp_path / "bench"
    status = main(["benchmark", "--generation", "--model", paths["model"], "--output-dir", str(out)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"spikelm benchmark: error: {variable}='maybe'"), lines[0]
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Model directories that are readable but wrong: one loader (spikelm.evaluation.loading.load_pretrained) refuses
# every load failure, and every disagreement between the config and the tensors, in one line naming the directory
# ----------------------------------------------------------------------------------------------

LLAMA_WORDS = sorted(set("the quick brown fox jumps over the lazy dog .".split()))
ALPHA = "model.layers.0.mlp.input_neuron.alpha"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny LLaMA saved with save_pretrained, and its spikify conversions (elastic and GIF neurons)."""
    from conftest import save_tiny_llama

    root = tmp_path_factory.mktemp("converted")
    save_tiny_llama(root / "llama", LLAMA_WORDS, max_position_embeddings=64)
    (root / "cal.txt").write_text(
        "".join("the quick brown fox jumps over the lazy dog . " * i + "\n\n" for i in range(1, 30))
    )
    for neuron in ("elastic", "gif"):
        argv = ["spikify", "--model", str(root / "llama"), "--neuron", neuron, "--calibration-text"]
        argv += [str(root / "cal.txt"), "--calibration-sequences", "2", "--calibration-length", "16"]
        assert main([*argv, "--eval-tokens", "0", "--output-dir", str(root / neuron)]) == 0
    return root


def _tampered(source: Path, target: Path, config=None, tensors=None, files=None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if config is not None:
        fields = json.loads((target / "config.json").read_text())
        config(fields)
        (target / "config.json").write_text(json.dumps(fields))
    if tensors is not None:
        state = load_file(str(target / "model.safetensors"))
        tensors(state)
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    if files is not None:
        files(target)
    return target


def _quant(field, value):
    return lambda c: c["quantization_config"].__setitem__(field, value)


def _set(key, make):
    return lambda t: t.__setitem__(key, make(t[key]))


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _weights_a_directory(d):
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()


# (source, config edit, tensor edit, file edit, expected in the line)
UNLOADABLE = {
    "num_steps edited": ("elastic", _quant("num_steps", 8), None, None, "do not match its config.json"),
    "num_steps not a number": ("elastic", _quant("num_steps", "four"), None, None, "num_steps"),
    "num_steps negative": ("elastic", _quant("num_steps", -2), None, None, "num_steps"),
    "quantization_config a number": ("elastic", lambda c: c.update(quantization_config=5), None, None, "JSON object"),
    "quantization_config a list": ("gif", lambda c: c.update(quantization_config=[1]), None, None, "JSON object"),
    "gif_bits out of range": ("gif", _quant("gif_bits", 99), None, None, "bits must be"),
    "format_version 0": ("gif", _quant("format_version", 0), None, None, "format_version 0"),
    "format_version 99": ("elastic", _quant("format_version", 99), None, None, "format_version 99"),
    "format_version text": ("elastic", _quant("format_version", "1"), None, None, "format_version"),
    "alpha of another shape": ("elastic", None, _set(ALPHA, lambda a: torch.ones(7)), None, ALPHA),
    "embedding of another shape": (
        "elastic",
        None,
        _set("model.embed_tokens.weight", lambda w: w[:5]),
        None,
        "model.embed_tokens.weight",
    ),
    "saliency mask of another shape": (
        "gif",
        None,
        _set("model.layers.0.mlp.input_neuron.salient", lambda m: m[:3]),
        None,
        "salient",
    ),
    "vocab_size edited": (
        "llama",
        lambda c: c.update(vocab_size=7),
        None,
        None,
        ("embed_tokens", "vocab_size 7", "the student over 7"),
    ),
    "no weights file": ("elastic", None, None, _no_weights, "cannot be loaded"),
    "model.safetensors a directory": ("llama", None, None, _weights_a_directory, "cannot be loaded"),
    "architectures unknown": ("llama", lambda c: c.update(architectures=["NoSuchModel"]), None, None, "NoSuchModel"),
    "architectures of another family": (
        "llama",
        lambda c: c.update(architectures=["GPT2LMHeadModel"]),
        None,
        None,
        "GPT2LMHeadModel",
    ),
    "architectures not a model": (
        "elastic",
        lambda c: c.update(architectures=["LlamaTokenizer"]),
        None,
        None,
        "LlamaTokenizer",
    ),
    # tampered but loadable state: the config and the tensors must agree, every value be possible
    "alpha NaN": ("elastic", None, _set(ALPHA, lambda a: a * float("nan")), None, "NaN or infinite"),
    "alpha infinite": ("elastic", None, _set(ALPHA, lambda a: a * float("inf")), None, "NaN or infinite"),
    "alpha zero": ("elastic", None, _set(ALPHA, lambda a: a * 0), None, "not positive"),
    "alpha negative": ("elastic", None, _set(ALPHA, lambda a: -a), None, "not positive"),
    "alpha missing": ("elastic", None, lambda t: t.pop(ALPHA), None, "missing"),
    "initialized cleared": (
        "elastic",
        None,
        _set("model.layers.1.self_attn.key_neuron.initialized", torch.zeros_like),
        None,
        "not calibrated",
    ),
    "neuron edited gif": ("elastic", _quant("neuron", "gif"), None, None, "do not match its config.json"),
    # recipe fields with no trace in the tensors: refused against the settings saved in the weights' metadata
    "online rotation edited": (
        "gif",
        _quant("online_down_proj_rotation", False),
        None,
        None,
        "online_down_proj_rotation",
    ),
    "rotation edited": ("elastic", _quant("rotation", "none"), None, None, "rotation"),
    "value rotation edited": ("gif", _quant("value_rotation", True), None, None, "value_rotation"),
    "rotation seed edited": ("gif", _quant("rotation_seed", 7), None, None, "rotation_seed"),
    "gif clip ratio edited": ("gif", _quant("gif_clip_ratio", 0.5), None, None, "gif_clip_ratio"),
    "gif bits edited": ("gif", _quant("gif_bits", 3), None, None, "gif_bits"),
    "neuron edited elastic": ("gif", _quant("neuron", "elastic"), None, None, "do not match its config.json"),
    "embedding NaN": (
        "gif",
        None,
        _set("model.embed_tokens.weight", lambda w: w.index_fill(0, torch.tensor([3]), float("nan"))),
        None,
        "NaN or infinite",
    ),
    "weight infinite (real-valued)": (
        "llama",
        None,
        _set("model.layers.0.mlp.up_proj.weight", lambda w: w.index_fill(1, torch.tensor([0]), float("inf"))),
        None,
        "NaN or infinite",
    ),
}


def _argv(command, model: str, tmp_path: Path, converted: Path) -> list[str]:
    text = str(converted / "cal.txt")
    return {
        "generate": ["generate", "--model", model, "--prompt", "the quick", "--max-new-tokens", "2"],
        "perplexity": ["perplexity", "--model", model, "--text-file", text, "--max-length", "16"],
        "energy": ["energy", "--model", model, "--text-file", text, "--max-length", "16"],
        "distill": [
            *("distill", "--teacher", str(converted / "llama"), "--student", model, "--text-file", text),
            *("--set", "max_length=16", "--no-progress"),
        ],
    }[command] + ["--output-dir", str(tmp_path / "out")]


@pytest.mark.parametrize("case", sorted(UNLOADABLE))
@pytest.mark.parametrize("command", ["generate", "perplexity", "energy", "distill"])
def test_a_model_directory_that_cannot_load_as_saved_is_one_line(converted, tmp_path, capsys, command, case):
    source, config, tensors, files, expected = UNLOADABLE[case]
    if command == "distill" and source == "llama" and case.startswith("architectures"):
        pytest.skip("distill names the student's family from its architectures (covered by the other commands)")
    model = _tampered(converted / source, tmp_path / "model", config, tensors, files)
    before = {p.name: p.stat().st_mtime_ns for p in model.iterdir()}
    try:
        status = main(_argv(command, str(model), tmp_path, converted))
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"spikelm {command}: error: "), lines[0]
    assert str(model) in lines[0] and any(
        e in lines[0] for e in ([expected] if isinstance(expected, str) else expected)
    )
    assert not (tmp_path / "out").exists()
    assert {p.name: p.stat().st_mtime_ns for p in model.iterdir()} == before


# ----------------------------------------------------------------------------------------------
# the environment and the output directory's own files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RANK": "abc"}, "RANK='abc'"),
        ({"RANK": "-1"}, "RANK='-1'"),
        ({"RANK": "1"}, "RANK=1 without a WORLD_SIZE"),  # a stray RANK would skip the output lock
        ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 without a WORLD_SIZE above it (2)"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"SPIKELM_CACHE": "/proc/no/cache"}, "SPIKELM_CACHE"),
        ({"SPIKELM_CACHE": FILE}, "SPIKELM_CACHE"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "pretrain"])
def test_a_bad_environment_is_one_line(paths, tmp_path, capsys, monkeypatch, env, expected, command):
    for name, value in env.items():
        monkeypatch.setenv(name, _fill([value], paths)[0])
    out = tmp_path / "out"
    argv = {
        "generate": ["generate", "--model", "smollm2-135m", "--prompt", "hello"],
        "pretrain": ["pretrain", "--corpus", "pypi", "--max-steps", "1"],
    }[command]
    status = main([*argv, "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"spikelm {command}: error: ") and expected in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("marker", ["[1, 2]", '"pretrain"', "5", "null", "{not json", '{"command": 5}'])
def test_a_run_marker_that_is_not_a_json_object_is_someone_elses_directory(paths, tmp_path, capsys, marker):
    out = tmp_path / "out"
    out.mkdir()
    (out / "spikelm_run.json").write_text(marker)
    (out / "notes.txt").write_text("keep")
    status = main(["data", "train-tokenizer", "--text-file", paths["file"], "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "not empty" in lines[0] and "--overwrite" in lines[0], lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "spikelm_run.json"]


@pytest.mark.parametrize("flag_form", ["~/runs/tok", "~"])
def test_output_dir_tilde_is_the_home_directory_not_a_folder_named_tilde(paths, tmp_path, monkeypatch, flag_form):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "docs.txt"
    text.write_text("".join(f"document {i} has some words in it .\n\n" for i in range(20)))
    argv = ["data", "train-tokenizer", "--text-file", str(text), "--vocab-size", "60", "--output-dir", flag_form]
    assert main([*argv, "--overwrite"]) == 0
    target = home / flag_form[2:] if flag_form != "~" else home
    assert (target / "tokenizer.json").is_file()
    assert not (tmp_path / "~").exists()


# ----------------------------------------------------------------------------------------------
# numbers: one bounds table (spikelm.commands.argtypes.FLAG_BOUNDS), read before any fetch or allocation
# ----------------------------------------------------------------------------------------------

HUGE = str(2**70)  # beyond 64 bits


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--seed", HUGE], "--seed"),
        (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--seed", str(2**32)], "--seed"),
        (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--num-beams", "100000"], "--num-beams"),
        (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--max-new-tokens", HUGE], "--max-new-tokens"),
        (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--top-k", HUGE, "--do-sample"], "--top-k"),
        (["perplexity", "--model", "smollm2-135m", "--text-file", FILE, "--batch-size", "10000000"], "--batch-size"),
        (["perplexity", "--model", "smollm2-135m", "--text-file", FILE, "--max-length", HUGE], "--max-length"),
        (["perplexity", "--model", "smollm2-135m", "--text-file", FILE, "--stride", HUGE], "--stride"),
        (["benchmark", "--generation", "--model", "smollm2-135m", "--threads", "100000"], "--threads"),
        (["benchmark", "--generation", "--model", "smollm2-135m", "--batch-sizes", "1", HUGE], "--batch-sizes"),
        (["benchmark", "--generation", "--model", "smollm2-135m", "--prompt-lengths", HUGE], "--prompt-lengths"),
        (["benchmark", "--repeats", HUGE], "--repeats"),
        (["spikify", "--model", "smollm2-135m", "--num-steps", "1024"], "--num-steps"),
        (["spikify", "--model", "smollm2-135m", "--eval-tokens", "500000000"], "--eval-tokens"),
        (["spikify", "--model", "smollm2-135m", "--calibration-sequences", HUGE], "--calibration-sequences"),
        (["spikify", "--model", "smollm2-135m", "--calibration-length", HUGE], "--calibration-length"),
        (["demo", "--eval-tokens", "500000000"], "--eval-tokens"),
        (["demo", "--finetune-epochs", HUGE], "--finetune-epochs"),
        (["finetune", "--model", "minilm", "--task", "sst2", "--seed", HUGE], "--seed"),
        (["finetune", "--model", "minilm", "--task", "sst2", "--num-steps", "100000"], "--num-steps"),
        (["finetune", "--model", "minilm", "--task", "sst2", "--epochs", HUGE], "--epochs"),
        (["pretrain", "--max-steps", HUGE], "--max-steps"),
        (["reproduce", "--suite", SUITE, "--seeds", f"0,{HUGE}"], "--seeds"),
        (["reproduce", "--pretrain-steps", HUGE], "--pretrain-steps"),
        (["energy", "--model", "smollm2-135m", "--text-file", FILE, "--max-sequences", HUGE], "--max-sequences"),
    ],
)
def test_a_number_beyond_its_bound_is_refused_before_any_fetch(paths, tmp_path, capsys, monkeypatch, argv, flag):
    from spikelm.data import fetch

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched before the bound was checked")

    monkeypatch.setattr(fetch, "_run", no_fetch)
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path / "empty_cache"))
    out = tmp_path / "out"
    try:
        status = main([*_fill(argv, paths), "--output-dir", str(out)])
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0] and ("must be between" in lines[0] or "must be at most" in lines[0]), lines[0]
    assert not out.exists() and not (tmp_path / "empty_cache" / "packages").exists()


@pytest.mark.parametrize("steps", [65, 1000, 10**6])
def test_num_steps_in_a_config_has_an_upper_bound(steps):
    """The configs' one check (a saved config.json or --set num_steps) refuses what would allocate T copies."""
    from spikelm import SpikeLMConfig
    from spikelm.conversion import SpikeLMConversionConfig

    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 64\]"):
        SpikeLMConfig(num_steps=steps)
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 64\]"):
        SpikeLMConversionConfig(neuron="elastic", num_steps=steps)


# ----------------------------------------------------------------------------------------------
# text inputs: the whole file is UTF-8 (one check, argtypes.check_utf8), a regular file, offsets of the file
# ----------------------------------------------------------------------------------------------

BLOCK = 1 << 20  # check_utf8 reads in blocks of this size


def _text_with_bad_byte(path: Path, where: int) -> Path:
    """Valid text with one byte that is not UTF-8 at offset ``where`` (-1: a character cut short at the end)."""
    line = b"plain words on a line\n"
    size = max(where + 100, 4096)
    data = bytearray((line * (size // len(line) + 1))[:size])
    if where == -1:
        data += "é".encode()[:1]  # the first byte of a two-byte character, then the end
    else:
        data[where] = 0xFF
    path.write_bytes(bytes(data))
    return path


TEXT_FLAGS = {  # command -> argv, with {text} where the text file goes
    "pretrain": ["pretrain", "--text-file", "{text}"],
    "perplexity": ["perplexity", "--model", "smollm2-135m", "--text-file", "{text}"],
    "spikify": ["spikify", "--model", "smollm2-135m", "--calibration-text", "{text}"],
    "demo": ["demo", "--text-file", "{text}"],
    "benchmark": ["benchmark", "--generation", "--model", "smollm2-135m", "--calibration-text", "{text}"],
    "data prepare-corpus": ["data", "prepare-corpus", "--text-file", "{text}"],
    "energy": ["energy", "--model", "smollm2-135m", "--text-file", "{text}"],
}


def _one_line(argv, capsys, command) -> str:
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"spikelm {command}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("where", [0, 70_000, BLOCK - 1, BLOCK + 5, -1])
@pytest.mark.parametrize("command", sorted(TEXT_FLAGS))
def test_a_bad_byte_anywhere_in_a_text_input_is_refused_at_its_offset(tmp_path, capsys, command, where):
    text = _text_with_bad_byte(tmp_path / "text.txt", where)
    offset = text.stat().st_size - 1 if where == -1 else where
    argv = [a.replace("{text}", str(text)) for a in TEXT_FLAGS[command]]
    line = _one_line([*argv, "--output-dir", str(tmp_path / "out")], capsys, command)
    assert f"{text} is not UTF-8 text" in line and f"at byte {offset}" in line, line
    assert not (tmp_path / "out").exists()


def test_a_character_split_across_read_blocks_is_valid_text():
    import tempfile

    from spikelm.commands.argtypes import text_file

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "text.txt"
        path.write_bytes(b"a" * (BLOCK - 1) + "é".encode() + b"\n")  # its two bytes straddle the first block
        assert text_file(str(path)) == str(path)


@pytest.mark.parametrize("command", ["pretrain", "perplexity", "demo", "data prepare-corpus"])
def test_a_pipe_as_a_text_file_is_refused_without_waiting(tmp_path, capsys, command):
    import os
    import signal

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    argv = [a.replace("{text}", str(fifo)) for a in TEXT_FLAGS[command]]
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("the argument check waited on a pipe"))
    signal.alarm(30)
    try:
        line = _one_line([*argv, "--output-dir", str(tmp_path / "out")], capsys, command)
    finally:
        signal.alarm(0)
    assert "not a regular file" in line and str(fifo) in line, line


def test_a_tsv_with_a_bad_byte_names_its_offset_in_the_file(paths, tmp_path, capsys):
    data = tmp_path / "sst"
    data.mkdir()
    header, row = b"sentence\tlabel\n", b"a good film\t1\n"
    body = header + row * 10_000  # 140 kB: past any read buffer
    bad = len(body) - 5
    (data / "train.tsv").write_bytes(body[:bad] + b"\xff" + body[bad + 1 :])
    (data / "dev.tsv").write_bytes(header + row * 4)
    argv = ["finetune", "--model", paths["clf"], "--task", "sst2", "--data-dir", str(data), "--max-length", "32"]
    line = _one_line([*argv, "--output-dir", str(tmp_path / "out")], capsys, "finetune")
    assert "train.tsv is not UTF-8" in line and f"at byte {bad}" in line, line


@pytest.mark.parametrize("prompt", ["caf\udce9", "\udcff", "ok then \udc80"])
def test_a_prompt_that_is_not_utf8_is_one_line(paths, tmp_path, capsys, prompt):
    argv = ["generate", "--model", paths["gpt2"], "--prompt", "fine", "--prompt", prompt]
    line = _one_line([*argv, "--output-dir", str(tmp_path / "out")], capsys, "generate")
    assert "--prompt" in line and "not UTF-8" in line, line


# ----------------------------------------------------------------------------------------------
# vocabulary and positions: one check (spikelm.data.tokenization.check_fits)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "perplexity"])
@pytest.mark.parametrize("model", ["llama", "elastic", "gif"])
def test_a_tokenizer_larger_than_the_embedding_is_refused(converted, paths, tmp_path, capsys, command, model):
    text = str(converted / "cal.txt")
    argv = {
        "generate": ["generate", "--prompt", "the quick"],
        "perplexity": ["perplexity", "--text-file", text, "--max-length", "16"],
    }[command]
    argv += ["--model", str(converted / model), "--tokenizer", paths["clf"]]  # bert-base-uncased: 30,522 tokens
    line = _one_line([*argv, "--output-dir", str(tmp_path / "out")], capsys, command)
    assert f"--tokenizer {paths['clf']} has 30522 tokens" in line and "vocab_size 12" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vocab_size", [10, 1000, 30521])
def test_set_vocab_size_smaller_than_the_tokenizer_is_refused(paths, tmp_path, capsys, vocab_size):
    argv = ["pretrain", "--text-file", paths["file"], "--max-steps", "1", "--set", f"vocab_size={vocab_size}"]
    line = _one_line([*argv, "--output-dir", str(tmp_path / "out")], capsys, "pretrain")
    assert "--set vocab_size" in line and f"vocab_size {vocab_size}" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("length", [None, "65", "4096"])  # None: the default 512
def test_a_calibration_length_beyond_the_positions_is_refused(converted, tmp_path, capsys, length):
    argv = ["spikify", "--model", str(converted / "llama"), "--calibration-text", str(converted / "cal.txt")]
    argv += ["--eval-tokens", "0"] + (["--calibration-length", length] if length else [])
    line = _one_line([*argv, "--output-dir", str(tmp_path / "out")], capsys, "spikify")
    assert f"--calibration-length {length or 512} exceeds" in line and "64 positions" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[1, 2, 12]]), r"ids 1\.\.12"),
        (torch.tensor([[-1, 2, 3]]), r"ids -1\.\.3"),
        (torch.tensor([[0, 10**9]]), r"in \[0, 12\)"),
        (torch.ones(1, 65, dtype=torch.long), "calibration length 65 exceeds"),
    ],
)
def test_spikify_from_python_refuses_ids_the_model_does_not_have(converted, ids, message):
    from transformers import AutoModelForCausalLM

    import spikelm

    model = AutoModelForCausalLM.from_pretrained(converted / "llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        spikelm.spikify(model, calibration=ids)
    with pytest.raises(ValueError, match=message):
        spikelm.spikify(model, calibration=[torch.tensor([[1, 2]]), ids])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any change


# ----------------------------------------------------------------------------------------------
# resume: a checkpoint is checked for what it holds (training.checkpoints.verify_checkpoint), a damaged latest one
# falls back to the previous good one; the lock is taken before checkpoints are read; inputs are the same content
# ----------------------------------------------------------------------------------------------

RESUME_MICRO = [
    a
    for s in (
        "hidden_size=32",
        "num_hidden_layers=1",
        "num_attention_heads=2",
        "intermediate_size=64",
        "max_length=32",
        "batch_size=4",
        "eval_examples=8",
        "log_every=1",
        "save_every=2",
    )
    for a in ("--set", s)
]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A micro pretraining run of 4 steps (checkpoints at steps 2 and 4) on a text file of the user's."""
    from spikelm.data.tokenization import sample_text_path

    root = tmp_path_factory.mktemp("resumable")
    text = root / "text.txt"
    text.write_text(Path(sample_text_path()).read_text())
    argv = ["pretrain", "--text-file", str(text), "--no-progress", "--max-steps", "4", *RESUME_MICRO]
    assert main([*argv, "--output-dir", str(root / "run")]) == 0
    return root


@pytest.fixture
def resumable(pretrained_run, tmp_path):
    shutil.copytree(pretrained_run, tmp_path / "copy")
    return tmp_path / "copy"


def _resume(root: Path, *flags):
    return main(
        ["pretrain", "--output-dir", str(root / "run"), "--resume", "--no-progress", "--max-steps", "5", *flags]
    )


def _edit_json(content):
    return lambda path: path.write_text(json.dumps(content) if not isinstance(content, str) else content)


def _edit_state(change):
    def edit(path):
        state = json.loads(path.read_text())
        change(state)
        path.write_text(json.dumps(state))

    return edit


def _edit_weights(change):
    def edit(path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path))

    return edit


def _first_key(tensors):
    return sorted(tensors)[0]


DAMAGED = {  # file of the latest checkpoint -> an edit that leaves it readable but wrong
    "trainer state {}": ("trainer_state.json", _edit_json({})),
    "trainer state a list": ("trainer_state.json", _edit_json([1, 2])),
    "trainer state negative step": ("trainer_state.json", _edit_state(lambda s: s.update(step=-3))),
    "trainer state step text": ("trainer_state.json", _edit_state(lambda s: s.update(step="4"))),
    "trainer state unknown field": ("trainer_state.json", _edit_state(lambda s: s.update(rogue=1))),
    "no config": ("config.json", lambda path: path.unlink()),
    "config a list": ("config.json", _edit_json("[1]")),
    "optimizer a plain tensor": ("optimizer.pt", lambda path: torch.save(torch.zeros(3), path)),
    "optimizer without scheduler": ("optimizer.pt", lambda path: torch.save({"optimizer": {}}, path)),
    "rng a plain tensor": ("rng-0.pt", lambda path: torch.save(torch.zeros(3), path)),
    "foreign weight": ("model.safetensors", _edit_weights(lambda t: t.update(rogue=torch.zeros(2)))),
    "weight missing": ("model.safetensors", _edit_weights(lambda t: t.pop(_first_key(t)))),
    "weight of another shape": (
        "model.safetensors",
        _edit_weights(lambda t: t.update({_first_key(t): torch.zeros(3)})),
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_readable_but_wrong_latest_checkpoint_falls_back_to_the_previous_good_one(resumable, capsys, case):
    from spikelm.training.checkpoints import read_jsonl

    name, edit = DAMAGED[case]
    edit(resumable / "run" / "checkpoints" / "step-00000004" / name)
    with pytest.warns(UserWarning, match=r"step-00000004 \(.*\) is damaged: resuming from the previous complete"):
        assert _resume(resumable) == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(resumable / "run" / "train_log.jsonl")] == [1, 2, 3, 4, 5]


def test_every_checkpoint_damaged_is_one_line(resumable, capsys):
    for step in ("step-00000002", "step-00000004"):
        (resumable / "run" / "checkpoints" / step / "trainer_state.json").write_text("{}")
    line = _one_line(["pretrain", "--output-dir", str(resumable / "run"), "--resume"], capsys, "pretrain")
    assert "every checkpoint is damaged" in line and "trainer_state.json" in line, line


def test_resume_takes_the_lock_before_reading_checkpoints(resumable, capsys, monkeypatch):
    import subprocess
    import sys

    from spikelm.training import checkpoints

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom spikelm.outputs import lock_existing_output_dir\n"
            "lock_existing_output_dir(sys.argv[1], 'pretrain')\nprint('locked', flush=True)\ntime.sleep(60)",
            str(resumable / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(checkpoints, "verify_checkpoint", lambda *a, **k: pytest.fail("read a checkpoint"))
        line = _one_line(["pretrain", "--output-dir", str(resumable / "run"), "--resume"], capsys, "pretrain")
        assert "in use by another spikelm process" in line and f"pid {holder.pid}" in line, line
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("change", ["appended", "replaced", "one byte"])
def test_resume_refuses_a_text_file_whose_content_changed(tmp_path, capsys, change):
    from spikelm.data.tokenization import sample_text_path

    text = tmp_path / "text.txt"
    original = Path(sample_text_path()).read_text()
    text.write_text(original)
    argv = ["pretrain", "--text-file", str(text), "--no-progress", "--max-steps", "2", *RESUME_MICRO]
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "run" / "input_hashes.json").read_text())["--text-file"]["path"] == str(text)
    edited = {"appended": original + "\n\nmore words", "replaced": original.upper(), "one byte": "X" + original[1:]}
    text.write_text(edited[change])  # the same path, new content
    argv = ["pretrain", "--output-dir", str(tmp_path / "run"), "--resume", "--max-steps", "3"]
    line = _one_line(argv, capsys, "pretrain")
    assert f"--text-file {text} is not what the run started with" in line, line


# ----------------------------------------------------------------------------------------------
# the cache: an unpacked (or converted) tree is checked against what was recorded at unpacking, on every use
# ----------------------------------------------------------------------------------------------


def _edit_file(root: Path):
    (root / "pkg" / "data" / "model.bin").write_bytes(b"tampered")


def _add_file(root: Path):
    (root / "pkg" / "evil.py").write_text("print('injected')")


def _remove_file(root: Path):
    (root / "pkg" / "__init__.py").unlink()


def _old_marker(root: Path):
    (root / ".complete").write_text("pkg-1.0-py3-none-any.whl\n")  # what an older spikelm wrote: no file hashes


@pytest.mark.parametrize("tamper", [_edit_file, _add_file, _remove_file, _old_marker], ids=lambda f: f.__name__)
def test_an_unpacked_tree_edited_after_unpacking_is_unpacked_again(tmp_path, tamper):
    import zipfile

    from spikelm.data.fetch import tree_intact, unpack

    archive = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/data/model.bin", b"weights")
        z.writestr("pkg/__init__.py", "")
    root = unpack(archive)
    assert tree_intact(root)
    tamper(root)
    assert not tree_intact(root)
    assert unpack(archive) == root and tree_intact(root)
    assert (root / "pkg" / "data" / "model.bin").read_bytes() == b"weights"
    assert not (root / "pkg" / "evil.py").exists() and (root / "pkg" / "__init__.py").is_file()


# ----------------------------------------------------------------------------------------------
# teachers: finetune --teacher must be a sequence classifier; distill's teacher is not the student itself
# ----------------------------------------------------------------------------------------------


def _save_teacher(kind: str, directory: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel

    from spikelm import SpikeLMConfig, SpikeLMForCausalLM

    vocab = 30522  # the student's (bert-base-uncased)
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = {
        "causal LM": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2)),
        "masked LM": lambda: BertForMaskedLM(BertConfig(vocab_size=vocab, **small)),
        "encoder without a head": lambda: BertModel(BertConfig(vocab_size=vocab, **small)),
        "causal SpikeLM": lambda: SpikeLMForCausalLM(SpikeLMConfig(vocab_size=vocab, num_steps=2, **small)),
    }[kind]()
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["causal LM", "masked LM", "encoder without a head", "causal SpikeLM"])
def test_finetune_teacher_that_is_not_a_classifier_is_refused(paths, tmp_path, capsys, kind):
    teacher = _save_teacher(kind, tmp_path / "teacher")
    capsys.readouterr()  # save_pretrained's progress bar
    argv = ["finetune", "--model", paths["clf"], "--task", "sst2", "--data-dir", paths["sst"], "--max-length", "32"]
    line = _one_line([*argv, "--teacher", str(teacher), "--output-dir", str(tmp_path / "out")], capsys, "finetune")
    assert f"--teacher {teacher}" in line and "not a sequence classifier" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spelling", ["same", "trailing slash", "dot segments", "a link to it"])
def test_distill_with_the_student_as_its_own_teacher_is_refused(converted, tmp_path, capsys, spelling):
    model = converted / "llama"
    if spelling == "a link to it":
        (tmp_path / "link").symlink_to(model)
    student = {
        "same": str(model),
        "trailing slash": f"{model}/",
        "dot segments": f"{model}/../{model.name}",
        "a link to it": str(tmp_path / "link"),
    }[spelling]
    argv = ["distill", "--teacher", str(model), "--student", student, "--text-file", str(converted / "cal.txt")]
    line = _one_line([*argv, "--set", "max_length=16", "--output-dir", str(tmp_path / "out")], capsys, "distill")
    assert "--teacher and --student are the same model" in line, line
    assert not (tmp_path / "out").exists()


def test_distill_resume_refuses_a_teacher_whose_weights_changed(converted, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(converted / "llama", teacher)
    student = converted / "elastic"
    argv = ["distill", "--teacher", str(teacher), "--student", str(student), "--text-file", str(converted / "cal.txt")]
    argv += ["--no-progress", "--set", "max_length=16", "--set", "batch_size=2", "--set", "save_every=1"]
    argv += ["--set", "eval_examples=2", "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--max-steps", "1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    weights = load_file(str(teacher / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})  # same path, new teacher
    line = _one_line([*argv, "--max-steps", "2", "--resume"], capsys, "distill")
    assert f"--teacher {teacher} is not what the run started with" in line, line


@pytest.mark.parametrize("layout", ["one file", "a directory of files"])
@pytest.mark.parametrize("command", ["pretrain", "perplexity", "data prepare-corpus"])
def test_a_text_input_too_large_to_read_whole_is_refused_before_reading(tmp_path, capsys, command, layout):
    from spikelm.commands.argtypes import MAX_TEXT_BYTES

    if layout == "one file":
        text = tmp_path / "huge.txt"
        with open(text, "wb") as f:  # sparse: no disk used, and never read
            f.truncate(MAX_TEXT_BYTES + 1)
    else:
        text = tmp_path / "texts"
        text.mkdir()
        for i in range(3):
            with open(text / f"part{i}.txt", "wb") as f:
                f.truncate(MAX_TEXT_BYTES // 2)
        if command != "perplexity":
            pytest.skip("only perplexity's --text-file takes a directory")
    argv = [a.replace("{text}", str(text)) for a in TEXT_FLAGS[command]]
    line = _one_line([*argv, "--output-dir", str(tmp_path / "out")], capsys, command)
    assert str(text) in line and "GiB" in line and "read whole" in line, line


def test_a_rotation_recipe_with_unfolded_norm_gains_is_refused():
    """Models saved before the recipe metadata: a config saying the residual stream is rotated while a norm gain is
    not folded (all ones) was edited."""
    from conftest import tiny_llama_model

    from spikelm.conversion import spikify
    from spikelm.errors import UserError
    from spikelm.evaluation.loading import check_model_state

    model = spikify(tiny_llama_model(), rotation="none", neuron="gif")
    check_model_state(model, "--model m")  # unit gains, no rotation: fine
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(2)
    check_model_state(model, "--model m")  # a real gain, no rotation claimed: fine
    model.config.quantization_config.rotation = "hadamard"
    with pytest.raises(UserError, match="rotation='hadamard'.*input_layernorm.weight is not folded"):
        check_model_state(model, "--model m")


@pytest.mark.parametrize(
    "variable, value",
    [("SPIKELM_DECODE_STEP", "2"), ("SPIKELM_KERNELS", "perhaps"), ("SPIKELM_CPU_KERNELS_MAX_ROWS", "99")],
)
def test_a_bad_switch_is_one_line_before_generating(variable, value, paths, capsys, monkeypatch):
    monkeypatch.setenv(variable, value)
    status = main(["generate", "--model", paths["model"], "--prompt", "the quick", "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"spikelm generate: error: {variable}='{value}'"), lines[0]
    assert captured.out == ""
