import pytest
import torch

from models import MAEST, MAESTConfig, get_maest
from models.registry import REGISTRY, build_config
from tests.reference_passt import reference_forward

TINY = dict(embed_dim=64, depth=2, num_heads=4)

RELEASED = {
    # name: (input_t, time positions, n_classes, distilled_type)
    "discogs-maest-5s-pw-129e": (312, 31, 400, "mean"),
    "discogs-maest-10s-pw-129e": (625, 62, 400, "mean"),
    "discogs-maest-10s-fs-129e": (625, 62, 400, "mean"),
    "discogs-maest-10s-dw-75e": (625, 62, 400, "mean"),
    "discogs-maest-20s-pw-129e": (1250, 125, 400, "mean"),
    "discogs-maest-30s-pw-129e": (1875, 187, 400, "mean"),
    "discogs-maest-30s-pw-73e-ts": (1875, 187, 400, "separated"),
    "discogs-maest-30s-pw-129e-519l": (1875, 187, 519, "mean"),
}


def tiny(**kw):
    torch.manual_seed(0)
    return MAEST(MAESTConfig(**{**TINY, "n_classes": 10, "input_t": 625, **kw})).eval()


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_model_state_dict_shapes(name):
    input_t, T, n_classes, distilled = RELEASED[name]
    cfg = build_config(name)
    assert (cfg.input_t, cfg.grid_t, cfg.grid_f, cfg.n_classes, cfg.distilled_type) == (input_t, T, 9, n_classes, distilled)
    with torch.device("meta"):
        sd = MAEST(cfg).state_dict()
    expected = {
        "cls_token": (1, 1, 768),
        "dist_token": (1, 1, 768),
        "new_pos_embed": (1, 2, 768),
        "freq_new_pos_embed": (1, 768, 9, 1),
        "time_new_pos_embed": (1, 768, 1, T),
        "patch_embed.proj.weight": (768, 1, 16, 16),
        "patch_embed.proj.bias": (768,),
        "blocks.11.attn.qkv.weight": (2304, 768),
        "blocks.11.attn.proj.weight": (768, 768),
        "blocks.11.mlp.fc1.weight": (3072, 768),
        "blocks.11.mlp.fc2.weight": (768, 3072),
        "blocks.0.norm1.weight": (768,),
        "blocks.0.norm2.bias": (768,),
        "norm.weight": (768,),
        "head.0.weight": (768,),
        "head.1.weight": (n_classes, 768),
        "head_dist.weight": (n_classes, 768),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert len([k for k in sd if k.startswith("blocks.")]) == 12 * 12
    assert len(sd) == 12 * 12 + 15  # 5 token/position, 2 patch, 2 norm, 4 head, 2 head_dist


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_models_forward_shapes_at_full_length(name):
    input_t, T, n_classes, _ = RELEASED[name]
    model = get_maest(name, **TINY)
    assert not model.training
    n_frames = 1 + input_t * 256 // 256  # the mel front-end's frame count for the clip's samples
    x = torch.randn(2, 96, n_frames)
    with torch.no_grad():
        assert model(x).shape == (2, n_classes)
        assert model.embeddings(x, block=1).shape == (2, 3, 64)
        # The full-length input uses (frames - 16) // 10 + 1 of the time positions.
        assert model.tokens(model._check_input(x)).shape[1] == 2 + 9 * ((n_frames - 16) // 10 + 1)


def test_vit_b_30s_matches_reference_implementation():
    """Full-size ViT-B 30 s, random weights: logits and block embeddings equal the upstream algorithm."""
    torch.manual_seed(0)
    model = get_maest("discogs-maest-30s-pw-129e")
    sd = model.state_dict()
    x = torch.randn(1, 1, 96, 1876)
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(sd, x, depth=12, num_heads=12)
        assert (ours - ref).abs().max() < 1e-4
        emb = model.embeddings(x, block=6)
        ref_emb = reference_forward(sd, x, depth=12, num_heads=12, transformer_block=6)
        assert emb.shape == (1, 3, 768)
        assert (emb.reshape(1, -1) - ref_emb).abs().max() < 1e-4


@pytest.mark.parametrize("n_frames", [625, 400, 16])
@pytest.mark.parametrize("block", [0, 1])
def test_tiny_matches_reference_for_full_and_shorter_inputs(n_frames, block):
    model = tiny()
    sd = model.state_dict()
    x = torch.randn(3, 1, 96, n_frames)
    with torch.no_grad():
        assert (model(x) - reference_forward(sd, x, 2, 4)).abs().max() < 1e-5
        ref = reference_forward(sd, x, 2, 4, transformer_block=block).reshape(3, 3, 64)
        assert (model.embeddings(x, block=block) - ref).abs().max() < 1e-5


def test_three_dim_and_four_dim_inputs_agree_and_input_is_not_mutated():
    model = tiny()
    x = torch.randn(2, 96, 300)
    x_copy = x.clone()
    with torch.no_grad():
        assert torch.equal(model(x), model(x.unsqueeze(1)))
    assert torch.equal(x, x_copy)


def test_fused_and_explicit_attention_agree():
    model = tiny()
    x = torch.randn(2, 96, 625)
    with torch.no_grad():
        fused = model(x)
        model.set_fused_attention(False)
        explicit = model(x)
    assert (fused - explicit).abs().max() < 1e-5
    assert not model.blocks[0].attn.fused


def test_attention_maps_are_row_stochastic():
    model = tiny()
    x = torch.randn(2, 96, 100)
    with torch.no_grad():
        attn = model.attention_maps(x, block=1)
    n = 2 + 9 * ((100 - 16) // 10 + 1)
    assert attn.shape == (2, 4, n, n)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 4, n), atol=1e-5)


def test_blocks_are_zero_based_and_select_different_embeddings():
    model = tiny()
    x = torch.randn(1, 96, 200)
    with torch.no_grad():
        e0, e1, last = model.embeddings(x, 0), model.embeddings(x, 1), model.embeddings(x, -1)
        h = model.tokens(model._check_input(x))
        h0 = model.blocks[0](h)
    assert torch.equal(e1, last)
    assert not torch.allclose(e0, e1)
    assert torch.allclose(e0[:, 0], h0[:, 0]) and torch.allclose(e0[:, 2], h0[:, 2:].mean(1))
    with pytest.raises(ValueError, match=r"block must be an integer in \[0, 1\]"):
        model.embeddings(x, block=2)


def test_patchout_only_in_training():
    model = tiny(s_patchout_t=10, s_patchout_f=2, u_patchout=20)
    x = torch.randn(2, 1, 96, 625)
    with torch.no_grad():
        n_t = (625 - 16) // 10 + 1
        model.train()
        assert model.tokens(x).shape[1] == 2 + (9 - 2) * (n_t - 10) - 20
        assert not torch.equal(model.tokens(x), model.tokens(x))  # random draws
        model.eval()
        assert model.tokens(x).shape[1] == 2 + 9 * n_t
        assert torch.equal(model(x), model(x))


def test_random_time_offset_for_short_training_inputs():
    model = tiny(drop_rate=0.0)
    model.train()
    x = torch.zeros(1, 1, 96, 100)
    seen = set()
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(20):
            tok = model.tokens(x)[0, 2]  # first patch: conv bias + freq[0] + time[offset]
            seen.add(round(float(tok.sum()), 4))
    assert len(seen) > 1
    model.eval()
    with torch.no_grad():
        a, b = model.tokens(x), model.tokens(x)
    assert torch.equal(a, b)


def test_inference_patchout_drops_rows_and_columns():
    model = tiny()
    x = torch.randn(1, 96, 625)
    n_t = (625 - 16) // 10 + 1
    with torch.no_grad():
        model.set_inference_patchout(f_indices=(0, 8))
        assert model.tokens(model._check_input(x)).shape[1] == 2 + 7 * n_t
        model.set_inference_patchout(t_interleaved=2)
        assert model.tokens(model._check_input(x)).shape[1] == 2 + 9 * len(range(0, n_t, 2))
        model.set_inference_patchout(f_interleaved=3, t_indices=(0, 1, 2))
        assert model.tokens(model._check_input(x)).shape[1] == 2 + 3 * (n_t - 3)
        assert model(x).shape == (1, 10)
    with pytest.raises(ValueError, match="out of range"):
        model.set_inference_patchout(f_indices=(9,))


def test_patchout_that_removes_everything_is_a_construction_error():
    with pytest.raises(ValueError, match=r"s_patchout_t=30 would remove every patch.*only 30 time columns"):
        get_maest("discogs-maest-5s-pw-129e", s_patchout_t=30, **TINY)
    assert get_maest("discogs-maest-5s-pw-129e", s_patchout_t=15, **TINY).config.s_patchout_t == 15
    with pytest.raises(ValueError, match="s_patchout_f=9 would remove every patch"):
        tiny(s_patchout_f=9)
    with pytest.raises(ValueError, match="u_patchout"):
        tiny(u_patchout=10_000)


def test_separated_heads():
    model = tiny(distilled_type="separated")
    x = torch.randn(2, 96, 300)
    with torch.no_grad():
        cls_logits, dist_logits = model.forward_heads(x)
        feats = model.forward_features(x)
        assert torch.allclose(cls_logits, model.head(feats[:, 0]))
        assert torch.allclose(dist_logits, model.head_dist(feats[:, 1]))
        assert torch.allclose(model(x), cls_logits)
    with pytest.raises(ValueError, match="distilled_type='separated'"):
        tiny().forward_heads(x)
    with pytest.raises(ValueError, match="distilled_type must be one of"):
        tiny(distilled_type="max")


def test_bad_inputs_have_clear_errors():
    model = tiny()
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        model([[0.0]])
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(0, 96, 100))
    with pytest.raises(ValueError, match="expects 96 mel bands, got 128"):
        model(torch.zeros(1, 128, 100))
    with pytest.raises(ValueError, match="transpose"):
        model(torch.zeros(1, 625, 96))
    with pytest.raises(ValueError, match=r"longer than this model's time embeddings allow \(at most 635 frames, 62 time patches"):
        model(torch.zeros(1, 96, 700))
    bad = torch.zeros(1, 96, 100)
    bad[0, 3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(bad)
    with pytest.raises(ValueError, match=r"at least 16 frames, got 10: pad short clips, e\.g\. models\.inference\.split_into_clips"):
        model(torch.zeros(1, 96, 10))
    with pytest.raises(ValueError, match=r"shape \(B, 96, T\)"):
        model(torch.zeros(96))


def test_get_maest_unknown_arch_and_option():
    with pytest.raises(KeyError, match="unknown MAEST architecture 'nope'.*discogs-maest-30s-pw-129e"):
        get_maest("nope")
    with pytest.raises(TypeError, match="unknown MAEST options \\['widht'\\]"):
        get_maest("maest-tiny", widht=3)


def test_registry_has_every_released_name_with_labels():
    for name, (_, _, n_classes, _) in RELEASED.items():
        labels = REGISTRY[name].labels()
        assert len(labels) == n_classes and "---" in labels[0]


def test_bf16_autocast_close_to_fp32():
    model = tiny()
    x = torch.randn(2, 96, 625)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1


def test_gradients_flow_in_training():
    model = tiny(s_patchout_t=5)
    model.train()
    loss = model(torch.randn(2, 96, 625)).sum()
    loss.backward()
    assert model.time_new_pos_embed.grad is not None and model.time_new_pos_embed.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
