"""nanokimi.muon: Muon with Moonlight's update scaling, MuonClip's QK-clip, a symmetric Newton–Schulz Triton kernel."""

from nanokimi.muon.kernels import newton_schulz_triton
from nanokimi.muon.optimizer import Muon, MuonWithAdamW, muon_param_groups
from nanokimi.muon.qk_clip import QKClip, max_logit_per_head
from nanokimi.muon.reference import newton_schulz

__all__ = [
    "Muon",
    "MuonWithAdamW",
    "muon_param_groups",
    "QKClip",
    "max_logit_per_head",
    "newton_schulz",
    "newton_schulz_triton",
]
