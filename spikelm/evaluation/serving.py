"""Serving a causal LM, spiking or not, behind the OpenAI API with transformers' own server (``transformers serve``).

The server is transformers': its FastAPI app (``transformers.cli.serving.server.build_server``), its request handlers
(chat completions with streaming, legacy completions, responses), its model manager and its generation thread
(requests are generated one at a time with ``model.generate()``). spikelm adds:

* **loading**: the model is what ``spikelm generate`` loads (:mod:`spikelm.evaluation.loading`): a native SpikeLM
  decoder, a converted model (restored spiking by the ``"spikelm"`` quantization method), a real-valued transformers
  causal LM or a named source, with its tokenizer; the server is pinned to it (a request naming another model is
  answered 400);
* **checks before the server starts** (:func:`prepare`): a model that cannot chat (an encoder, no tokenizer, no chat
  template) is one :class:`~spikelm.errors.UserError` line; then one short greedy generation through the chat
  template, as a request would run it, must succeed and, for a spiking model, run on the spike-code cache;
* **the spike-code cache on every request**: a forward hook on the model (:func:`guard_spike_cache`) checks the cache
  of every forward call of a spiking model; a call on any other cache fails its request instead of silently running
  with real-valued K and V (the handlers also refuse a request's ``generation_config`` asking for a static or other
  cache, or for none);
* **request checks**: ``max_tokens`` (and its aliases) must be a positive integer, ``temperature`` non-negative,
  ``top_p`` in (0, 1]; otherwise HTTP 400 naming the field, not a failed generation.

Continuous batching (transformers' paged attention) keeps K and V as real values in its own paged cache, bypassing
the spike-code cache; it is not offered (the command refuses ``--continuous-batching`` in one line).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from spikelm.errors import UserError

from .loading import NATIVE, ModelSpec, inspect_model, load_model

# request fields that set the number of new tokens (chat completions, legacy completions, responses)
MAX_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
CHECK_MESSAGES = [{"role": "user", "content": "Hello"}]


def serve_dependencies_missing() -> list[str]:
    """The packages of the ``serve`` extra that are not installed."""
    import importlib.util

    return [name for name in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(name) is None]


@dataclass
class Servable:
    """A model checked to serve: its spec (see :mod:`.loading`), its tokenizer and, once loaded, the model."""

    name: str  # the name requests use (as given on the command line)
    spec: ModelSpec
    tokenizer: object
    model: object = None

    @property
    def spiking(self) -> bool:
        return self.spec.spiking


def load_chat_tokenizer(spec: ModelSpec, flag: str = "MODEL"):
    """The tokenizer saved with the model, refused in one line if there is none or it has no chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{flag} {spec.name}: no usable tokenizer saved with the model ({first}); save one with "
            "tokenizer.save_pretrained(DIR) next to the model"
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{flag} {spec.name}: its tokenizer has no chat template, which chat completions need; set "
            "tokenizer.chat_template and save the tokenizer again (e.g. from an instruct model of the same family)"
        )
    return tokenizer


def cache_of_call(kwargs, output):
    """The cache a forward call of a causal LM ran on (as ``generate()`` passes it, or as the call returned it)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    return cache


def is_spike_code_cache(cache) -> bool:
    """Whether ``cache`` keeps K and V as spike codes (a native decoder's or a converted model's cache)."""
    from spikelm.conversion.cache import is_spike_cache
    from spikelm.models.modeling_spikelm_causal import SpikeLMCache

    return isinstance(cache, SpikeLMCache) or is_spike_cache(cache)


class SpikeCacheGuard:
    """Forward hook (with kwargs) of a spiking model: every call must run on a spike-code cache (or fail).
    ``calls`` counts the forward calls checked, ``last_cache`` describes the last cache seen."""

    def __init__(self):
        self.calls = 0
        self.last_cache: str | None = None
        self._lock = threading.Lock()

    def __call__(self, module, args, kwargs, output):
        cache = cache_of_call(kwargs, output)
        if cache is None:
            raise RuntimeError("spikelm serve: a forward call of the spiking model ran without its spike-code cache")
        if not is_spike_code_cache(cache):
            raise RuntimeError(
                f"spikelm serve: the spiking model ran on a {type(cache).__name__}, not its spike-code cache; "
                "refusing the request rather than serving real-valued K and V"
            )
        with self._lock:
            self.calls += 1
            self.last_cache = f"{type(cache).__name__} of {type(cache.layers[0]).__name__}" if cache.layers else None
        return output


def guard_spike_cache(model) -> SpikeCacheGuard:
    """Install (once) the :class:`SpikeCacheGuard` on a spiking ``model``; returns it."""
    guard = getattr(model, "_spikelm_serve_guard", None)
    if guard is None:
        guard = SpikeCacheGuard()
        model.register_forward_hook(guard, with_kwargs=True)
        model._spikelm_serve_guard = guard
    return guard


def prepare(name: str, flag: str = "MODEL") -> Servable:
    """Check that ``name`` can serve chat completions, load it and run one short request's generation; one
    :class:`UserError` line for anything that cannot serve. Nothing listens yet."""
    spec = inspect_model(name, need_causal=True, flag=flag)
    tokenizer = load_chat_tokenizer(spec, flag)
    servable = Servable(name, spec, tokenizer)
    servable.model = load_servable_model(servable)
    check_generation(servable, flag)
    return servable


def load_servable_model(servable: Servable):
    model = load_model(servable.spec)
    if servable.spiking:
        guard_spike_cache(model)
    return model


def check_generation(servable: Servable, flag: str = "MODEL") -> None:
    """Two greedy tokens for a one-message chat, as the server runs a request: the chat template must render and
    tokenize into inputs the model takes, and a spiking model must decode on its spike-code cache."""
    import torch

    tokenizer, model = servable.tokenizer, servable.model
    try:
        inputs = tokenizer.apply_chat_template(
            CHECK_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True, tokenize=True
        )
    except Exception as err:  # a template that does not render (jinja errors, missing variables)
        raise UserError(f"{flag} {servable.name}: its chat template does not render a user message ({err})") from None
    length = inputs["input_ids"].shape[-1]
    limit = getattr(servable.spec.config, "max_position_embeddings", None)
    if isinstance(limit, int) and length + 2 > limit:
        raise UserError(
            f"{flag} {servable.name}: a one-word chat is already {length} tokens with its template, and the model "
            f"holds {limit} positions (max_position_embeddings); nothing would fit an answer"
        )
    guard = getattr(model, "_spikelm_serve_guard", None)
    before = guard.calls if guard is not None else 0
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=_pad_id(tokenizer))
    except (TypeError, ValueError) as err:  # e.g. inputs the model does not take (token_type_ids)
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{flag} {servable.name}: generating from its chat template failed ({first})") from None
    if guard is not None and guard.calls < before + 2:  # the prompt's call and the second token's, both checked
        raise RuntimeError(f"the spike-code cache was not engaged ({guard.calls - before} forward calls checked)")


def _pad_id(tokenizer):
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def check_address(host: str, port: int) -> None:
    """Refuse in one line an address the server could not listen on (a port in use, a host not of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if port and err.errno is not None and "in use" in (err.strerror or ""):
                raise UserError(f"--port {port} is in use on {host}; pick another port with --port N") from None
            raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None


# ----------------------------------------------------------------------------------------------
# transformers' server, with the model pinned and the checks above
# ----------------------------------------------------------------------------------------------


def _model_manager_class():
    from transformers.cli.serving.model_manager import ModelManager

    class SpikeLMModelManager(ModelManager):
        """transformers' model manager pinned to one prepared model, loaded as spikelm loads it."""

        def __init__(self, servable: Servable):
            self.servable = servable
            super().__init__(device="cpu", dtype="auto", model_timeout=-1, force_model=servable.name)

        def _load_processor(self, model_id_and_revision, gguf_file=None):
            return self.servable.tokenizer

        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            if self.servable.model is None:  # after /reset: load it again
                self.servable.model = load_servable_model(self.servable)
            return self.servable.model

        def shutdown(self) -> None:
            super().shutdown()
            self.servable.model = None

        def get_gen_models(self, cache_dir=None) -> list[dict]:
            return [{"id": self.servable.name, "object": "model", "owned_by": "spikelm", "created": int(time.time())}]

    return SpikeLMModelManager


def _bad_request(message: str):
    from fastapi import HTTPException

    return HTTPException(status_code=400, detail=message)


def check_request(body: dict) -> None:
    """HTTP 400 naming the field for a number of new tokens, temperature or top_p that cannot generate."""
    for field in MAX_TOKEN_FIELDS:
        value = body.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise _bad_request(f"{field} must be a positive integer, got {value!r}")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0
    ):
        raise _bad_request(f"temperature must be a number >= 0, got {temperature!r}")
    top_p = body.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise _bad_request(f"top_p must be a number in (0, 1], got {top_p!r}")


def _checked(handler_class, spiking: bool):
    """``handler_class`` with :func:`check_request` before any work, and, for a spiking model, a request's
    ``generation_config`` refused if it asks for another cache than the spike-code cache."""

    class Checked(handler_class):
        async def handle_request(self, body, request_id):
            check_request(body)
            return await super().handle_request(body, request_id)

        def _build_generation_config(self, body, model_generation_config, use_cb=False):
            config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
            if spiking and config.cache_implementation not in (None, "dynamic"):
                raise _bad_request(
                    f"generation_config.cache_implementation {config.cache_implementation!r}: a spiking model keeps "
                    "its K and V as spike codes in its own cache; leave cache_implementation unset"
                )
            if spiking and config.use_cache is False:
                raise _bad_request(
                    "generation_config.use_cache false: a spiking model serves with its spike-code cache"
                )
            return config

    Checked.__name__ = Checked.__qualname__ = f"SpikeLM{handler_class.__name__}"
    return Checked


def build_app(servable: Servable):
    """transformers' FastAPI app for ``servable`` (chat completions, completions, responses, models, health)."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    manager = _model_manager_class()(servable)
    state = GenerationState(continuous_batching=False, compile=False)
    spiking = servable.spiking
    return build_server(
        manager,
        _checked(ChatCompletionHandler, spiking)(model_manager=manager, generation_state=state),
        completion_handler=_checked(CompletionHandler, spiking)(model_manager=manager, generation_state=state),
        response_handler=_checked(ResponseHandler, spiking)(model_manager=manager, generation_state=state),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state),
        generation_state=state,
    )


class Server:
    """A uvicorn server running :func:`build_app`'s app; :meth:`run` blocks (Ctrl-C stops it), :meth:`start` runs it
    in a thread (for tests and notebooks) and :meth:`stop` ends it."""

    def __init__(self, servable: Servable, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
        import uvicorn

        self.servable, self.host, self.port = servable, host, port
        self.server = uvicorn.Server(uvicorn.Config(build_app(servable), host=host, port=port, log_level=log_level))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def run(self) -> None:
        """Serve until Ctrl-C (or SIGTERM): uvicorn shuts down gracefully, then re-raises the signal, which ends the
        run here as a normal stop."""
        try:
            self.server.run()
        except KeyboardInterrupt:
            pass

    def start(self, timeout: float = 30.0) -> Server:
        self._thread = threading.Thread(target=self.server.run, name="spikelm-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the server did not stop")


def describe(servable: Servable) -> str:
    spec = servable.spec
    kind = spec.describe()
    if spec.kind == NATIVE and not servable.spiking:
        return f"{kind}, real-valued"
    return f"{kind}, K/V cached as spike codes" if servable.spiking else kind


__all__ = [
    "Servable",
    "Server",
    "build_app",
    "check_address",
    "check_request",
    "guard_spike_cache",
    "prepare",
    "serve_dependencies_missing",
]
