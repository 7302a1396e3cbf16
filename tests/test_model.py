"""nanokimi.model: TinyKimi composed from chapters 01–05 — config, forward/loss, caches, generate, QK-clip hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanokimi.data import TOKENIZER, collate, make_task
from nanokimi.model import PRESETS, TinyKimi, TinyKimiConfig
from nanokimi.moe.layer import MoE
from nanokimi.muon import QKClip
from nanokimi.testing import assert_close

# Small enough for the CPU, big enough to exercise every part: 3 KDA + 1 MoBA layer, MoE after layer 0, Block
# AttnRes with two blocks; MoBA's top-2 of 4-token blocks is sparse beyond 8 tokens.
TINY = dict(
    d_model=32,
    n_heads=2,
    n_layers=4,
    pattern="KKKM",
    d_ff=48,
    moe_d_ff=16,
    n_experts=4,
    moe_top_k=2,
    moba_block_size=4,
    moba_topk=2,
    attnres_block_size=4,
    kda_chunk_size=4,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_model(seed: int = 0, **overrides) -> TinyKimi:
    torch.manual_seed(seed)
    return TinyKimi(TinyKimiConfig.preset("cpu-tiny", **(TINY | overrides)))


def random_tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, TOKENIZER.vocab_size, (b, t), generator=gen)


# --- config ------------------------------------------------------------------------------------------------
def test_presets_and_layer_pattern():
    tiny = TinyKimiConfig.preset("cpu-tiny")
    assert tiny.layer_kinds == "KKKM" and tiny.backend == "reference" and tiny.vocab_size == TOKENIZER.vocab_size
    small = TinyKimiConfig.preset("gpu-small")
    assert small.backend == "triton" and small.layer_kinds == "KKKMKKKM"
    assert TinyKimiConfig(pattern="KKKM", n_layers=6).layer_kinds == "KKKMKK"
    assert [TinyKimiConfig(first_k_dense=1).ffn_kind(i) for i in range(3)] == ["dense", "moe", "moe"]
    assert TinyKimiConfig(ffn="dense").ffn_kind(3) == "dense"
    cfg = TinyKimiConfig.preset("cpu-tiny", d_model=64)
    assert TinyKimiConfig.from_dict(cfg.to_dict()) == cfg
    assert set(PRESETS) == {"cpu-tiny", "gpu-small"}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(pattern="KXM"), ValueError, "pattern: expected a non-empty string over"),
        (dict(pattern=""), ValueError, "pattern"),
        (dict(residual="highway"), ValueError, "residual: expected one of"),
        (dict(ffn="glu"), ValueError, "ffn: expected one of"),
        (dict(backend="cuda"), ValueError, "backend: expected one of"),
        (dict(d_model=30, n_heads=4), ValueError, "n_heads: expected a divisor of d_model=30"),
        (dict(n_layers=0), ValueError, "n_layers: expected a positive int"),
        (dict(moe_top_k=5, n_experts=4), ValueError, "moe_top_k: expected at most n_experts=4"),
        (dict(first_k_dense=-1), ValueError, "first_k_dense"),
        (dict(d_model=12.5), TypeError, "d_model"),
    ],
)
def test_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        TinyKimiConfig(**kwargs)


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match=r"preset: expected one of \['cpu-tiny', 'gpu-small'\], got 'huge'"):
        TinyKimiConfig.preset("huge")
    with pytest.raises(ValueError, match=r"unknown fields \['n_embd'\]"):
        TinyKimiConfig.from_dict({"n_embd": 3})
    with pytest.raises(TypeError, match="cfg: expected a TinyKimiConfig"):
        TinyKimi({"d_model": 32})


# --- forward, loss, gradients ------------------------------------------------------------------------------
def test_forward_shapes_and_masked_loss():
    model = tiny_model()
    batch = collate(make_task("add", digits=2).examples("train", 5, seed=0))
    logits, loss = model(batch.inputs, batch.targets, batch.loss_mask)
    assert logits.shape == (*batch.inputs.shape, TOKENIZER.vocab_size)
    want = F.cross_entropy(logits[batch.loss_mask], batch.targets[batch.loss_mask])
    assert torch.equal(loss, want)
    _, no_loss = model(batch.inputs)
    assert no_loss is None
    # untrained: close to the uniform distribution over the vocabulary
    assert abs(loss.item() - torch.log(torch.tensor(float(TOKENIZER.vocab_size)))) < 0.5


@pytest.mark.parametrize("residual", ["standard", "full", "block"])
@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_every_parameter_gets_a_gradient(residual, ffn):
    model = tiny_model(residual=residual, ffn=ffn, pattern="KMA", n_layers=3)
    tokens = random_tokens(2, 11)
    _, loss = model(tokens, random_tokens(2, 11, seed=1))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    # residual parameters exist exactly for the attention-residual modes
    has_queries = any(n.startswith("residual.queries") for n, _ in model.named_parameters())
    assert has_queries == (residual != "standard")


def test_tied_embeddings_share_one_matrix():
    tied, untied = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == TOKENIZER.vocab_size * 32


def test_describe_draws_the_layer_pattern():
    text = tiny_model().describe()
    assert "layer  0 [K] KDA" in text and "SwiGLU" in text
    assert "layer  3 [M] MoBA b=4 top2" in text and "MoE 4×top2+1 shared" in text
    assert "Block AttnRes" in text and f"total parameters: {tiny_model().num_parameters():,}" in text


def test_sublayer_input_rms_has_one_entry_per_sublayer():
    rms = tiny_model(residual="standard").sublayer_input_rms(random_tokens(2, 7))
    assert len(rms) == 8 and all(r > 0 for r in rms)


def test_bad_forward_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="tokens: expected an int64 tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tokens: expected an int64 tensor"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 65\)|tokens: expected ids in"):
        model(torch.full((1, 2), TOKENIZER.vocab_size))
    with pytest.raises(ValueError, match="caches: expected 4 dicts"):
        model(random_tokens(1, 3), caches=[{}])
    with pytest.raises(ValueError, match="targets: expected shape"):
        model(random_tokens(1, 3), random_tokens(1, 4))
    with pytest.raises(ValueError, match="loss_mask: selects no token"):
        model(random_tokens(1, 3), random_tokens(1, 3), torch.zeros(1, 3, dtype=torch.bool))


# --- caches and generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, length", [("KKKM", 8), ("KA", 19)])
def test_cached_pieces_equal_one_full_forward(pattern, length):
    """Prefill a few tokens, then decode one at a time: the logits equal the full forward's.

    MoBA decodes densely (the paper's choice), which equals its sparse prefill while the context fits in
    topk · block_size = 8 tokens; dense attention (A) and KDA match at any length.
    """
    model = tiny_model(pattern=pattern, n_layers=len(pattern)).eval()
    tokens = random_tokens(3, length)
    with torch.no_grad():
        full, _ = model(tokens)
        caches = model.new_caches()
        pieces = [model(tokens[:, :3], caches=caches)[0], model(tokens[:, 3:5], caches=caches)[0]]
        pieces += [model(tokens[:, t : t + 1], caches=caches)[0] for t in range(5, length)]
    assert_close("incremental logits", torch.cat(pieces, dim=1), full, rtol_rel=1e-5)


def _greedy_without_cache(model: TinyKimi, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def test_greedy_generate_matches_full_forward_argmax():
    model = tiny_model(pattern="KKA", n_layers=3).eval()
    prompts = [random_tokens(1, 6, seed=s)[0].tolist() for s in range(3)] + [random_tokens(1, 4, seed=9)[0].tolist()]
    out = model.generate(prompts, max_new_tokens=7, temperature=0.0, eos_id=None)
    for prompt, got in zip(prompts, out, strict=True):
        assert got == _greedy_without_cache(model, prompt, 7)


def test_sampling_is_reproducible_batch_independent_and_resumable():
    model = tiny_model(pattern="KKA", n_layers=3)
    prompts = [random_tokens(1, 5, seed=s)[0].tolist() for s in range(4)]
    a = model.generate(prompts, 8, temperature=1.0, top_k=20, seed=7, eos_id=None)
    assert a == model.generate(prompts, 8, temperature=1.0, top_k=20, seed=7, eos_id=None)
    assert a != model.generate(prompts, 8, temperature=1.0, top_k=20, seed=8, eos_id=None)
    assert len({tuple(r) for r in model.generate([prompts[0]] * 4, 8, seed=1, eos_id=None)}) > 1  # rows differ
    # per-row seeds: a row's sample does not depend on the rest of the batch ...
    alone = model.generate([prompts[2]], 8, temperature=1.0, top_k=20, seed=[123], eos_id=None)
    batched = model.generate(prompts, 8, temperature=1.0, top_k=20, seed=[5, 6, 123, 7], eos_id=None)
    assert batched[2] == alone[0]
    # ... and continuing a partial response gives the uninterrupted sample (partial rollouts)
    head = model.generate([prompts[2]], 3, temperature=1.0, top_k=20, seed=[123], eos_id=None)[0]
    tail = model.generate([prompts[2] + head], 5, temperature=1.0, top_k=20, seed=[123], eos_id=None)[0]
    assert head + tail == alone[0]
    assert model.training  # generate restores the training flag


def test_top_k_one_is_greedy_and_generation_stops_at_eos():
    model = tiny_model(pattern="KA", n_layers=2)
    prompts = [random_tokens(1, 5, seed=s)[0].tolist() for s in range(3)]
    greedy = model.generate(prompts, 5, temperature=0.0, eos_id=None)
    assert model.generate(prompts, 5, temperature=2.0, top_k=1, seed=3, eos_id=None) == greedy
    # Use the first greedy token of row 0 as the stop token: row 0 then stops at once, others where it appears.
    first = model.generate(prompts, 5, temperature=0.0, eos_id=None)
    stop_token = first[0][0]
    stopped = model.generate(prompts, 5, temperature=0.0, eos_id=stop_token)
    for row, full in zip(stopped, first, strict=True):
        if stop_token in full:
            assert row == full[: full.index(stop_token) + 1]
        else:
            assert row == full
    assert stopped[0] == [stop_token]


def test_moe_loads_are_counted_in_training_only():
    model = tiny_model()
    moe = model.moe_modules()
    assert len(moe) == 3 and all(isinstance(m, MoE) for m in moe)
    model.generate([random_tokens(1, 4)[0].tolist()], 3, temperature=0.0)
    assert all(int(m.tokens_per_expert.sum()) == 0 for m in moe)
    model(random_tokens(2, 5))
    assert all(int(m.tokens_per_expert.sum()) == 2 * 5 * 2 for m in moe)  # B·T tokens, top-2 each
    model.update_moe_biases()
    assert all(int(m.tokens_per_expert.sum()) == 0 for m in moe)


def test_bad_generate_arguments():
    model = tiny_model()
    good = [[TOKENIZER.bos_id, 5]]
    with pytest.raises(ValueError, match="prompts: expected at least one prompt"):
        model.generate([], 3)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate([[]], 3)
    with pytest.raises(ValueError, match="prompt 0 has ids outside"):
        model.generate([[1, 999]], 3)
    with pytest.raises(ValueError, match="max_new_tokens: expected a positive int"):
        model.generate(good, 0)
    with pytest.raises(ValueError, match="temperature: expected a finite number >= 0"):
        model.generate(good, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k: expected a positive int"):
        model.generate(good, 3, top_k=0)
    with pytest.raises(ValueError, match=r"seed: expected an int or one seed per prompt \(1\), got 2"):
        model.generate(good, 3, seed=[1, 2])


# --- QK-clip hooks -----------------------------------------------------------------------------------------
def test_max_logits_feed_qk_clip_by_module_name():
    model = tiny_model(pattern="KMA", n_layers=3)
    tokens = random_tokens(2, 12)
    assert model.max_logits() == {}  # not tracked by default
    model.track_max_logits(True)
    model(tokens)
    max_logits = model.max_logits()
    assert sorted(max_logits) == ["layers.1.mixer", "layers.2.mixer"]
    for name, per_head in max_logits.items():
        assert per_head.shape == (2,) and per_head.dtype == torch.float32 and torch.isfinite(per_head).all()
        assert model.get_submodule(name) is model.layers[int(name.split(".")[1])].mixer
    # Clip the last attention layer (its input does not depend on the clip) below its observed logits: after
    # QK-clip its heads' max logits are at most the threshold, and the other layer is untouched.
    last = "layers.2.mixer"
    tau = 0.5 * float(max_logits[last].min())
    clip = QKClip(threshold=tau)
    clip.observe(last, max_logits[last])
    clip.apply_(model)
    model(tokens)
    assert float(model.max_logits()[last].max()) <= tau * (1 + 1e-5)
    assert torch.equal(model.max_logits()["layers.1.mixer"], max_logits["layers.1.mixer"])


# --- backends ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run Triton only under the interpreter")
def test_triton_backend_matches_reference_under_the_interpreter():
    # Every chapter's kernel in one model: KDA, MoBA (T > top-k blocks), Block AttnRes with two blocks, MoE.
    small = dict(pattern="KM", n_layers=2, attnres_block_size=2, kda_chunk_size=16)  # KDA kernel: C ∈ {16, 32, 64}
    ref = tiny_model(**small)
    tri = tiny_model(**small, backend="triton")
    tri.load_state_dict(ref.state_dict())
    tokens = random_tokens(1, 10)
    targets = random_tokens(1, 10, seed=1)
    out_ref, loss_ref = ref(tokens, targets)
    out_tri, loss_tri = tri(tokens, targets)
    assert_close("logits triton vs reference", out_tri, out_ref, rtol_rel=1e-4)
    loss_ref.backward()
    loss_tri.backward()
    for (name, p_ref), (_, p_tri) in zip(ref.named_parameters(), tri.named_parameters(), strict=True):
        assert_close(f"grad {name}", p_tri.grad, p_ref.grad, rtol_rel=1e-3)


@pytest.mark.gpu
def test_triton_backend_matches_reference_on_gpu():
    torch.manual_seed(0)
    cfg = dict(d_model=256, n_heads=2, n_layers=4, moe_d_ff=128, d_ff=512, moba_block_size=64, moba_topk=2)
    ref = TinyKimi(TinyKimiConfig.preset("gpu-small", **cfg, backend="reference")).cuda()
    tri = TinyKimi(TinyKimiConfig.preset("gpu-small", **cfg, backend="triton")).cuda()
    tri.load_state_dict(ref.state_dict())
    tokens = random_tokens(4, 300).cuda()
    out_ref, _ = ref(tokens)
    out_tri, _ = tri(tokens)
    # fp32 weights; the kernels' dots (tf32x3 or exact fp32) and summation orders differ from torch's
    assert_close("gpu logits triton vs reference", out_tri, out_ref, rtol_rel=2e-2)
