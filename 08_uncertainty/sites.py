"""Where a plug-in reads, and may replace, the features of a frozen TinyKimi: forward hooks, no change to the model.

Insertion sites, indexed by ``layer`` (L = ``n_layers``):

    layer i < L:   v_i = layers[i].ffn(RMSNorm(h))   [B, T, D]   the last output layer i writes into the residual stream
    layer L:       f = final_norm(h_final)           [B, T, D]   the input of lm_head (logits = f Wᵀ)

Every later sublayer and the output read v_i through the residual stream (standard, Full or Block AttnRes alike),
so substituting a reconstruction v̂_i for v_i changes everything downstream of layer i and nothing upstream. A
PyTorch forward hook does the substitution: the base model's code and weights are untouched.

``frozen(model)`` is how a plug-in trains next to the base: eval mode (MoE layers count no loads, no randomness) and
``requires_grad = False`` on every base parameter (gradients flow *through* the base to the plug-in, never *into*
it); both are restored on exit, so the base leaves bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from nanokimi.checks import check_tensor
from nanokimi.model import TinyKimi

__all__ = ["check_base_model", "check_layer", "site_module", "run_with_sites", "frozen", "check_token_batch"]


def check_base_model(model: object, name: str = "base_model") -> TinyKimi:
    """The base must be a TinyKimi (the sites are its modules)."""
    if not isinstance(model, TinyKimi):
        raise TypeError(f"{name}: expected a nanokimi.model.TinyKimi, got {type(model).__name__}")
    return model


def check_layer(model: TinyKimi, layer: object, name: str = "layer") -> int:
    """An insertion site index in [0, n_layers] (n_layers = the final hidden state)."""
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{name}: expected an int in [0, {n_layers}], got {type(layer).__name__} {layer!r}")
    if not 0 <= layer <= n_layers:
        raise ValueError(
            f"{name}: expected an int in [0, {n_layers}] (layer i's FFN output, or {n_layers} = the final hidden "
            f"state), got {layer}"
        )
    return layer


def site_module(model: TinyKimi, layer: int) -> nn.Module:
    """The module whose output is the site's feature: ``layers[layer].ffn`` or, for ``layer = n_layers``, ``final_norm``."""
    check_layer(model, layer)
    return model.final_norm if layer == model.cfg.n_layers else model.layers[layer].ffn


def run_with_sites(
    model: TinyKimi,
    tokens: torch.Tensor,
    read: Sequence[int] = (),
    replace: tuple[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward of ``tokens`` [B, T]: logits [B, T, V] and the *original* features [B, T, D] at each ``read`` site.

    ``replace = (layer, fn)`` substitutes ``fn(v)`` for that site's output ``v``; its original ``v`` is also returned
    (under ``layer``). Hooks are removed afterwards, whatever happens.
    """
    features: dict[int, torch.Tensor] = {}
    handles = []

    def reader(layer: int):
        def hook(module, args, output):
            features[layer] = output

        return hook

    try:
        for layer in read:
            handles.append(site_module(model, layer).register_forward_hook(reader(layer)))
        if replace is not None:
            layer, fn = replace

            def substitute(module, args, output):
                features[layer] = output
                return fn(output)

            handles.append(site_module(model, layer).register_forward_hook(substitute))
        logits, _ = model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return logits, features


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for ``model`` inside the block; both restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def check_token_batch(inputs: object, mask: object, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids [N, T] (N ≥ 1) and an optional bool answer mask [N, T]: what every scorer of this chapter takes."""
    check_tensor("inputs", inputs, ndim=2, dtypes=(torch.long,))
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise ValueError(
            f"inputs: expected at least one example of at least one token, got shape {tuple(inputs.shape)}"
        )
    if bool(((inputs < 0) | (inputs >= vocab_size)).any()):
        raise ValueError(
            f"inputs: expected token ids in [0, {vocab_size}), got min {int(inputs.min())} max {int(inputs.max())}"
        )
    if mask is not None:
        check_tensor("mask", mask, shape=tuple(inputs.shape), dtypes=(torch.bool,))
    return inputs, mask
