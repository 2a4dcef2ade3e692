"""CUDA checks: the same numbers on GPU as on CPU. CI has no GPU, so these skip there (stated reason)."""

import pytest
import torch

from models import MAEST, MAESTConfig, MelSpectrogram

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI and the development machines have none"),
]


def test_mel_front_end_on_gpu_equals_cpu():
    audio = torch.randn(3, 16000 * 4) * 0.1
    mel = MelSpectrogram()
    cpu = mel(audio)
    gpu = mel.to("cuda")(audio.cuda()).cpu()
    assert (cpu - gpu).abs().max() < 1e-3


def test_model_on_gpu_equals_cpu_and_patchout_draws_on_device():
    torch.manual_seed(0)
    model = MAEST(MAESTConfig(embed_dim=64, depth=2, num_heads=4, n_classes=10, input_t=625, s_patchout_t=10)).eval()
    x = torch.randn(4, 96, 625)
    with torch.no_grad():
        cpu = model(x)
        model = model.cuda()
        gpu = model(x.cuda()).cpu()
        assert (cpu - gpu).abs().max() < 1e-4
        model.train()
        assert model.tokens(x.cuda().unsqueeze(1)).device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.float16), torch.no_grad():
        model.eval()
        half = model(x.cuda()).float().cpu()
    assert (half - cpu).abs().max() < 0.05
