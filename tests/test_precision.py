"""Inference precision (models.precision), the fused bf16 CPU block, FLOP counts and the fused AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import models.layers as layers
from models import MAEST, MAESTConfig
from models.precision import PRECISIONS, check_precision, forward_flops, prepare_for_inference, training_step_flops

TINY = MAESTConfig(n_classes=5, input_t=200, embed_dim=64, depth=2, num_heads=4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI and the development machines have none")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MAEST(TINY).eval()


def test_precisions_are_the_three_names():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'fp16'\), got 'half'"):
        check_precision("half", "cpu")


def test_bf16_is_the_same_model_in_bf16_close_to_fp32(model):
    x = torch.randn(3, 96, 150)  # fp32 input: cast inside
    with torch.no_grad():
        ref_logits, ref_emb = model(x), model.embeddings(x, block=[0, 1])
    fast = prepare_for_inference(copy.deepcopy(model), "bf16")
    assert isinstance(fast, MAEST) and not fast.training
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        logits, emb = fast(x), fast.embeddings(x, block=[0, 1])
        frames = fast.timestamp_embeddings(x, block=1)
    assert logits.dtype == torch.bfloat16 and logits.shape == (3, 5)
    assert (logits.float() - ref_logits).abs().max() < 0.05
    assert F.cosine_similarity(emb.float(), ref_emb, dim=-1).min() > 0.999
    assert frames.shape == (3, len(fast.column_times_ms(150)), 64)
    assert fast.block_indices("all") == [0, 1] and fast.n_classes == 5 and fast.embed_dim == 64
    assert set(fast.state_dict()) == set(model.state_dict())


def test_fp32_keeps_the_model_exact(model):
    x = torch.randn(2, 96, 150)
    with torch.no_grad():
        ref = model(x)
        out = prepare_for_inference(copy.deepcopy(model), "fp32")(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_fp16_needs_cuda_and_nan_input_is_still_refused(model):
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device; this model is on cpu: use 'bf16'"):
        prepare_for_inference(model, "fp16")
    fast = prepare_for_inference(model, "bf16")
    x = torch.randn(1, 96, 150)
    x[0, 3, 7] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or inf"):
        fast(x)
    with pytest.raises(TypeError, match="expects a models.MAEST"):
        prepare_for_inference(torch.nn.Linear(2, 2))


def test_the_fused_bf16_block_computes_the_plain_block(model, monkeypatch):
    """oneDNN's fused linear (bias, GELU, residual inside the matmul) equals the separate bf16 ops to bf16 rounding."""
    if not layers._ONEDNN_LINEAR:
        pytest.skip("this torch build has no oneDNN (mkldnn) linear: the plain path is the only one")
    block = copy.deepcopy(model.blocks[0]).to(torch.bfloat16)
    x = torch.randn(2, 50, 64, dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr(block, "_forward_fused", lambda x, f=block._forward_fused: calls.append(1) or f(x))
    with torch.no_grad():
        fused = block(x)
        assert calls == [1]
        monkeypatch.setattr(layers, "_ONEDNN_LINEAR", False)
        plain = block(x)
    assert calls == [1]
    torch.testing.assert_close(fused.float(), plain.float(), rtol=0.02, atol=0.05)


def test_the_fused_fp32_block_computes_the_plain_block(model, monkeypatch):
    """In fp32 the fused linear changes only the summation order: the plain block's output to 1e-5."""
    if not layers._ONEDNN_LINEAR:
        pytest.skip("this torch build has no oneDNN (mkldnn) linear: the plain path is the only one")
    block = copy.deepcopy(model.blocks[0]).eval()
    x = torch.randn(2, 50, 64)
    calls = []
    monkeypatch.setattr(block, "_forward_fused", lambda x, f=block._forward_fused: calls.append(1) or f(x))
    with torch.no_grad():
        fused = block(x)
        monkeypatch.setattr(layers, "_ONEDNN_LINEAR", False)
        plain = block(x)
    assert calls == [1]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_the_fused_path_is_left_out_where_gradients_flow(model):
    """Training and autograd in eval go through F.linear: the fused op has no backward."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.randn(2, 96, 150)
    bf16(x).float().sum().backward()  # eval mode, gradients on: the plain path
    assert all(p.grad is not None for p in bf16.blocks.parameters())
    with torch.no_grad():
        assert layers.use_fused_linear(torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=torch.float32)) == layers._ONEDNN_LINEAR
    w = torch.ones(2, requires_grad=True)
    assert not layers.use_fused_linear(torch.ones(2), w)  # a gradient is wanted
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layers.use_fused_linear(torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bfloat16))


def test_compile_compiles_each_block_in_place_keeping_the_api(model):
    fast = prepare_for_inference(model, "fp32", compile=True)
    assert fast is model
    assert all(block._compiled_call_impl is not None for block in fast.blocks)
    assert set(fast.state_dict()) == set(MAEST(TINY).state_dict())  # no _orig_mod prefixes


def test_flop_counts_match_the_issue():
    vit_b_30s = MAESTConfig(input_t=1875, embed_dim=768, depth=12, num_heads=12)
    assert forward_flops(vit_b_30s, 1876) == pytest.approx(0.3916e12, rel=1e-3)  # 1685 tokens
    vit_b_10s = MAESTConfig(input_t=625, s_patchout_t=30, embed_dim=768, depth=12, num_heads=12)
    assert training_step_flops(vit_b_10s, 625, 4) == pytest.approx(0.610e12, rel=1e-3)  # 9 x 31 + 2 tokens, x3


def test_adamw_is_fused_on_cpu_and_steps_like_the_loop():
    from helpers.module import adamw

    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = copy.deepcopy(a)
    fused = adamw([{"params": list(a.parameters())}], lr=1e-2, weight_decay=1e-4)
    loop = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=1e-4, foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(16, 8)
    for _ in range(3):
        for net, opt in ((a, fused), (b, loop)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_half_precisions_are_close_to_fp32(model, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    x = torch.randn(2, 96, 150)
    with torch.no_grad():
        ref = model(x)
        fast = prepare_for_inference(copy.deepcopy(model).cuda(), precision)
        out = fast(x.cuda()).float().cpu()
        emb = fast.embeddings(x.cuda(), block=1).float().cpu()
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.05
    assert F.cosine_similarity(emb, model.embeddings(x, block=1), dim=-1).min() > 0.999


@needs_cuda
def test_cuda_compiled_bf16_equals_eager(model):
    x = torch.randn(2, 96, 150, device="cuda")
    eager = prepare_for_inference(copy.deepcopy(model).cuda(), "fp16")
    compiled = prepare_for_inference(copy.deepcopy(model).cuda(), "fp16", compile=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).float(), eager(x).float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("gelu_input", [False, True])
def test_lean_autocast_linear_gives_autocasts_outputs_and_gradients_bit_for_bit(gelu_input):
    """models.layers.autocast_linear saves the fp32 weight (not a bf16 copy) and recomputes GELU: same arithmetic."""
    import torch.nn.functional as F

    from models.layers import autocast_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 32)
    # as in the MLP: fc1 and qkv/proj take a LayerNorm's fp32 output; fc2 (gelu_input) fc1's bf16 output
    x0 = torch.randn(3, 7, 48, dtype=torch.bfloat16 if gelu_input else torch.float32)
    grad = torch.randn(3, 7, 32)
    results = []
    for lean in (True, False):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = autocast_linear(x, layer, gelu_input=gelu_input) if lean else layer(F.gelu(x) if gelu_input else x)
        out.backward(grad.to(out.dtype))
        results.append((out, x.grad, layer.weight.grad, layer.bias.grad))
    for lean, plain in zip(*results):
        assert lean.dtype == plain.dtype and torch.equal(lean, plain)


@pytest.mark.parametrize("gelu_input", [False, True])
def test_fp32_cpu_training_linear_gives_f_linears_outputs_and_gradients(monkeypatch, gelu_input):
    """fp32 CPU training goes through _CastLinear (bias inside oneDNN's matmul, GELU recomputed): F.linear's values."""
    import torch.nn.functional as F

    from models import layers
    from models.layers import autocast_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 32)
    x0 = torch.randn(3, 7, 48)
    grad = torch.randn(3, 7, 32)
    results = []
    for lean in (True, False):
        monkeypatch.setattr(layers, "FP32_CPU_TRAINING_LINEAR", lean)
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out = autocast_linear(x, layer, gelu_input=gelu_input)
        # the lean path saves the input and the weight only (not GELU's output); the plain one is F.linear's
        assert (type(out.grad_fn).__name__ == "_CastLinearBackward") == (lean and layers._ONEDNN_LINEAR)
        out.backward(grad)
        results.append((out, x.grad, layer.weight.grad, layer.bias.grad))
    reference = layer(F.gelu(x0) if gelu_input else x0)
    torch.testing.assert_close(results[0][0], reference, rtol=1e-5, atol=1e-5)
    for lean, plain in zip(*results):
        assert lean.dtype == plain.dtype == torch.float32 and lean.shape == plain.shape
        torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference keeps its own path
        assert autocast_linear(x0, layer, gelu_input=gelu_input).grad_fn is None


def test_scratch_casts_reuse_one_buffer_per_shape_and_keep_gradients_apart(monkeypatch):
    """Weight casts and bf16 weight gradients go through reused buffers: same results, distinct gradients."""
    import torch.nn.functional as F

    from models import layers
    from models.layers import autocast_linear

    torch.manual_seed(0)
    first, second = torch.nn.Linear(48, 48), torch.nn.Linear(48, 48)  # one shape: one buffer each for weights and gradients
    x0 = torch.randn(2, 5, 48)
    results = []
    for scratch in (True, False):
        monkeypatch.setattr(layers, "SCRATCH_CASTS", scratch)
        monkeypatch.setattr(layers, "_SCRATCH", layers._ScratchBuffers())
        for layer in (first, second):
            layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = autocast_linear(F.gelu(autocast_linear(x0, first)), second)
        out.float().square().sum().backward()
        results.append((out, first.weight.grad, second.weight.grad, first.bias.grad))
        buffers = layers._SCRATCH.buffers
        if scratch:
            assert sorted(buffers) == [("grad", (48, 48), torch.bfloat16), ("weight", (48, 48), torch.bfloat16)]
            pointers = {b.untyped_storage().data_ptr() for b in buffers.values()}
            assert first.weight.grad.untyped_storage().data_ptr() not in pointers
            assert second.weight.grad.untyped_storage().data_ptr() not in pointers
        else:
            assert buffers == {}
    for with_scratch, without in zip(*results):
        assert torch.equal(with_scratch, without)
    assert not torch.equal(results[0][1], results[0][2])  # the two layers' gradients are their own


@pytest.mark.parametrize("autocast", [False, True])
def test_patch_embedding_training_path_equals_the_convolution(monkeypatch, autocast):
    """PatchEmbed trains through unfold + matmul (a faster weight gradient); outputs and gradients are the convolution's."""
    from models import layers
    from models.layers import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(16, 10, 10, 1, 32)
    x = torch.randn(2, 1, 96, 125)
    grad = torch.randn(2, 32, 9, 11)
    results = []
    for unfold in (True, False):
        monkeypatch.setattr(layers, "UNFOLD_PATCHES", unfold)
        embed.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = embed(x)
        out.backward(grad.to(out.dtype))
        results.append((out.float(), embed.proj.weight.grad, embed.proj.bias.grad))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for unfolded, conv in zip(*results):
        torch.testing.assert_close(unfolded, conv, **tol)
    assert results[0][0].shape == (2, 32, 9, 11)

    def no_unfold(*args):
        raise AssertionError("inference must use the convolution")

    monkeypatch.setattr(layers, "UNFOLD_PATCHES", True)
    monkeypatch.setattr(PatchEmbed, "_forward_unfolded", no_unfold)
    with torch.no_grad():
        torch.testing.assert_close(embed(x), embed.proj(x), rtol=0, atol=0)


def _attention_grads(attention, qkv, grad, matmul_backward, monkeypatch):
    monkeypatch.setattr(layers, "MATMUL_ATTENTION_BACKWARD", matmul_backward)
    x = qkv.detach().clone().requires_grad_()
    out, _ = attention.attend(x)
    out.backward(grad.to(out.dtype))
    return out, x.grad, out.grad_fn


@pytest.mark.parametrize("scratch", [True, False])
def test_matmul_attention_backward_is_sdpas_attention_and_at_least_as_accurate(monkeypatch, scratch):
    """CPU bf16 training: SDPA's forward (bit for bit) with a matmul backward as close to the fp32 gradient as SDPA's."""
    monkeypatch.setattr(layers, "SCRATCH_CASTS", scratch)
    monkeypatch.setattr(layers, "_SCRATCH", layers._ScratchBuffers())
    torch.manual_seed(0)
    attention = layers.Attention(64, 4).train()
    qkv = torch.randn(3, 37, 192).bfloat16()  # (B, N, 3 * C)
    grad = torch.randn(3, 37, 64)
    out_m, grad_m, node_m = _attention_grads(attention, qkv, grad, True, monkeypatch)
    out_s, grad_s, node_s = _attention_grads(attention, qkv, grad, False, monkeypatch)
    assert type(node_m).__name__ == "_CPUAttentionBackward" and type(node_s).__name__ != "_CPUAttentionBackward"
    assert torch.equal(out_m, out_s) and out_m.shape == (3, 37, 64) and grad_m.shape == grad_m.shape == (3, 37, 192)
    # the fp32 gradient from the same bf16-rounded inputs: each backward's own error
    _, reference, _ = _attention_grads(attention, qkv.float(), grad.bfloat16().float(), False, monkeypatch)
    error_m = (grad_m.float() - reference).abs().max().item()
    error_s = (grad_s.float() - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert error_m <= 0.01 * scale, (error_m, scale)
    assert error_m <= 1.1 * error_s + 1e-4, (error_m, error_s)
    pointers = {b.untyped_storage().data_ptr() for b in layers._SCRATCH.buffers.values()}
    assert (len(pointers) > 0) == scratch and grad_m.untyped_storage().data_ptr() not in pointers


def test_matmul_attention_backward_hands_back_its_own_gradient_for_one_token(monkeypatch):
    """B = 1, N = 1: the gradient's layout equals the scratch buffer's; it must still be a tensor of its own."""
    monkeypatch.setattr(layers, "_SCRATCH", layers._ScratchBuffers())
    attention = layers.Attention(64, 4).train()
    qkv = torch.randn(1, 1, 192).bfloat16()
    first = _attention_grads(attention, qkv, torch.randn(1, 1, 64), True, monkeypatch)[1]
    kept = first.clone()
    _attention_grads(attention, qkv, torch.randn(1, 1, 64), True, monkeypatch)  # reuses the scratch buffers
    assert torch.equal(first, kept)
    # one key: softmax is 1, so the gradients of q and k are zero and v's is dO
    assert torch.equal(first[..., :128], torch.zeros_like(first[..., :128]))


def test_matmul_attention_backward_runs_only_for_cpu_bf16_training(monkeypatch):
    q = torch.randn(2, 4, 37, 16).bfloat16().requires_grad_()
    assert layers.use_matmul_attention_backward(q, 0.0)
    assert not layers.use_matmul_attention_backward(q, 0.1)  # attention dropout: SDPA's
    assert not layers.use_matmul_attention_backward(q.float(), 0.0)  # fp32: SDPA's backward is as fast
    assert not layers.use_matmul_attention_backward(q.detach(), 0.0)
    with torch.no_grad():
        assert not layers.use_matmul_attention_backward(q, 0.0)
    monkeypatch.setattr(layers, "_MATMUL_ATTENTION_MAX_BYTES", 4 * 37 * 37 * 4 - 1)  # long inputs: SDPA's tiled kernel
    assert not layers.use_matmul_attention_backward(q, 0.0)
    monkeypatch.setattr(layers, "_MATMUL_ATTENTION_MAX_BYTES", 4 * 37 * 37 * 4)
    monkeypatch.setattr(layers, "MATMUL_ATTENTION_BACKWARD", False)
    assert not layers.use_matmul_attention_backward(q, 0.0)


def test_training_step_gradients_with_the_matmul_attention_backward(monkeypatch):
    """A whole bf16 autocast step of a tiny MAEST: every parameter's gradient as with SDPA's backward."""
    torch.manual_seed(0)
    model = MAEST(TINY.replace(s_patchout_t=3)).train()
    x = torch.randn(3, 1, 96, 200)
    y = (torch.rand(3, 5) < 0.3).float()
    grads = []
    for matmul_backward in (True, False):
        monkeypatch.setattr(layers, "MATMUL_ATTENTION_BACKWARD", matmul_backward)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same patchout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        scale = grads[1][name].abs().max().item() + 1e-6
        assert (grads[0][name] - grads[1][name]).abs().max().item() <= 0.05 * scale, name
    assert not torch.equal(grads[0]["blocks.0.attn.qkv.weight"], grads[1]["blocks.0.attn.qkv.weight"])  # the paths differ
