"""benchmarks/gpu_run.py (the GPU run of issue 26) at tiny sizes on the CPU, and the lossless payload of
benchmarks/gpu_payload.py (pack -> unpack -> bit-identical tensors), without network."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_payload  # noqa: E402

# gguf and datasets are not on the GPU machine: the run must not need them
BLOCKED = "import sys, runpy; sys.modules['gguf'] = None; sys.modules['datasets'] = None; "


def _state(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {
        "model.embed_tokens.weight": gpu_payload.to_q8_0_grid(rng.normal(0, 0.05, (40, 64)).astype(np.float32)),
        "model.layers.0.mlp.up_proj.weight": gpu_payload.to_q4_1_grid(rng.normal(0, 0.1, (96, 64)).astype(np.float32)),
        "model.layers.0.self_attn.q_proj.weight": gpu_payload.to_q4_1_grid(
            (rng.standard_t(3, (64, 64)) * 0.02).astype(np.float32)  # heavy tails: wide blocks
        ),
        "model.layers.0.input_layernorm.weight": rng.normal(1, 0.1, 64).astype(np.float32),
        "model.off_grid.weight": rng.normal(0, 1, (8, 64)).astype(np.float32),
    }
    constant = np.full((4, 64), 0.25, np.float32)  # every block constant: d = 0
    constant[1] = gpu_payload.to_q4_1_grid(rng.normal(0, 1, (1, 64)).astype(np.float32))
    state["model.constant.weight"] = constant
    return state


def test_payload_round_trip_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_payload, "CHUNK_BYTES", 1024)  # several chunks per stream
    state = _state()
    tensors, streams = gpu_payload.pack_state_dict(state)
    encodings = {name: entry["encoding"] for name, entry in tensors.items()}
    assert encodings["model.embed_tokens.weight"] == "q8_0"
    assert encodings["model.layers.0.mlp.up_proj.weight"] == "q4_1"
    assert encodings["model.layers.0.self_attn.q_proj.weight"] == "q4_1"
    assert encodings["model.constant.weight"] == "q4_1"
    assert encodings["model.layers.0.input_layernorm.weight"] == "raw"
    assert encodings["model.off_grid.weight"] == "raw"
    tokens = {"pypi_train": np.arange(1000, dtype=np.uint16), "brown": np.arange(7, 70, dtype=np.uint16)}
    refs = gpu_payload.add_token_arrays(streams, tokens)
    files = {"config.json": b'{"a": 1}\n', "tokenizer.json": b"x" * 5000}
    out = tmp_path / "payload"
    index = gpu_payload.write_payload(out, tensors, streams, files, {"token_arrays": refs}, part_mib=1.004)
    parts = sorted(out.glob("part*"))
    assert len(parts) > 1 and len({c["part"] for c in index["chunks"]}) == len(parts)
    assert all(sum(f.stat().st_size for f in p.iterdir()) <= 1.004 * 2**20 for p in parts)
    # any order, any folders
    assert gpu_payload.check_round_trip(state, parts[::-1]) == len(state)
    assert gpu_payload.check_round_trip(state, [out]) == len(state)  # the folder above the parts
    got, index, raw = gpu_payload.unpack_state_dict(parts)
    for name, a in state.items():
        assert got[name].dtype == a.dtype and got[name].tobytes() == a.tobytes(), name
    assert np.array_equal(gpu_payload.token_array(index, raw, "brown"), tokens["brown"])
    model_dir = tmp_path / "model"
    gpu_payload.unpack_model(parts, model_dir)
    from safetensors.numpy import load_file

    loaded = load_file(str(model_dir / "model.safetensors"))
    assert all(loaded[n].tobytes() == state[n].tobytes() for n in state)
    assert (model_dir / "tokenizer.json").read_bytes() == files["tokenizer.json"]
    # a missing part and a damaged chunk are refused, in one line
    with pytest.raises(FileNotFoundError, match="is in none of"):
        gpu_payload.read_streams(parts[:1])
    victim = next(p for p in parts[0].iterdir() if p.name != gpu_payload.INDEX)
    victim.write_bytes(b"\0" + victim.read_bytes()[1:])
    with pytest.raises(ValueError, match="sha256"):
        gpu_payload.read_streams(parts)


def test_off_grid_block_is_stored_raw():
    a = gpu_payload.to_q4_1_grid(np.random.default_rng(1).normal(0, 1, (2, 64)).astype(np.float32))
    a[1, 5] = np.nextafter(a[1, 5], np.float32(10))  # one value one ulp off the grid
    tensors, _ = gpu_payload.pack_state_dict({"w": a})
    assert tensors["w"]["encoding"] == "raw"


def _run(tmp_path, *args, timeout=240):
    out = tmp_path / "out"
    script = str(ROOT / "benchmarks" / "gpu_run.py")
    argv = [script, "--tiny", "--device", "cpu", "--out", str(out), "--work-dir", str(tmp_path / "work"), *args]
    code = BLOCKED + f"sys.argv = {argv!r}; runpy.run_path({script!r}, run_name='__main__')"
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - started
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads((out / "gpu_run.json").read_text()), out, wall, res.stdout


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_tiny_run_on_cpu(tmp_path):
    data, out, _, stdout = _run(
        tmp_path, "--budget-seconds", "75", "--no-compile", "--test-files", "tests/test_monitor.py"
    )
    assert data["status"] == "done", stdout[-2000:]
    assert data["elapsed_s"] < 75
    sections = data["sections"]
    assert set(sections) == {"correctness", "speed", "distill", "cuda_tests"}
    for name, section in sections.items():
        assert section["status"] in ("done", "stopped: the section's time was up"), (name, section)
        assert "settings" in section
    env = data["environment"]
    assert env["torch"] and env["transformers"] and env["device"] == "cpu"
    assert set(data["setup"]["conversions"]) == {"gif", "elastic"}
    cases = sections["correctness"]["cases"]
    assert {(c["model"], c["dtype"]) for c in cases} >= {("gif", "float32"), ("elastic", "bfloat16")}
    for case in cases:
        assert "error" not in case, case
        assert _finite(case["logits_max_abs_diff"]) and case["argmax_flips"] == 0  # the CPU against itself
        if case["model"] != "real":
            assert case["greedy"]["equal"]
    speed = [c for c in sections["speed"]["cases"] if "error" not in c]
    assert speed
    for case in speed:
        for model in ("real", "gif", "elastic"):
            assert _finite(case[model]["prefill_tokens_per_s"]) and case[model]["prefill_tokens_per_s"] > 0
            assert case[model]["memory"]["parameter_bytes"] > 0
    curve = sections["distill"]["curve"]
    assert len(curve) >= 2 and curve[-1]["tokens"] > 0
    for point in curve:
        assert all(_finite(point[k]) for k in ("heldout_kl", "brown_perplexity", "teacher_brown_perplexity"))
    assert _finite(sections["distill"]["tokens_per_s"])
    assert (out / "distill_curve.png").stat().st_size > 0
    assert "returncode" in sections["cuda_tests"] and (out / "cuda_tests.log").is_file()


def test_a_run_out_of_time_stops_itself_and_keeps_its_json(tmp_path):
    budget = 14
    data, _, wall, stdout = _run(tmp_path, "--budget-seconds", str(budget), "--no-compile")
    assert data["status"] == "stopped: the run's time was up", stdout[-2000:]
    assert data["elapsed_s"] <= budget
    assert wall < budget + 30  # the interpreter's start and imports come on top
    assert set(data["sections"]) == {"correctness", "speed", "distill", "cuda_tests"}
    assert all(s["status"] != "running" for s in data["sections"].values())
