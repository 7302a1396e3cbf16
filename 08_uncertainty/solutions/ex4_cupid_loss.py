"""Exercise 4 (medium): CUPID's loss and its two scores, from one plug-in forward.

Task. CUPID sits at one site of a frozen model. For every token it reads the site's feature f ∈ R^D and returns a
reconstruction f̂ (which replaces f, so the model runs on and gives logits ẑ instead of its own z) and a
log-variance s. Given those tensors, write the loss that trains the plug-in and the two scores it gives. Over the
answer tokens t (``mask``), with V the vocabulary size and y_t the target token:

    output_l1  = mean_t (1/V) Σ_v |ẑ_tv − z_tv|               keep the model's output unchanged
    feature_l1 = mean_t (1/D) Σ_d |f̂_td − f_td|               push f̂ away from f (enters with a minus sign)
    b_t        = Σ_v (softmax(ẑ_t)_v − 1[v = y_t])²           the Brier error of the prediction with f̂ inserted
    hetero     = mean_t ½ (b_t e^{−s_t} + s_t)                Gaussian NLL of the error: minimised at e^s = E[b]

    L = λ_out · (output_l1 − λ_pert · feature_l1) + λ_het · hetero

and, per token (every position, masked or not),

    aleatoric_t = e^{s_t}
    epistemic_t = (1/V) Σ_v |softmax(ẑ_t)_v − softmax(z_t)_v|

1. ``cupid_loss(...)``: L as a 0-d tensor, differentiable with respect to ``insert_logits``, ``reconstruction``
   and ``log_var`` (the grader compares the value and the three gradients with ``CUPID.loss``).
2. ``cupid_token_scores(base_logits, insert_logits, log_var)``: ``(aleatoric [B, T], epistemic [B, T])``
   (compared with ``CUPID.token_scores`` on a tiny TinyKimi).

Shapes: ``base_logits`` z and ``insert_logits`` ẑ [B, T, V]; ``features`` f and ``reconstruction`` f̂ [B, T, D];
``log_var`` s [B, T]; ``targets`` y [B, T] int64 in [0, V); ``mask`` [B, T] bool with at least one true entry.
Floats are fp32; do the math in fp32 and return fp32.

Hints. "mean_t" is over the masked tokens only: reduce over V (or D) first with ``.mean(-1)``, then select
``[mask]`` and take the mean. Positions outside the mask hold junk (the grader puts large values there) and
must not reach the loss. ``F.one_hot(targets, V)`` builds 1[v = y_t]. Do not call ``CUPID.loss`` or
``CUPID.token_scores``: they are what you are rebuilding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cupid_loss(
    base_logits: torch.Tensor,
    insert_logits: torch.Tensor,
    features: torch.Tensor,
    reconstruction: torch.Tensor,
    log_var: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    output_weight: float = 1.0,
    perturb_weight: float = 0.01,
    hetero_weight: float = 9e-3,
) -> torch.Tensor:
    """The CUPID loss L (0-d fp32 tensor) over the answer tokens ``mask`` (see the module docstring)."""
    output_l1 = (insert_logits.float() - base_logits.float()).abs().mean(-1)[mask].mean()  # per token, then tokens
    feature_l1 = (reconstruction.float() - features.float()).abs().mean(-1)[mask].mean()
    probs = insert_logits.float().softmax(-1)  # [B, T, V]
    onehot = F.one_hot(targets, probs.shape[-1]).float()  # [B, T, V]
    brier = (probs - onehot).pow(2).sum(-1)  # [B, T]
    hetero = (0.5 * (brier * torch.exp(-log_var) + log_var))[mask].mean()
    return output_weight * (output_l1 - perturb_weight * feature_l1) + hetero_weight * hetero


def cupid_token_scores(
    base_logits: torch.Tensor, insert_logits: torch.Tensor, log_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(aleatoric [B, T], epistemic [B, T])`` fp32 per token."""
    aleatoric = log_var.float().exp()
    epistemic = (insert_logits.float().softmax(-1) - base_logits.float().softmax(-1)).abs().mean(-1)
    return aleatoric, epistemic
