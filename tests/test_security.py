"""What an attacker (or an unlucky user) can plant, and what spikelm must never do with it: write through a link out
of the output directory, replace or delete an input or a folder it did not write, run code found in a model
directory or a config file. Each case: exit status 2, one line ``spikelm CMD: error: ...``, and every file outside
what the command may write byte-identical afterwards. Models are made with the public API (save_pretrained)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import save_tiny_llama, save_tiny_spikelm_classifier

from spikelm.commands.main import main
from spikelm.outputs import MARKER, OutputDirError, prepare_output_dir, release_output_dirs

# a pretraining run of one step on a micro model, should a refusal ever be missed
MICRO = [
    a for s in ("hidden_size=16", "num_hidden_layers=1", "num_attention_heads=2", "max_length=16") for a in ("--set", s)
]
TEXT = "".join(f"the quick brown fox {i} jumps over the lazy dog .\n\n" for i in range(40))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny LLaMA (word-level tokenizer) and a copy (a distillation student), a SpikeLM classifier with an SST-2
    folder, and a text file: everything a user makes with the public API."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("inputs")
    save_tiny_llama(root / "llama", sorted(set(TEXT.split())), max_position_embeddings=64)
    shutil.copytree(root / "llama", root / "student")
    tokenizer = save_tiny_spikelm_classifier(root / "clf")
    assert isinstance(tokenizer, BertTokenizerFast)
    (root / "sst").mkdir()
    rows = "sentence\tlabel\n" + "".join(f"good film {i}\t1\nbad film {i}\t0\n" for i in range(4))
    for split in ("train", "dev"):
        (root / "sst" / f"{split}.tsv").write_text(rows)
    (root / "text.txt").write_text(TEXT)
    return {name: root / name for name in ("llama", "student", "clf", "sst", "text.txt")}


def _state(root: Path) -> dict:
    """Every entry under ``root``: a link's target, a file's hash, a directory (links not followed)."""
    state = {}
    for dirpath, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = "-> " + os.readlink(path)
            elif path.is_file():
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[key] = "dir"
    return state


def _refused(argv, capsys) -> str:
    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    name = " ".join(argv[:2]) if argv[0] == "data" else argv[0]
    assert lines[0].startswith(f"spikelm {name}: error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------
# links planted in an output directory
# ----------------------------------------------------------------------------------------------

LINKS = {  # name in the output directory -> what it points to (under the attacker's folder)
    "file": ("config.json", "victim.json"),
    "tokenizer": ("tokenizer.json", "victim.json"),
    "directory": ("checkpoints", "victim_dir"),
    "dangling": ("model.safetensors", "not_there_yet"),
    "nested": ("tensorboard/events.out", "victim.json"),
}


def _commands(inputs, out):
    return {
        # a second spikify into its own earlier output (no --overwrite needed)
        "spikify": ["spikify", "--model", str(inputs["llama"]), "--output-dir", str(out)],
        "pretrain": [
            *("pretrain", "--text-file", str(inputs["text.txt"]), "--max-steps", "1", *MICRO),
            *("--output-dir", str(out), "--overwrite"),
        ],
        "train-tokenizer": [
            *("data", "train-tokenizer", "--text-file", str(inputs["text.txt"]), "--vocab-size", "100"),
            *("--output-dir", str(out), "--overwrite"),
        ],
        "generate": [
            *("generate", "--model", str(inputs["llama"]), "--prompt", "the quick", "--max-new-tokens", "1"),
            *("--output-dir", str(out), "--overwrite"),
        ],
    }


@pytest.mark.parametrize("link", sorted(LINKS))
@pytest.mark.parametrize("command", ["spikify", "pretrain", "train-tokenizer", "generate"])
def test_a_link_planted_in_the_output_directory_is_never_written_through(inputs, tmp_path, capsys, command, link):
    outside = tmp_path / "attacker"
    outside.mkdir()
    (outside / "victim.json").write_text('{"keep": "me"}')
    (outside / "victim_dir").mkdir()
    (outside / "victim_dir" / "precious.txt").write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    marker_command = {"train-tokenizer": "data train-tokenizer"}.get(command, command)
    (out / MARKER).write_text(json.dumps({"command": marker_command, "identity": None}))
    name, target = LINKS[link]
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).symlink_to(outside / target)
    before, before_out = _state(outside), _state(out)
    argv = _commands(inputs, out)[command]
    line = _refused(argv, capsys)
    assert "symbolic link" in line and str(out / name) in line, line
    assert _state(outside) == before and _state(out) == before_out
    assert not (outside / "not_there_yet").exists()


# ----------------------------------------------------------------------------------------------
# an output directory overlapping an input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
@pytest.mark.parametrize("command", ["spikify", "finetune", "distill-teacher", "distill-student", "generate"])
def test_an_output_overlapping_an_input_is_refused_and_the_input_kept(inputs, tmp_path, capsys, command, where):
    model_key = {"finetune": "clf", "distill-student": "student"}.get(command, "llama")
    model = tmp_path / "models" / model_key
    shutil.copytree(inputs[model_key], model)
    out = {"same": model, "inside": model / "converted", "containing": model.parent}[where]
    others = {"llama": inputs["llama"], "student": inputs["student"]}
    if command == "distill-teacher":
        others["llama"] = model
    if command == "distill-student":
        others["student"] = model
    argv = {
        "spikify": ["spikify", "--model", str(model)],
        "finetune": ["finetune", "--model", str(model), "--task", "sst2", "--data-dir", str(inputs["sst"])],
        "generate": ["generate", "--model", str(model), "--prompt", "the quick", "--max-new-tokens", "1"],
    }.get(command) or [
        *("distill", "--teacher", str(others["llama"]), "--student", str(others["student"])),
        *("--text-file", str(inputs["text.txt"]), "--set", "max_length=16", "--no-progress"),
    ]
    if command == "finetune":
        argv += ["--max-length", "32", "--epochs", "1"]
    before = _state(tmp_path / "models")
    line = _refused([*argv, "--output-dir", str(out), "--overwrite"], capsys)
    assert "--output-dir" in line and "the input" in line and str(model) in line, line
    assert _state(tmp_path / "models") == before


# ----------------------------------------------------------------------------------------------
# --overwrite deletes only what the same command wrote
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("previous", [None, "energy", "not json", "[1, 2]"])
@pytest.mark.parametrize("folder", ["checkpoints", "tensorboard"])
def test_overwrite_never_deletes_a_folder_another_writer_left(inputs, tmp_path, capsys, previous, folder):
    out = tmp_path / "somebody_elses"
    (out / folder / "step-00000001").mkdir(parents=True)
    (out / folder / "step-00000001" / "thesis.tex").write_text("years of work")
    if previous is not None:
        text = previous if not previous.isalpha() else json.dumps({"command": previous, "identity": None})
        (out / MARKER).write_text(text)
    before = _state(out)
    argv = ["pretrain", "--text-file", str(inputs["text.txt"]), "--max-steps", "1", *MICRO]
    argv += ["--output-dir", str(out), "--overwrite"]
    line = _refused(argv, capsys)
    assert folder in line and "did not write" in line, line
    assert _state(out) == before


def test_overwrite_replaces_a_previous_run_of_the_same_command(tmp_path):
    out = tmp_path / "mine"
    prepare_output_dir(out, "pretrain")
    release_output_dirs()
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    prepare_output_dir(out, "pretrain", overwrite=True, replaces=("checkpoints", "tensorboard"))
    release_output_dirs()
    assert not (out / "checkpoints").exists()
    (out / "checkpoints").mkdir()
    (out / MARKER).write_text(json.dumps({"command": "distill"}))
    with pytest.raises(OutputDirError, match="did not write"):
        prepare_output_dir(out, "pretrain", overwrite=True, replaces=("checkpoints",))
    assert (out / "checkpoints").is_dir()


# ----------------------------------------------------------------------------------------------
# code payloads never run
# ----------------------------------------------------------------------------------------------


class _Payload:
    path = ""

    def __reduce__(self):
        return (Path(self.path).write_text, ("ran",))


def _pickled_model(source: Path, directory: Path, marker: Path) -> Path:
    shutil.copytree(source, directory)
    (directory / "model.safetensors").unlink()
    payload = _Payload()
    payload.path = str(marker)
    with open(directory / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": payload}, f)
    return directory


@pytest.mark.parametrize("command", ["spikify", "generate", "perplexity", "energy", "distill"])
def test_a_pickled_payload_never_runs(inputs, tmp_path, capsys, command):
    marker = tmp_path / "PWNED"
    evil = _pickled_model(inputs["llama"], tmp_path / "evil", marker)
    text = str(inputs["text.txt"])
    argv = {
        "spikify": ["spikify", "--model", str(evil), "--calibration-text", text, "--eval-tokens", "0"],
        "generate": ["generate", "--model", str(evil), "--prompt", "the quick", "--max-new-tokens", "1"],
        "perplexity": ["perplexity", "--model", str(evil), "--text-file", text],
        "energy": ["energy", "--model", str(evil), "--text-file", text, "--max-length", "32"],
        "distill": [
            *("distill", "--teacher", str(evil), "--student", str(inputs["student"])),
            *("--text-file", text, "--set", "max_length=16"),
        ],
    }[command]
    line = _refused([*argv, "--output-dir", str(tmp_path / "out")], capsys)
    assert "refused to load" in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_yaml_payload_never_runs(inputs, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f"learning_rate: !!python/object/apply:os.system ['touch {marker}']\n")
    argv = ["pretrain", "--config", str(config), "--text-file", str(inputs["text.txt"])]
    line = _refused([*argv, "--output-dir", str(tmp_path / "out")], capsys)
    assert "--config" in line or str(config) in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["spikify", "generate"])
def test_auto_map_custom_code_never_runs(inputs, tmp_path, capsys, command):
    marker = tmp_path / "PWNED"
    model = tmp_path / "custom"
    shutil.copytree(inputs["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    text = str(inputs["text.txt"])
    argv = {
        "spikify": ["spikify", "--model", str(model), "--calibration-text", text, "--eval-tokens", "0"],
        "generate": ["generate", "--model", str(model), "--prompt", "the quick", "--max-new-tokens", "1"],
    }[command]
    argv += ["--calibration-sequences", "1", "--calibration-length", "8"] if command == "spikify" else []
    try:
        main([*argv, "--output-dir", str(tmp_path / "out")])
    except SystemExit:
        pass
    capsys.readouterr()
    assert not marker.exists()
