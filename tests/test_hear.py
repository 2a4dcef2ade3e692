"""hear_maest (the HEAR 2021 API) and models.encoder (frame-level embeddings on a grid, the MARBLE-style encoder).

The published validator (``hearvalidator`` 2021.0.2, its ``hear-validator`` entry point) runs
in-process on a tiny checkpoint through ``hear_maest.validate``: it imports TensorFlow only for
``tf.Module`` and ``tf.device``, so where TensorFlow is not installed a stand-in module with those
two names takes its place while the validator is imported.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

import hear_maest
import hear_maest.validate
from models.checkpoints import MODEL_RECORD_KEY, CheckpointError, model_record
from models.encoder import MAESTEncoder, frame_embeddings, grid_clip_starts
from models.exchange.hf import export_hf
from models.inference import clip_starts, pad_centre, split_into_clips
from models.maest import MAEST, MAESTConfig
from models.mel import MelSpectrogram, normalize

CLIP = 62  # frames of the tiny model's clip (~1 s): 5 time columns, so the validator's 2 s sounds take 3 clips
TINY = dict(embed_dim=64, depth=2, num_heads=4, input_t=CLIP, n_classes=3)
FRAME_MS = 16.0


def tiny_net(seed: int = 0, **changes) -> MAEST:
    torch.manual_seed(seed)
    return MAEST(MAESTConfig(**{**TINY, **changes})).eval()


def lightning_file(path, plain: MAEST, swa: MAEST | None = None, arch: str | None = "maest-tiny"):
    """A Lightning-layout checkpoint (net. and optionally net_swa. keys), with this project's model record unless arch is None."""
    sd = {f"net.{k}": v for k, v in plain.state_dict().items()}
    if swa is not None:
        sd.update({f"net_swa.{k}": v for k, v in swa.state_dict().items()})
    obj = {"state_dict": sd}
    if arch is not None:
        obj[MODEL_RECORD_KEY] = model_record(arch, plain.config)
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path with a model record and no SWA weights, the network it holds)."""
    net = tiny_net()
    return lightning_file(tmp_path_factory.mktemp("hear") / "tiny.ckpt", net), net


def noise(n_sounds: int, n_samples: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n_sounds, n_samples, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_published_hear_validator_passes(tiny, capsys):
    # hearvalidator.validate.main (pip install --no-deps hearvalidator==2021.0.2) with TensorFlow, or where it is
    # not installed a stand-in with the two names the validator uses (tf.Module, tf.device), for this call only.
    with pytest.warns(UserWarning, match="less than or equal to 50ms"):  # our frames are 160 ms apart: a warning, not a failure
        hear_maest.validate.main(["--model", str(tiny[0]), "--device", "cpu"])
    assert "tensorflow" not in sys.modules or importlib.util.find_spec("tensorflow") is not None
    out = capsys.readouterr().out
    assert "Received embedding of shape: torch.Size([16, 12, 64])" in out  # 2 s: 12 frames of 160 ms over 3 clips
    assert "Interval between timestamps is 160.0ms" in out
    assert "Received embedding of shape: torch.Size([8, 192])" in out  # CLS, DIST and patch mean side by side
    assert out.rstrip().endswith("Looks good!")


def test_model_attributes_shapes_and_dtypes(tiny):
    model = hear_maest.load_model(str(tiny[0]))
    assert (model.sample_rate, model.scene_embedding_size, model.timestamp_embedding_size) == (16000, 192, 64)
    assert type(model.scene_embedding_size) is int and type(model.timestamp_embedding_size) is int
    assert model.block == 1 and not model.training  # default block 6 is past a 2-block model: its last block
    model.train()
    assert not model.training and not model.maest.training
    audio = noise(3, 24000)
    scene = hear_maest.get_scene_embeddings(audio, model)
    frames, stamps = hear_maest.get_timestamp_embeddings(audio, model)
    assert scene.shape == (3, 192) and scene.dtype == torch.float32
    assert frames.shape == (3, stamps.shape[1], 64) and frames.dtype == stamps.dtype == torch.float32
    assert torch.equal(stamps, stamps[:1].expand(3, -1))  # one grid for the whole batch
    assert torch.equal(stamps[0].double(), hear_maest.timestamps_ms(24000, model).float().double())
    assert hear_maest.load_model(str(tiny[0]), combine="mean").scene_embedding_size == 64
    assert hear_maest.load_model(str(tiny[0]), token="ct").scene_embedding_size == 128
    bf16 = hear_maest.get_scene_embeddings(audio, hear_maest.load_model(str(tiny[0]), precision="bf16"))
    assert bf16.dtype == torch.float32 and torch.nn.functional.cosine_similarity(bf16, scene).min() > 0.99
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        hear_maest.load_model(str(tiny[0]), precision="fp16")
    with pytest.raises(ValueError, match="distinct letters of 'cdt'"):
        hear_maest.load_model(str(tiny[0]), token="x")
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear_maest.get_scene_embeddings(audio[0], model)
    with pytest.raises(TypeError, match="floating-point"):
        hear_maest.get_timestamp_embeddings((audio * 32767).short(), model)


def test_scene_embedding_is_the_mean_of_the_clip_embeddings_with_no_audio_dropped(tiny):
    path, net = tiny
    n_samples = int(2.3 * CLIP * 256)  # a sound of 2.3 clips
    audio = noise(2, n_samples, seed=1)
    model = hear_maest.load_model(str(path), block=0, batch_size=2)  # 6 clips in chunks of 2
    got = hear_maest.get_scene_embeddings(audio, model)
    mel = MelSpectrogram()
    for i in range(2):
        m = mel(audio[i])
        assert list(clip_starts(m.shape[1], CLIP, CLIP)) == [0, CLIP, m.shape[1] - CLIP]  # the last clip ends at the end
        clips = normalize(split_into_clips(m, CLIP))
        with torch.no_grad():
            by_hand = net.embeddings(clips, block=0).flatten(1).mean(dim=0)  # (CLS, DIST, patch mean) of each clip
        torch.testing.assert_close(got[i], by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hear_maest.get_scene_embeddings(audio[1:], model)[0], got[1], atol=1e-5, rtol=1e-5)  # never across sounds
    mean_tokens = hear_maest.get_scene_embeddings(audio, hear_maest.load_model(str(path), block=0, combine="mean"))
    torch.testing.assert_close(mean_tokens, got.unflatten(1, (3, 64)).mean(dim=1), atol=1e-5, rtol=1e-5)


def test_grid_clip_starts():
    assert grid_clip_starts(126, 62, 10, 5)[0].tolist() == [0, 50, 70] and grid_clip_starts(126, 62, 10, 5)[1] == 132
    assert grid_clip_starts(112, 62, 10, 5)[0].tolist() == [0, 50] and grid_clip_starts(112, 62, 10, 5)[1] == 112
    assert grid_clip_starts(62, 62, 10, 5)[0].tolist() == [0] and grid_clip_starts(30, 62, 10, 5)[1] == 30
    starts, padded = grid_clip_starts(5000, 1875, 10, 186)  # the 30 s model: 186 columns, clips 1860 frames apart
    assert starts.tolist() == [0, 1860, 3130] and padded == 5005
    with pytest.raises(ValueError, match="total_frames must be an integer >= 1"):
        grid_clip_starts(0, 62, 10, 5)


@pytest.mark.parametrize("n_clips", [2.3, 3.0])
def test_timestamps_tile_the_sound_on_a_regular_grid_from_the_most_central_clip(tiny, n_clips):
    path, net = tiny
    n_samples = int(n_clips * CLIP * 256)
    audio = noise(2, n_samples, seed=2)
    frames, stamps = hear_maest.get_timestamp_embeddings(audio, hear_maest.load_model(str(path), block=0))
    mels = MelSpectrogram()(audio)
    total = mels.shape[-1]
    times = stamps[0].double().numpy()
    assert np.allclose(np.diff(times), 160.0) and times[0] == 7.5 * FRAME_MS
    assert (total - 1) * FRAME_MS - 160 < times[-1] <= (total - 1) * FRAME_MS  # the end is covered, nothing past it
    # By hand: clips at every multiple of 10 frames that the grid plan uses, the column taken from the
    # clip whose centre is nearest (end zero-padded by at most 9 frames).
    starts, padded = grid_clip_starts(total, CLIP, 10, 5)
    padded_mels = torch.nn.functional.pad(mels, (0, padded - total))
    for j, t in enumerate(times):
        owners = [(abs(t - (s + CLIP / 2) * FRAME_MS), s) for s in starts if s * FRAME_MS < t < (s + CLIP) * FRAME_MS]
        s = int(min(owners)[1])
        column = int(round((t / FRAME_MS - s - 7.5) / 10))
        with torch.no_grad():
            want = net.timestamp_embeddings(normalize(padded_mels[:, :, s : s + CLIP]), block=0)[:, column]
        torch.testing.assert_close(frames[:, j], want, atol=1e-5, rtol=1e-5)


def test_a_sound_shorter_than_a_clip_is_centre_padded_and_keeps_the_columns_on_its_signal(tiny):
    path, net = tiny
    audio = noise(1, 8000, seed=3)  # 0.5 s: 32 frames, padded by 15 before and 15 after
    model = hear_maest.load_model(str(path), block=0)
    frames, stamps = hear_maest.get_timestamp_embeddings(audio, model)
    assert stamps[0].tolist() == [40.0, 200.0, 360.0]  # column centres 2.5, 12.5, 22.5 frames into the signal
    clip = normalize(pad_centre(MelSpectrogram()(audio[0]).T, CLIP).T)[None]
    with torch.no_grad():
        torch.testing.assert_close(frames[0], net.timestamp_embeddings(clip, block=0)[0, 1:4], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hear_maest.get_scene_embeddings(audio, model)[0], net.embeddings(clip, block=0).flatten(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_samples", [1, 4096, 8000, 11000, 15000])
def test_a_short_sounds_first_timestamp_lies_in_its_first_160_ms_where_its_length_puts_it(tiny, n_samples):
    model = hear_maest.load_model(str(tiny[0]), block=0)
    times = hear_maest.api.timestamps_ms(n_samples, model).numpy()
    last_frame_ms = (MelSpectrogram().n_frames(n_samples) - 1) * FRAME_MS
    assert 0.0 <= times[0] < 160.0 and times[-1] <= last_frame_ms  # README: only centres within the sound
    assert np.allclose(np.diff(times), 160.0)


def test_block_option(tiny):
    path, net = tiny
    audio = noise(1, 20000, seed=4)
    b0, b1 = (hear_maest.get_timestamp_embeddings(audio, hear_maest.load_model(str(path), block=b))[0] for b in (0, 1))
    assert not torch.allclose(b0, b1)
    with pytest.raises(ValueError, match=r"block must be an integer in \[0, 1\]"):
        hear_maest.load_model(str(path), block=6)
    with pytest.raises(ValueError, match="one integer"):
        hear_maest.load_model(str(path), block=[0, 1])


def test_architecture_recognised_from_the_file(tmp_path, tiny):
    # This project's checkpoint: the record says everything; no SWA weights: the plain ones.
    assert hear_maest.load_model(str(tiny[0])).maest.config.input_t == CLIP
    # SWA weights when the file has them, the plain ones on request.
    plain, swa = tiny_net(1), tiny_net(2)
    both = lightning_file(tmp_path / "both.ckpt", plain, swa)
    assert torch.equal(hear_maest.load_model(str(both)).maest.cls_token, swa.cls_token)
    assert torch.equal(hear_maest.load_model(str(both), checkpoint_swa_weights=False).maest.cls_token, plain.cls_token)
    # A bare state dict (upstream's layout, no record) with a registry model's shapes: recognised, n_classes from its head.
    registry_shaped = MAEST(MAESTConfig(embed_dim=64, depth=2, num_heads=4, n_classes=7)).eval()
    torch.save(registry_shaped.state_dict(), tmp_path / "bare.pt")
    loaded = hear_maest.load_model(str(tmp_path / "bare.pt")).maest
    assert (loaded.config.input_t, loaded.config.n_classes, loaded.config.num_heads) == (625, 7, 4)  # maest-tiny
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, registry_shaped.blocks[1].mlp.fc2.weight)
    # An upstream-layout Lightning file of a registry network trained on other clips: the error names the arch to give.
    lightning_file(tmp_path / "odd.ckpt", plain, swa, arch=None)
    with pytest.raises(CheckpointError, match=r"records no architecture; its network is maest-tiny's \(.*\) but trained on clips of another "
                                              r"length, .*: load_model\(path, arch='maest-tiny', input_t=<the frames per clip"):
        hear_maest.load_model(str(tmp_path / "odd.ckpt"))
    named = hear_maest.load_model(str(tmp_path / "odd.ckpt"), arch="maest-tiny", input_t=CLIP).maest  # n_classes: the head's
    assert torch.equal(named.cls_token, swa.cls_token) and named.config.n_classes == 3
    # Shapes of no registry network at all: name one, with the fields that differ.
    torch.save(MAEST(MAESTConfig(embed_dim=32, depth=1, num_heads=2, n_classes=3)).state_dict(), tmp_path / "odder.pt")
    with pytest.raises(CheckpointError, match=r"fit no registry model: name it, e.g. load_model\(path, arch=<a registry name>, input_t=\.\.\."):
        hear_maest.load_model(str(tmp_path / "odder.pt"))
    assert hear_maest.load_model(str(tmp_path / "odd.ckpt"), input_t=CLIP).maest.config.n_classes == 3  # recognised once input_t is given
    # A Hugging Face directory: its config.json shapes the model.
    export_hf(plain, tmp_path / "hf", feature_extractor=False)
    assert torch.allclose(hear_maest.load_model(str(tmp_path / "hf")).maest.cls_token, plain.cls_token)


def test_empty_path_reads_the_released_model_and_says_which_file_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MAEST_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"discogs-maest-30s-pw-129e.*not found at .*discogs-maest-30s-pw-129e-swa\.ckpt\. Download https://"):
        hear_maest.load_model()


def test_encoder_gives_every_block_of_one_pass_with_the_hear_times(tiny):
    path, net = tiny
    audio = noise(2, int(2.3 * CLIP * 256), seed=5)
    encoder = MAESTEncoder(net, batch_size=3)
    out, times = encoder.forward_with_times(audio)
    assert out.shape == (2, 2, len(times), 64) and encoder.n_layers == 2 and encoder.embed_dim == 64
    assert torch.equal(encoder(audio), out) and np.array_equal(encoder.times_ms(audio.shape[1]), times)
    mels = MelSpectrogram()(audio)
    with torch.no_grad():
        for block in (0, 1):
            torch.testing.assert_close(out[:, block], frame_embeddings(net, mels, block)[0], atol=1e-5, rtol=1e-5)
    hear_frames, stamps = hear_maest.get_timestamp_embeddings(audio, hear_maest.load_model(str(path), block=1))
    torch.testing.assert_close(out[:, 1], hear_frames, atol=1e-5, rtol=1e-5)
    assert np.allclose(stamps[0].numpy(), times)
    assert MAESTEncoder(net, block=[1]).n_layers == 1
    with pytest.raises(ValueError, match=r"waveforms \(B, samples\)"):
        encoder(audio[0])
    net.set_inference_patchout(t_interleaved=2)
    try:
        with pytest.raises(ValueError, match="need every time column"):
            MAESTEncoder(net)
    finally:
        net.set_inference_patchout()


def test_a_nan_in_one_sound_is_named_by_its_index(tiny):
    model = hear_maest.load_model(str(tiny[0]))
    audio = noise(3, 16000)
    audio[1, 100] = float("nan")
    with pytest.raises(ValueError, match=r"hear_maest got NaN or inf samples in sound 1: "):
        hear_maest.get_scene_embeddings(audio, model)
    with pytest.raises(ValueError, match=r"looks like \(samples, channels\)"):  # stereo as soundfile.read returns it
        hear_maest.get_timestamp_embeddings(noise(1, 16000).T.repeat(1, 2).contiguous(), model)
