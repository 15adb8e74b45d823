"""The TrackMAE network: attention against a float64 reference, visible-only embedding against Conv3d on the full
clip, decoder token order against VideoMAE's masked formulation, FLOP count against the op counter, adapters."""
from __future__ import annotations

import pytest
import torch

from trackmae_stream.flop_counter import OpFlopCounter
from trackmae_stream.model import HeadSpec, TrackMAE, TrackMAEShape, forward_flops, resolve_backend
from trackmae_stream.model.adapters import StateDictError, from_native, load_model_state, to_native
from trackmae_stream.model.attention import attention
from trackmae_stream.model.vit import sinusoid_table


def small_shape(**kw) -> TrackMAEShape:
    base = dict(num_frames=6, input_size=20, patch_size=4, tubelet_size=2, embed_dim=24, depth=2, num_heads=3,
                decoder_dim=16, decoder_depth=2, decoder_heads=2,
                heads=(HeadSpec("pixel", 3 * 2 * 4 * 4), HeadSpec("track_motion", 8)))
    base.update(kw)
    return TrackMAEShape(**base)


def random_split(b: int, n: int, v: int, gen: torch.Generator):
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(b)])
    visible = order[:, :v].sort(dim=1).values
    masked = order[:, v:].sort(dim=1).values
    return visible, masked


def patches_of(video: torch.Tensor, idx: torch.Tensor, t: int, p: int) -> torch.Tensor:
    """Brute force: cut each token's tubelet out of (B, C, T, H, W) in Conv3d weight order (c, kt, kh, kw)."""
    b, c, T, H, W = video.shape
    wn = W // p
    hw = (H // p) * wn
    out = torch.empty(b, idx.shape[1], c * t * p * p, dtype=video.dtype)
    for bi in range(b):
        for j, n in enumerate(idx[bi].tolist()):
            ti, rem = divmod(n, hw)
            hi, wi = divmod(rem, wn)
            out[bi, j] = video[bi, :, ti * t:(ti + 1) * t, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p].reshape(-1)
    return out


def test_sdpa_attention_matches_float64_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 37, 5, 12, generator=gen) for _ in range(3))
    ref = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) / 12 ** 0.5, dim=-1)
    ref = torch.einsum("bhnm,bmhd->bnhd", ref, v.double())
    torch.testing.assert_close(attention(q, k, v, "sdpa").double(), ref, atol=1e-5, rtol=1e-5)


def test_attention_backend_resolution():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises((RuntimeError, ValueError)):
        resolve_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_backend("flash", "cpu")


@pytest.mark.gpu
def test_xformers_and_sdpa_agree_on_cuda():
    pytest.importorskip("xformers.ops")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((4, 1568, 6, 64), (4, 160, 12, 64)):
        q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        a = attention(q, k, v, "xformers").float()
        b = attention(q, k, v, "sdpa").float()
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    shape = small_shape()
    model = TrackMAE(shape).cuda()
    gen = torch.Generator().manual_seed(1)
    vis, msk = random_split(2, shape.num_tokens, 20, gen)
    patches = torch.randn(2, 20, shape.patch_dim, generator=gen).cuda()
    outs = {}
    for backend in ("xformers", "sdpa"):
        model.set_attention_backend(backend)
        with torch.no_grad():
            outs[backend] = model(patches, vis.cuda(), msk.cuda())
    for key in outs["sdpa"]:
        torch.testing.assert_close(outs["xformers"][key], outs["sdpa"][key], atol=1e-4, rtol=1e-4)


def test_visible_embedding_equals_conv3d_then_gather():
    shape = small_shape()
    model = TrackMAE(shape)
    gen = torch.Generator().manual_seed(2)
    video = torch.randn(3, 3, shape.num_frames, shape.input_size, shape.input_size, generator=gen)
    vis, _ = random_split(3, shape.num_tokens, 11, gen)
    enc = model.encoder
    full = enc.patch_embed(video)  # Conv3d over the whole clip
    ref = torch.gather(full, 1, vis[..., None].expand(-1, -1, full.shape[-1]))
    got = enc.patch_embed.embed_patches(patches_of(video, vis, shape.tubelet_size, shape.patch_size))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_forward_matches_videomae_boolean_mask_formulation():
    """Our index-based forward equals VideoMAE's: embed all, x[~mask], decoder on [visible; mask tokens]."""
    shape = small_shape()
    torch.manual_seed(0)
    model = TrackMAE(shape).eval()
    gen = torch.Generator().manual_seed(3)
    b, v = 2, 14
    video = torch.randn(b, 3, shape.num_frames, shape.input_size, shape.input_size, generator=gen)
    vis, msk = random_split(b, shape.num_tokens, v, gen)
    mask = torch.ones(b, shape.num_tokens, dtype=torch.bool)
    mask[torch.arange(b)[:, None], vis] = False
    with torch.no_grad():
        got = model(patches_of(video, vis, 2, 4), vis, msk)
        enc = model.encoder
        x = enc.patch_embed(video) + enc.pos_embed
        x_vis = enc.norm(enc.blocks(x[~mask].reshape(b, -1, x.shape[-1])))
        pos = model.decoder_pos_embed.expand(b, -1, -1)
        pv, pm = pos[~mask].reshape(b, -1, pos.shape[-1]), pos[mask].reshape(b, -1, pos.shape[-1])
        for name in ("pixel", "track_motion"):
            dec = model.decoders[name]
            full = torch.cat([dec.encoder_to_decoder(x_vis) + pv, model.mask_token + pm], dim=1)
            ref = model.heads[name](dec.norm(dec.blocks(full)[:, -pm.shape[1]:]))
            torch.testing.assert_close(got[name], ref, atol=1e-5, rtol=1e-5)
    assert got["pixel"].shape == (b, shape.num_tokens - v, 96)
    assert got["track_motion"].shape == (b, shape.num_tokens - v, 8)


def test_shared_decoder_mlp_heads_and_activations():
    """Targets naming one decoder share its blocks (one projection, one decoder); MLP heads with sigmoid / tanh
    equal the brute-force Linear -> GELU -> Linear -> activation on that decoder's output (MME's heads)."""
    heads = (HeadSpec("hog", 13, decoder="mme", head="mlp", hidden=11, activation="sigmoid"),
             HeadSpec("traj", 7, decoder="mme", head="mlp", hidden=11, activation="tanh"),
             HeadSpec("pixel", 96))
    shape = small_shape(heads=heads)
    torch.manual_seed(1)
    model = TrackMAE(shape).eval()
    assert list(model.decoders) == ["mme", "pixel"] and shape.groups == ["mme", "pixel"]
    gen = torch.Generator().manual_seed(2)
    vis, msk = random_split(3, shape.num_tokens, 11, gen)
    patches = torch.randn(3, 11, shape.patch_dim, generator=gen)
    with torch.no_grad():
        got = model(patches, vis, msk)
        latent = model.encoder(patches, vis)
        pos = model.decoder_pos_embed
        dec = model.decoders["mme"]
        full = torch.cat([dec.encoder_to_decoder(latent) + pos[vis], model.mask_token + pos[msk]], dim=1)
        feats = dec.norm(dec.blocks(full)[:, -msk.shape[1]:]).double()
        for name, act in (("hog", torch.sigmoid), ("traj", torch.tanh)):
            first, _, second = model.heads[name]
            hidden = torch.nn.functional.gelu(feats @ first.weight.double().T + first.bias.double())
            ref = act(hidden @ second.weight.double().T + second.bias.double())
            torch.testing.assert_close(got[name].double(), ref, atol=1e-5, rtol=1e-5)
    assert got["hog"].min() > 0 and got["traj"].abs().max() < 1
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith("decoders.")} == {"mme", "pixel"}


def test_sinusoid_table_matches_closed_form():
    table = sinusoid_table(11, 6).double()
    pos = torch.arange(11, dtype=torch.float64)[:, None]
    i = torch.arange(6)
    angle = pos / 10000 ** (2 * (i // 2) / 6)
    ref = torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle))
    torch.testing.assert_close(table, ref, atol=1e-6, rtol=0)


def test_forward_flops_matches_flop_counter():
    shape = small_shape(num_frames=4, input_size=24, embed_dim=32, decoder_dim=24, decoder_heads=3, num_heads=4)
    model = TrackMAE(shape)
    gen = torch.Generator().manual_seed(4)
    v = 9
    vis, msk = random_split(1, shape.num_tokens, v, gen)
    patches = torch.randn(1, v, shape.patch_dim, generator=gen)
    model.set_attention_backend("sdpa")
    with OpFlopCounter() as counter, torch.no_grad():
        model(patches, vis, msk)
    assert not counter.unknown, f"product-like ops without a formula: {dict(counter.unknown)}"
    assert forward_flops(shape, v) == pytest.approx(counter.total, rel=1e-6)


def test_activation_checkpointing_gives_same_gradients():
    shape = small_shape()
    torch.manual_seed(5)
    model = TrackMAE(shape)
    gen = torch.Generator().manual_seed(5)
    vis, msk = random_split(2, shape.num_tokens, 10, gen)
    patches = torch.randn(2, 10, shape.patch_dim, generator=gen)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(enabled)
        out = model(patches, vis, msk)
        (out["pixel"].square().mean() + out["track_motion"].abs().mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _perturbed_model(shape: TrackMAEShape, seed: int) -> TrackMAE:
    torch.manual_seed(seed)
    model = TrackMAE(shape).eval()
    with torch.no_grad():  # non-zero biases everywhere (xavier init leaves them zero)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def test_adapters_round_trip_and_key_bias_invariance():
    shape = small_shape()
    model = _perturbed_model(shape, 6)
    gen = torch.Generator().manual_seed(6)
    vis, msk = random_split(2, shape.num_tokens, 12, gen)
    patches = torch.randn(2, 12, shape.patch_dim, generator=gen)
    with torch.no_grad():
        ref = model(patches, vis, msk)
    # public TrackMAE format: exact round trip, with position tables present in the file
    public = from_native(model.state_dict(), "trackmae_public", num_tokens=shape.num_tokens)
    torch.testing.assert_close(public["encoder.pos_embed"][0], model.encoder.pos_embed, atol=0, rtol=0)
    torch.testing.assert_close(public["decoder_pos_embed"][0], model.decoder_pos_embed, atol=0, rtol=0)
    assert any(k.startswith("tracker_decoder.") for k in public) and "decoder.head.weight" in public
    other = TrackMAE(shape).eval()
    assert load_model_state(other, {"model": public}) == "trackmae_public"
    with torch.no_grad():
        got = other(patches, vis, msk)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=0, rtol=0)
    # VideoMAE format drops the key bias: attention ignores it, so outputs stay equal up to float error
    videomae = from_native(model.state_dict(), "videomae")
    assert any(k.endswith("attn.q_bias") for k in videomae) and not any(k.endswith("qkv.bias") for k in videomae)
    assert not any(k.startswith("motion_") for k in videomae)
    third = _perturbed_model(shape, 7)
    fresh = ("decoders.track_motion.", "heads.track_motion.")
    assert load_model_state(third, videomae, allow_missing_prefixes=fresh) == "videomae"
    with torch.no_grad():
        got = third(patches, vis, msk)
    torch.testing.assert_close(got["pixel"], ref["pixel"], atol=1e-5, rtol=1e-5)
    native, fmt = to_native(videomae)
    assert fmt == "videomae"
    k_part = native["encoder.blocks.0.attn.qkv.bias"].chunk(3)[1]
    assert torch.count_nonzero(k_part) == 0


def test_adapter_errors_list_keys():
    shape = small_shape()
    model = TrackMAE(shape)
    sd = model.state_dict()
    broken = {k: v for k, v in sd.items() if k != "encoder.norm.weight"}
    broken["decoders.pixel.extra.weight"] = torch.zeros(3)
    broken["mask_token"] = torch.zeros(1, 1, 99)
    with pytest.raises(StateDictError) as err:
        load_model_state(TrackMAE(shape), broken, source="ckpt.pt")
    msg = str(err.value)
    assert "ckpt.pt" in msg and "encoder.norm.weight" in msg and "decoders.pixel.extra.weight" in msg
    assert "mask_token: checkpoint (1, 1, 99)" in msg
    videomae = from_native(sd, "videomae")
    del videomae["encoder.blocks.1.attn.v_bias"]
    with pytest.raises(StateDictError, match="encoder.blocks.1.attn.q_bias has no matching"):
        to_native(videomae)


class _FormerLayout(torch.nn.Module):
    """The network as the project stored it before targets became plug-ins: a spatial decoder `decoder.*` with its
    projection `encoder_to_decoder` and its head `decoder.head`, a motion decoder `motion_decoder.*` with
    `motion_encoder_to_decoder` (built here from the same blocks, so its state dict has the former keys)."""

    def __init__(self, shape: TrackMAEShape, spatial_dim: int, motion_dim: int):
        super().__init__()
        from trackmae_stream.model.vit import Block, Blocks, VideoEncoder

        s = shape
        self.encoder = VideoEncoder(num_tokens=s.num_tokens, embed_dim=s.embed_dim, depth=s.depth,
                                    num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, patch_size=s.patch_size,
                                    tubelet_size=s.tubelet_size, drop_path=0.0)
        self.mask_token = torch.nn.Parameter(torch.randn(1, 1, s.decoder_dim))
        for prefix, out_dim in (("", spatial_dim), ("motion_", motion_dim)):
            decoder = torch.nn.Module()
            decoder.blocks = Blocks([Block(s.decoder_dim, s.decoder_heads) for _ in range(s.decoder_depth)])
            decoder.norm = torch.nn.LayerNorm(s.decoder_dim, eps=1e-6)
            decoder.head = torch.nn.Linear(s.decoder_dim, out_dim)
            setattr(self, f"{prefix}encoder_to_decoder", torch.nn.Linear(s.embed_dim, s.decoder_dim, bias=False))
            setattr(self, f"{prefix}decoder", decoder)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def forward(self, patches, vis, msk):
        latent = self.encoder(patches, vis)
        pos = sinusoid_table(self.encoder.pos_embed.shape[0], self.mask_token.shape[-1])
        out = {}
        for name, prefix in (("spatial", ""), ("motion", "motion_")):
            dec = getattr(self, f"{prefix}decoder")
            full = torch.cat([getattr(self, f"{prefix}encoder_to_decoder")(latent) + pos[vis],
                              self.mask_token + pos[msk]], dim=1)
            out[name] = dec.head(dec.norm(dec.blocks(full)[:, -msk.shape[1]:]))
        return out


@pytest.mark.parametrize("spatial", ["pixel", "clip"])
def test_a_checkpoint_of_the_former_layout_loads_and_predicts_the_same(spatial):
    """A checkpoint with the former keys (decoder.*, motion_decoder.*) loads strictly into the per-target layout:
    the spatial decoder becomes the pixel (or CLIP) target's, the motion decoder track_motion's, and the outputs are
    the former model's bit for bit."""
    shape = small_shape(heads=(HeadSpec(spatial, 5 if spatial == "clip" else 96), HeadSpec("track_motion", 8)))
    torch.manual_seed(11)
    former = _FormerLayout(shape, 5 if spatial == "clip" else 96, 8).eval()
    keys = set(former.state_dict())
    assert {"decoder.head.weight", "encoder_to_decoder.weight", "motion_decoder.blocks.0.attn.qkv.weight",
            "motion_encoder_to_decoder.weight"} <= keys
    model = TrackMAE(shape).eval()
    assert load_model_state(model, {"model": former.state_dict()}, source="old.pt") == "native"
    gen = torch.Generator().manual_seed(12)
    vis, msk = random_split(2, shape.num_tokens, 9, gen)
    patches = torch.randn(2, 9, shape.patch_dim, generator=gen)
    with torch.no_grad():
        ref, got = former(patches, vis, msk), model(patches, vis, msk)
    torch.testing.assert_close(got[spatial], ref["spatial"], atol=0, rtol=0)
    torch.testing.assert_close(got["track_motion"], ref["motion"], atol=0, rtol=0)
    # and back: the public layout of the per-target model holds the former names again
    public = from_native(model.state_dict(), "trackmae_public", num_tokens=shape.num_tokens)
    assert "decoder.head.weight" in public and "tracker_decoder.head.weight" in public
