"""Exact equivalence transforms folded into the weights of a causal LM (QuaRot-style), before spiking.

Rotating the residual stream by an orthogonal ``Q`` spreads activation outliers over all channels, which is what a
per-token few-bit neuron (GIF, ternary) needs, and changes nothing in the real-valued model:

Where the norms, the readers and the writers of the residual stream are is the architecture's description
(:mod:`spikelm.conversion.architectures`):

1. Each pre norm's gain (``w``, or ``1 + w`` for Gemma) is folded into the linears that read its output (the
   attention's input projections, the FFN's first linears, the LM head after the final norm), and the gains are set
   to 1 (the stored weight to 1, or to 0 for ``1 + w``). A gain-free RMSNorm commutes with any orthogonal ``Q``
   (``rms(h Q) == rms(h)``).
2. With row vectors (``y = x W^T``, as ``nn.Linear``): ``E <- E Q`` for the token embeddings; every linear writing
   the residual ``W <- Q^T W`` and its bias ``b <- b Q``; every linear reading it (through a folded norm) and the
   LM head ``W <- W Q``, its bias unchanged (Qwen2's q/k/v biases). Tied embeddings are untied first: the LM head's
   weight becomes ``W diag(g) Q`` while the embedding becomes ``E Q``.

A description whose norms do not allow it (a LayerNorm, which subtracts the mean; a norm after a branch's output,
before the residual add, as Gemma-2/3's sandwich norms and OLMo-2's) is refused with the reason
(:meth:`~spikelm.conversion.architectures.Architecture.rotation_blocker`); ``spikify`` then says so in one line and
applies only the online rotation below, which is exact for any of them.

``Q`` is a randomised Hadamard matrix, ``diag(±1) H / sqrt(n)`` with ``H`` a Kronecker product of Sylvester (2^k)
and Paley (I: q + 1 for a prime q = 3 mod 4, e.g. 12, 20, 24; II: 2 (q + 1) for a prime q = 1 mod 4, e.g. 12, 28,
36) matrices; 576 = 12 * 12 * 4 and 1536 = 12 * 128 (SmolLM2) are covered. Where no construction exists for a
size, a random orthogonal matrix (QR of a seeded Gaussian) replaces it and the summary says so.

Optionally, the input of the FFN's last linear (the description's ``down_input`` site) is rotated online as well (it
is not in the residual stream, so nothing can absorb the rotation): ``W_down <- W_down H`` once and ``x <- x H`` at
run time by an :class:`OnlineHadamard` pre-hook, with ``H`` of the FFN size, rebuilt from ``(size, seed, kind)`` so
that nothing needs saving.

Optionally too, the attention's values and output are rotated per head (QuaRot's V-O rotation, SpinQuant's R2;
:func:`rotate_values`): with ``H`` an orthogonal randomised Hadamard of order ``head_dim``, each K/V head's rows of the
value projection (and its bias) become ``H W_v[g]`` (``H b_v[g]``) and each query head's input columns of the output
projection ``W_o[:, h] H^T``. Attention mixes the value rows of a head linearly (V is not position-rotated), so each
head's output turns by ``H`` and the output projection turns it back: exact in any family whose description names
the two linears (:class:`~spikelm.conversion.architectures.ValueOutput`) and puts nothing elementwise on V, whatever
its norms. Under grouped-query attention every query head reads its K/V head's values, all turned by the same ``H``.
Nothing runs online, so nothing is rebuilt on load: the saved weights hold it.

The transforms compute in float64 and cast back to each weight's dtype.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from ..nn import cpu_kernels, kernels
from .architectures import Architecture, describe

ROTATION_KINDS = ("hadamard", "random")
SYLVESTER_CHUNK = 256  # the largest power-of-two factor applied as one dense matrix (kron of Sylvesters is Sylvester)


# ----------------------------------------------------------------------------------------------
# Hadamard matrices.
# ----------------------------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q (chi(0) = 0)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx.view(1, -1) - idx.view(-1, 1)) % q]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4: ``I + S`` with S the skew conference matrix."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 mod 4, from the symmetric conference matrix C."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), minus)


def _construction(order: int) -> str | None:
    """Which single construction gives a Hadamard matrix of ``order``: "sylvester", "paley1", "paley2" or None."""
    if _is_power_of_two(order):
        return "sylvester"
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return "paley1"
    if order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _base_matrix(order: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of ``order`` from its single construction (see :func:`_construction`)."""
    construction = _construction(order)
    if construction == "paley1":
        return _paley1(order - 1)
    if construction == "paley2":
        return _paley2(order // 2 - 1)
    if construction is None:
        raise ValueError(f"no single Hadamard construction for order {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@cache
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Orders whose Kronecker product is a Hadamard matrix of order ``n`` (non-power-of-two factors first, small
    ones preferred; powers of two split into chunks of at most :data:`SYLVESTER_CHUNK`), or None if none is known.
    """
    if n < 1:
        return None
    if _is_power_of_two(n):
        chunks = []
        while n > SYLVESTER_CHUNK:
            chunks.append(SYLVESTER_CHUNK)
            n //= SYLVESTER_CHUNK
        return tuple(chunks + [n]) if n > 1 or not chunks else tuple(chunks)
    for order in range(3, n + 1):
        if n % order or _construction(order) in (None, "sylvester"):
            continue
        rest = hadamard_factors(n // order)
        if rest is not None:
            return (order,) + tuple(f for f in rest if f > 1)
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64, entries ±1, ``H H^T = n I``); ``ValueError`` if none is known."""
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard construction (Sylvester x Paley I/II) is known here for order {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    for order in factors:
        h = torch.kron(h, _base_matrix(order))
    return h


def random_orthogonal_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64) from the QR decomposition of a seeded Gaussian matrix."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).view(1, -1)  # sign fix: unique, Haar-distributed


def _random_signs(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> tuple[torch.Tensor, str]:
    """``(Q, kind_used)``: an orthogonal float64 (n, n) matrix. ``"hadamard"``: ``diag(signs) H / sqrt(n)`` with
    seeded random signs, or, where no Hadamard construction exists, the ``"random"`` one (``kind_used`` says so)."""
    if kind not in ROTATION_KINDS:
        raise ValueError(f"kind must be one of {ROTATION_KINDS}, got {kind!r}")
    if kind == "hadamard" and hadamard_factors(n) is not None:
        return _random_signs(n, seed).view(-1, 1) * hadamard_matrix(n) / n**0.5, "hadamard"
    return random_orthogonal_matrix(n, seed), "random"


# ----------------------------------------------------------------------------------------------
# Online rotation (the FFN's last linear input).
# ----------------------------------------------------------------------------------------------

# (kind, size, seed, device, dtype) -> (signs, [factor matrices]) or (None, [dense Q]): shared by every layer
_ONLINE_CACHE: dict = {}


def _online_operands(kind: str, size: int, seed: int, device, dtype):
    key = (kind, size, seed, str(device), dtype)
    if key not in _ONLINE_CACHE:
        if kind == "hadamard" and hadamard_factors(size) is not None:
            signs = _random_signs(size, seed).to(device=device, dtype=dtype)
            mats = [(_base_matrix(f) / f**0.5).to(device=device, dtype=dtype) for f in hadamard_factors(size)]
            _ONLINE_CACHE[key] = (signs, mats)
        else:
            _ONLINE_CACHE[key] = (None, [random_orthogonal_matrix(size, seed).to(device=device, dtype=dtype)])
    return _ONLINE_CACHE[key]


class OnlineHadamard(nn.Module):
    """``x -> x Q`` over the last dimension, ``Q = rotation_matrix(size, kind, seed)[0]``, without a dense matrix.

    The randomised Hadamard ``diag(signs) (H_1 ⊗ ... ⊗ H_k) / sqrt(size)`` is applied factor by factor on a
    (..., f_1, ..., f_k) view. It holds no parameters or buffers: the operands are rebuilt from
    ``(size, seed, kind)`` (and shared between layers), so a saved model only needs those three numbers.
    Computes in float64 and rounds once to ``x``'s dtype: its output is a neuron's input, and float32 factor products
    summed in an order that depends on the number of rows gave a token other bits in a prefill than in a decoding
    step (see :mod:`spikelm.nn.exact`). A decoding step's few rows (CPU float32, no autograd: the dispatcher's
    :func:`~spikelm.nn.kernels.rotation_kernel`) take one C++ call computing the same bits (its own loops summing
    in the float64 GEMM's order where :func:`~spikelm.nn.kernels.rotation_loops` checked it, else the same
    operations).
    """

    def __init__(self, size: int, seed: int = 0, kind: str = "hadamard"):
        super().__init__()
        if kind not in ROTATION_KINDS:
            raise ValueError(f"kind must be one of {ROTATION_KINDS}, got {kind!r}")
        self.size = size
        self.seed = seed
        self.requested_kind = kind
        self.kind = "hadamard" if kind == "hadamard" and hadamard_factors(size) is not None else "random"

    def extra_repr(self) -> str:
        return f"size={self.size}, seed={self.seed}, kind={self.kind!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"OnlineHadamard of size {self.size} got an input with {x.shape[-1]} features")
        dtype = torch.float64
        signs, mats = _online_operands(self.kind, self.size, self.seed, x.device, dtype)
        if signs is not None and kernels.rotation_kernel(x) == kernels.CPP:  # a decoding step: one C++ call
            return cpu_kernels.online_hadamard(x, signs, mats, hand=kernels.rotation_loops(x, signs, mats))
        y = x.to(dtype)
        if signs is None:
            return (y @ mats[0]).to(x.dtype)
        lead = y.shape[:-1]
        y = (y * signs).reshape(*lead, *(m.shape[0] for m in mats))
        last = y.dim() - 1
        for axis, mat in enumerate(mats, start=len(lead)):
            if axis == last:
                y = y @ mat
            elif axis == last - 1:  # the same products without moving the axis (a decoding step's time)
                y = torch.matmul(mat.t(), y)
            else:
                y = (y.movedim(axis, -1) @ mat).movedim(-1, axis)
        return y.reshape(*lead, self.size).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Folding into a model.
# ----------------------------------------------------------------------------------------------


def _blocks(model: nn.Module, architecture: Architecture) -> nn.ModuleList:
    return model.base_model.get_submodule(architecture.layers)


def _rotatable(model: nn.Module) -> Architecture:
    """The description of a causal LM whose residual stream can be rotated exactly; ``ValueError`` saying why not."""
    architecture = _described(model)
    reason = architecture.rotation_blocker()
    if reason is not None:
        raise ValueError(f"no residual-stream rotation for model_type {architecture.model_type!r}: {reason}")
    if model.get_output_embeddings() is None:
        raise ValueError(f"expected a {architecture.model_type} causal LM with an LM head, got {type(model).__name__}")
    return architecture


def _described(model: nn.Module) -> Architecture:
    try:
        return describe(model)
    except ValueError as err:
        raise ValueError(f"rotation needs a described architecture (a transformers causal LM): {err}") from None


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _norm_readers(model: nn.Module, architecture: Architecture) -> list[tuple[nn.Module, object, list[nn.Module]]]:
    """``(norm module, Norm, readers)`` for every pre norm of every block, then the final norm and the LM head."""
    pairs = []
    for layer in _blocks(model, architecture):
        for norm, site in architecture.pre_norm_sites():
            pairs.append((layer.get_submodule(norm.path), norm, [layer.get_submodule(r) for r in site.readers]))
    final = architecture.final_norm
    pairs.append((model.base_model.get_submodule(final.path), final, [model.get_output_embeddings()]))
    return pairs


@torch.no_grad()
def fold_rmsnorm_gains(model: nn.Module) -> int:
    """Fold every pre norm's gain (``w`` or ``1 + w``) into the linear layers reading the norm's output
    (``W <- W diag(g)``), set the gains to 1. Untie the embeddings first if they are tied (the LM head's weight
    changes). Returns the count."""
    architecture = _rotatable(model)
    if lm_head_is_tied(model):
        raise ValueError("the LM head is tied to the token embeddings: call untie_word_embeddings(model) first")
    pairs = _norm_readers(model, architecture)
    for module, norm, readers in pairs:
        gain = norm.effective_gain(module)
        for linear in readers:
            _set(linear.weight, linear.weight.double() * gain.view(1, -1))
        module.weight.fill_(norm.identity)
    return len(pairs)


def lm_head_is_tied(model: nn.Module) -> bool:
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return head is embeddings or head.data_ptr() == embeddings.data_ptr()


@torch.no_grad()
def untie_word_embeddings(model: nn.Module) -> bool:
    """Give the LM head its own copy of the embedding matrix and set ``tie_word_embeddings=False`` in the config
    (saved with the model, so it reloads untied). Returns True if the weights were tied."""
    if not lm_head_is_tied(model):
        return False
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(
        model.get_input_embeddings().weight.detach().clone(), requires_grad=head.weight.requires_grad
    )
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5.x keeps the mapping it ties on save/load
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return True


@torch.no_grad()
def rotate_residual_stream(
    model: nn.Module,
    kind: str = "hadamard",
    seed: int = 0,
    online_down_proj: bool = False,
    online_seed: int | None = None,
) -> dict:
    """Untie, fold the norm gains, and rotate the residual stream of a causal LM in place (its description must
    allow it: :meth:`~spikelm.conversion.architectures.Architecture.rotation_blocker`, else ``ValueError``).

    ``kind``: ``"hadamard"`` (randomised Hadamard, random fallback where no construction exists) or ``"random"``.
    ``online_down_proj``: also rotate the FFN's last linear input (see :func:`attach_online_down_proj_rotation`) with
    ``online_seed`` (default ``seed + 1``). The real-valued model computes the same function afterwards.

    Returns a summary (JSON-serialisable, for the saved config and model card): ``kind`` (used), ``requested_kind``,
    ``seed``, ``hidden_size``, ``fallback`` (None, or why the random matrix replaced Hadamard),
    ``untied_embeddings``, ``folded_norms`` and ``online_down_proj`` (None or that function's summary).
    """
    architecture = _rotatable(model)
    untied = untie_word_embeddings(model)
    folded = fold_rmsnorm_gains(model)
    embed = model.get_input_embeddings().weight
    hidden = embed.shape[1]
    q, used = rotation_matrix(hidden, kind, seed)
    q = q.to(embed.device)

    def read(linear):  # W <- W Q; a reader's bias lives in its output space, unchanged
        _set(linear.weight, linear.weight.double() @ q)

    def write(linear):  # W <- Q^T W, b <- b Q
        _set(linear.weight, q.t() @ linear.weight.double())
        if linear.bias is not None:
            _set(linear.bias, linear.bias.double() @ q)

    _set(embed, embed.double() @ q)
    for layer in _blocks(model, architecture):
        for _, site in architecture.pre_norm_sites():
            for reader in site.readers:
                read(layer.get_submodule(reader))
        for writer in architecture.writers:
            write(layer.get_submodule(writer))
    read(model.get_output_embeddings())
    summary = {
        "kind": used,
        "requested_kind": kind,
        "seed": seed,
        "hidden_size": hidden,
        "fallback": None if used == kind else f"no Hadamard construction for size {hidden}: random orthogonal",
        "untied_embeddings": untied,
        "folded_norms": folded,
        "online_down_proj": None,
    }
    if online_down_proj:
        summary["online_down_proj"] = attach_online_down_proj_rotation(
            model, seed=seed + 1 if online_seed is None else online_seed, kind=kind
        )
    return summary


def _rotate_input_pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.online_rotation(args[0]),) + tuple(args[1:])


@torch.no_grad()
def attach_online_down_proj_rotation(
    model: nn.Module, seed: int = 1, kind: str = "hadamard", fold: bool = True
) -> dict:
    """Rotate the input of every block's FFN last linear (the description's ``down_input`` site) online:
    ``x <- x H`` by an :class:`OnlineHadamard` submodule (``<linear>.online_rotation``) run as a forward pre-hook
    placed before any other pre-hook (so a spiking neuron hooked on the same input sees the rotated ``x``), and,
    with ``fold``, ``W_down <- W_down H``. ``ValueError`` for an architecture that does not offer it.

    Idempotent: a layer that already carries the same rotation is left as it is (no second fold, no second hook);
    a different one raises ``ValueError``. On loading a saved model whose weights already hold ``H``, call it with
    ``fold=False`` and the saved ``seed`` and ``kind``. Returns ``{"kind", "requested_kind", "seed", "size",
    "fallback", "layers_attached"}``.
    """
    architecture = _described(model)
    site = architecture.site("down_input")
    if not architecture.online_rotation or site is None:
        raise ValueError(f"the online rotation is not offered for model_type {architecture.model_type!r}")
    linears = [layer.get_submodule(site.host) for layer in _blocks(model, architecture)]
    if any(type(linear) is not nn.Linear for linear in linears):
        raise ValueError(f"the online rotation needs nn.Linear layers at {site.host!r} ({architecture.model_type})")
    attached = 0
    size = linears[0].in_features
    rotation = OnlineHadamard(size, seed, kind)
    dense = None
    for linear in linears:
        existing = getattr(linear, "online_rotation", None)
        if existing is not None:
            same = isinstance(existing, OnlineHadamard) and (existing.size, existing.seed, existing.kind) == (
                rotation.size,
                rotation.seed,
                rotation.kind,
            )
            if not same:
                raise ValueError(
                    f"{type(linear).__name__} already carries {existing!r}; refusing to stack {rotation!r} on it"
                )
        else:
            if fold:
                if dense is None:
                    dense, _ = rotation_matrix(size, kind, seed)
                    dense = dense.to(linear.weight.device)
                _set(linear.weight, linear.weight.double() @ dense)  # W H: y = (x H) (W H)^T = x W^T
            linear.online_rotation = OnlineHadamard(size, seed, kind)
            attached += 1
        if _rotate_input_pre_hook not in linear._forward_pre_hooks.values():
            linear.register_forward_pre_hook(_rotate_input_pre_hook, prepend=True)
    return {
        "kind": rotation.kind,
        "requested_kind": kind,
        "seed": seed,
        "size": size,
        "fallback": None if rotation.kind == kind else f"no Hadamard construction for size {size}: random orthogonal",
        "layers_attached": attached,
    }


# ----------------------------------------------------------------------------------------------
# Per-head value/output rotation.
# ----------------------------------------------------------------------------------------------


def _head_dim(attention: nn.Module, config) -> int | None:
    """The attention's head size: its own ``head_dim`` (every described family's attention has one), else the
    config's ``head_dim``, else hidden size / heads."""
    size = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    if size is None and getattr(config, "num_attention_heads", None):
        size = config.hidden_size // config.num_attention_heads
    return int(size) if size else None


def _value_heads(model: nn.Module, architecture: Architecture):
    """``(head_dim, [(value linear, first V row, K/V heads, output linear, query heads)] per block)``, the head
    counts from the linears' shapes; ``ValueError`` naming what does not fit."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    where = architecture.value_output
    blocks, head_dim = [], None
    for index, layer in enumerate(_blocks(model, architecture)):
        value, output = layer.get_submodule(where.value), layer.get_submodule(where.output)
        if type(value) is not nn.Linear or type(output) is not nn.Linear:
            raise ValueError(f"value_rotation needs nn.Linear layers at {where.value!r} and {where.output!r}")
        size = _head_dim(layer.get_submodule(architecture.attention), config)
        if head_dim not in (None, size):
            raise ValueError(f"value_rotation needs one head size in every block; block {index} has {size}")
        head_dim = size
        if not size or output.in_features % size:
            raise ValueError(
                f"value_rotation: block {index}'s attention output ({output.in_features}) is not whole heads of {size}"
            )
        query_heads = output.in_features // size
        rows = value.out_features - output.in_features if where.fused else value.out_features
        if rows <= 0 or rows % (2 * size if where.fused else size):
            raise ValueError(f"value_rotation: block {index}'s value rows ({rows}) are not whole heads of {size}")
        kv_heads = rows // (2 * size) if where.fused else rows // size
        if query_heads % kv_heads:
            raise ValueError(
                f"value_rotation: block {index} has {query_heads} query heads for {kv_heads} K/V heads (not a multiple)"
            )
        first = value.out_features - kv_heads * size  # V is the last rows of a fused projection
        blocks.append((value, first, kv_heads, output, query_heads))
    return head_dim, blocks


def value_rotation_blocker(model: nn.Module, architecture: Architecture | None = None) -> str | None:
    """Why the per-head value/output rotation cannot be folded exactly into ``model``, or None: its description
    (:meth:`~spikelm.conversion.architectures.Architecture.value_rotation_blocker`), its linears' shapes, or a head
    size with no Hadamard construction here (:func:`hadamard_factors`). ``architecture``: its description, if known
    already."""
    if architecture is None:
        try:
            architecture = describe(model)
        except ValueError as err:
            return str(err)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    reason = architecture.value_rotation_blocker(config)
    if reason is not None:
        return reason
    try:
        head_dim, _ = _value_heads(model, architecture)
    except ValueError as err:
        return str(err)
    if hadamard_factors(head_dim) is None:
        return f"no Hadamard matrix of order {head_dim} (its head_dim) is known here (Sylvester x Paley I/II)"
    return None


@torch.no_grad()
def rotate_values(model: nn.Module, seed: int = 2) -> dict:
    """Rotate every block's attention values and output per head, in place (module docstring): ``H`` the randomised
    Hadamard ``rotation_matrix(head_dim, "hadamard", seed)``, the same for every head and block; each K/V head's
    value rows ``W <- H W``, ``b <- H b``; each query head's output columns ``W <- W H^T``. The real-valued model
    computes the same function afterwards. ``ValueError`` with the reason where it cannot be folded exactly
    (:func:`value_rotation_blocker`). Returns ``{"kind", "seed", "head_dim", "layers", "kv_heads",
    "query_heads"}``."""
    architecture = _described(model)
    reason = value_rotation_blocker(model, architecture)
    if reason is not None:
        raise ValueError(f"no per-head value/output rotation for this model: {reason}")
    head_dim, blocks = _value_heads(model, architecture)
    h, _ = rotation_matrix(head_dim, "hadamard", seed)
    for value, first, kv_heads, output, query_heads in blocks:
        q = h.to(value.weight.device)
        rows = value.weight[first:].double().view(kv_heads, head_dim, -1)
        _set(value.weight[first:], (q @ rows).reshape(kv_heads * head_dim, -1))  # H W_v[g]
        if value.bias is not None:
            bias = value.bias[first:].double().view(kv_heads, head_dim, 1)
            _set(value.bias[first:], (q @ bias).reshape(-1))  # H b_v[g]
        q = h.to(output.weight.device)
        columns = output.weight.double().view(output.out_features, query_heads, head_dim)
        _set(output.weight, (columns @ q.t()).reshape(output.out_features, -1))  # W_o[:, h] H^T
    return {
        "kind": "hadamard",
        "seed": seed,
        "head_dim": head_dim,
        "layers": len(blocks),
        "kv_heads": blocks[0][2],
        "query_heads": blocks[0][4],
    }
