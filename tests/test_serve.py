"""``spikelm serve``: transformers' server with spikelm registered, answering the ``openai`` client on 127.0.0.1.

Tiny models built with the public API (a converted LLaMA with the default recipe, a native SpikeLM decoder), with a
word-level tokenizer that has a chat template: a chat completion equals ``generate()``'s greedy continuation token for
token, on the spike-code cache (every K/V update of every request counted), streaming gives the same text, two
concurrent requests both complete, bad requests get HTTP 400 and the server goes on; the command stops cleanly on
Ctrl-C, and a model that cannot serve is refused in one line before anything listens."""

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import word_tokenizer

openai = pytest.importorskip("openai", reason="needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("fastapi", reason="needs the serve extra")
pytest.importorskip("uvicorn", reason="needs the serve extra")

from spikelm.commands.main import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "user assistant system : hello tell me a story about the cat dog sat on mat ran far away and then it was good "
    "day night bird sang sun rose over hill"
).split()
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
PROMPTS = ["tell me a story about the cat", "hello the dog ran far away"]
NEW_TOKENS = 10
TIMEOUT = 120  # seconds, for every request and for the server to start or stop


def chat_tokenizer(template: str | None = TEMPLATE):
    tok = word_tokenizer(WORDS, pad=True)
    tok.model_input_names = ["input_ids", "attention_mask"]
    if template is not None:
        tok.chat_template = template
    return tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` (as uvicorn does: SO_REUSEADDR, so closed connections' TIME_WAIT
    does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``converted`` (a tiny LLaMA spikified with the default recipe), ``native`` (a causal SpikeLM, T=2),
    each with the chat tokenizer; ``llama`` (the real-valued source), ``encoder``, ``no_tokenizer``, ``no_template``."""
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    import spikelm
    from spikelm import SpikeLMConfig, SpikeLMForCausalLM
    from spikelm.conversion.recipes import DEFAULT_RECIPE, RECIPES

    root = tmp_path_factory.mktemp("serve")
    tok = chat_tokenizer()
    vocab = len(tok.get_vocab())
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=0.3,  # logits far apart: varied greedy continuations
            **ids,
        )
    ).eval()
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    calibration = torch.randint(4, vocab, (2, 16))
    spikelm.spikify(llama, RECIPES[DEFAULT_RECIPE], calibration=calibration)  # `spikelm spikify`'s default recipe
    llama.save_pretrained(root / "converted")
    tok.save_pretrained(root / "converted")
    native = SpikeLMForCausalLM(
        SpikeLMConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            position_embedding_type="rotary",
            initializer_range=0.3,
            num_steps=2,
            **ids,
        )
    ).eval()
    with torch.no_grad():
        native(calibration)  # data-initialised alphas
    native.save_pretrained(root / "native")
    tok.save_pretrained(root / "native")
    BertForMaskedLM(
        BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(root / "encoder")
    chat_tokenizer().save_pretrained(root / "encoder")
    LlamaForCausalLM.from_pretrained(root / "llama").save_pretrained(root / "no_tokenizer")
    LlamaForCausalLM.from_pretrained(root / "llama").save_pretrained(root / "no_template")
    chat_tokenizer(template=None).save_pretrained(root / "no_template")
    return {name: root / name for name in ("converted", "native", "llama", "encoder", "no_tokenizer", "no_template")}


def greedy(model_dir: Path, prompt: str, new_tokens: int = NEW_TOKENS) -> list[int]:
    """``generate()``'s greedy continuation of the chat-templated ``prompt`` (a fresh load of the model)."""
    from transformers import AutoTokenizer

    from spikelm.evaluation.loading import load_any_causal_lm

    model, _ = load_any_causal_lm(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[-1] :].tolist()


def count_cache_updates(monkeypatch) -> collections.Counter:
    """Count the K/V ``update`` calls of every cache layer class, by the class of the layer that ran (a subclass
    that inherits its ``update``, e.g. the signed codes' layer, counts under its own name; a call chained through
    ``super()`` counts once)."""
    from transformers.cache_utils import DynamicLayer

    from spikelm.conversion.cache import GIFCodeLayer, SpikeCodeLayer
    from spikelm.models.modeling_spikelm_causal import SpikeKVCacheLayer

    counts = collections.Counter()
    for cls in (DynamicLayer, SpikeKVCacheLayer, SpikeCodeLayer, GIFCodeLayer):
        original = cls.__dict__["update"]

        def counted(self, *args, _cls=cls, _original=original, **kwargs):
            if next(c for c in type(self).__mro__ if "update" in c.__dict__) is _cls:  # the outermost update
                counts[type(self).__name__] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "update", counted)
    return counts


def _default_recipes_cache_layer() -> str:
    from spikelm.conversion.cache import cache_layer_class
    from spikelm.conversion.recipes import DEFAULT_RECIPE
    from spikelm.nn.neurons import neuron_class

    return cache_layer_class(neuron_class(DEFAULT_RECIPE)).__name__


# the cache layer each served model's K/V go through (the converted one: its neuron's spike codes)
SPIKE_LAYER = {"converted": _default_recipes_cache_layer(), "native": "SpikeKVCacheLayer"}


@pytest.fixture(scope="module", params=["converted", "native"])
def served(request, models):
    """(kind, model name, server, openai client): the model served in this process on a free port of 127.0.0.1."""
    from spikelm.evaluation.serving import Server, prepare

    kind = request.param
    name = str(models[kind])
    server = Server(prepare(name), "127.0.0.1", free_port(), log_level="warning").start(timeout=TIMEOUT)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=TIMEOUT, max_retries=0)
    yield kind, name, server, client
    client.close()
    server.stop(timeout=TIMEOUT)
    assert port_is_free(server.port)  # stopped: a server can listen there again


def chat(client, name, prompt, **options):
    return client.chat.completions.create(
        model=name,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=NEW_TOKENS,
        temperature=0,
        **options,
    )


def test_a_completion_equals_generates_greedy_continuation_on_the_spike_code_cache(served, monkeypatch):
    kind, name, server, client = served
    tok = server.servable.tokenizer
    expected = greedy(Path(name), PROMPTS[0])
    assert len(set(expected)) > 2  # a continuation worth comparing
    counts = count_cache_updates(monkeypatch)
    guard = server.servable.model._spikelm_serve_guard
    checked = guard.calls
    answer = chat(client, name, PROMPTS[0])
    # token for token: the same ids (the eos, if any, is not text), the same count
    assert answer.usage.completion_tokens == len(expected)
    assert tok(answer.choices[0].message.content, add_special_tokens=False).input_ids == [
        i for i in expected if i not in tok.all_special_ids
    ]
    assert answer.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    # every forward call of the request (the prompt, then one per further token) updated every layer's K/V on the
    # spike-code cache, none on a float cache
    layers = 2
    assert counts == {SPIKE_LAYER[kind]: layers * len(expected)}
    assert guard.calls - checked == len(expected)


def stream_text(client, name, prompt) -> str:
    chunks = list(chat(client, name, prompt, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1
    return "".join(deltas)


def test_streaming_returns_the_same_text(served):
    kind, name, server, client = served
    whole = chat(client, name, PROMPTS[1]).choices[0].message.content
    assert stream_text(client, name, PROMPTS[1]) == whole
    assert whole == server.servable.tokenizer.decode(greedy(Path(name), PROMPTS[1]), skip_special_tokens=True)


def test_two_concurrent_requests_both_complete(served):
    kind, name, server, client = served
    alone = [chat(client, name, p).choices[0].message.content for p in PROMPTS]
    with ThreadPoolExecutor(2) as pool:
        answers = [
            pool.submit(chat, client, name, PROMPTS[0]),
            pool.submit(stream_text, client, name, PROMPTS[1]),
        ]
        results = [f.result(timeout=TIMEOUT) for f in answers]
    assert results[0].choices[0].message.content == alone[0]
    assert results[1] == alone[1]


@pytest.mark.parametrize(
    "options, field",
    [
        ({"model": "some-other-model"}, "pinned"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"extra_body": {"generation_config": '{"cache_implementation": "static"}'}}, "cache_implementation"),
        ({"extra_body": {"generation_config": '{"use_cache": false}'}}, "use_cache"),
    ],
)
def test_a_bad_request_gets_an_http_error_and_the_server_goes_on(served, options, field):
    kind, name, server, client = served
    request = {"model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **options}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**request)
    assert err.value.status_code == 400 and field in str(err.value.body)
    assert chat(client, name, "hello").choices[0].message.content  # the server goes on


def test_models_lists_the_served_model(served):
    kind, name, server, client = served
    assert [m.id for m in client.models.list()] == [name]


@pytest.mark.parametrize("kind", ["converted", "native"])
def test_the_guard_fails_a_forward_call_off_the_spike_code_cache(models, kind):
    from spikelm.evaluation.serving import prepare

    model = prepare(str(models[kind])).model
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model(ids, use_cache=True)  # on the spike-code cache: passes
        with pytest.raises(RuntimeError, match="without its spike-code cache"):
            model(ids, use_cache=False)


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def test_the_command_serves_and_stops_cleanly_on_ctrl_c(models):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "spikelm", "serve", str(models["converted"]), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "Uvicorn running" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(TIMEOUT), "".join(lines)[-3000:]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
        answer = chat(client, str(models["converted"]), PROMPTS[0])
        assert answer.choices[0].message.content == chat_tokenizer().decode(
            greedy(models["converted"], PROMPTS[0]), skip_special_tokens=True
        )
        client.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(TIMEOUT)
    output = "".join(lines)
    assert "Traceback" not in output and "server stopped" in output
    assert f"http://127.0.0.1:{port}/v1" in output and "spike codes" in output
    assert port_is_free(port)


def refused(args, capsys) -> str:
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("spikelm serve: error: ") and "Traceback" not in err
    return err


def test_a_model_that_cannot_serve_is_refused_in_one_line(models, capsys):
    assert "not a causal language model" in refused([str(models["encoder"]), "--port", str(free_port())], capsys)
    assert "no usable tokenizer" in refused([str(models["no_tokenizer"]), "--port", str(free_port())], capsys)
    assert "no chat template" in refused([str(models["no_template"]), "--port", str(free_port())], capsys)
    assert "--continuous-batching" in refused([str(models["converted"]), "--continuous-batching"], capsys)
    assert "--port" in refused([str(models["converted"]), "--port", "70000"], capsys)


def test_a_port_in_use_is_refused_before_the_model_loads(models, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"--port {port} is in use" in refused([str(models["converted"]), "--port", str(port)], capsys)
