import logging

import pytest
import torch
import torch.nn.functional as F

from models import MAEST, MAESTConfig, get_maest
from models.checkpoints import (
    CheckpointError,
    checkpoint_filter_fn,
    load_pretrained,
    resize_time_freq_embed,
    split_image_pos_embed,
)
from models.registry import download_weights, pretrained_path

TINY = dict(embed_dim=64, depth=2, num_heads=4)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return MAEST(MAESTConfig(**{**TINY, "n_classes": 10, "input_t": 625, **kw})).eval()


def lightning_ckpt(net, net_swa):
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}
    sd.update({f"net_swa.{k}": v for k, v in net_swa.state_dict().items()})
    return {"state_dict": sd, "epoch": 3, "pytorch-lightning_version": "2.0.0"}


def test_lightning_checkpoint_loads_swa_by_default_and_plain_on_request(tmp_path):
    net, swa = tiny(0), tiny(1)
    path = tmp_path / "upstream.ckpt"
    torch.save(lightning_ckpt(net, swa), path)
    x = torch.randn(2, 96, 300)
    with torch.no_grad():
        loaded_swa = get_maest("maest-tiny", checkpoint=path, n_classes=10, input_t=625)
        loaded_plain = get_maest("maest-tiny", checkpoint=path, checkpoint_swa_weights=False, n_classes=10, input_t=625)
        assert torch.equal(loaded_swa(x), swa(x))
        assert torch.equal(loaded_plain(x), net(x))
        assert not torch.equal(loaded_swa(x), loaded_plain(x))


def test_lightning_checkpoint_without_swa_weights_says_how_to_load_it(tmp_path):
    net = tiny()
    path = tmp_path / "noswa.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match="without SWA weights.*checkpoint_swa_weights=False"):
        get_maest("maest-tiny", checkpoint=path, n_classes=10, input_t=625)
    model = get_maest("maest-tiny", checkpoint=path, checkpoint_swa_weights=False, n_classes=10, input_t=625)
    assert torch.equal(model.cls_token, net.cls_token)


def test_bare_state_dict_round_trip(tmp_path):
    net = tiny()
    path = tmp_path / "bare.pt"
    torch.save(net.state_dict(), path)
    loaded = get_maest("maest-tiny", checkpoint=path, n_classes=10, input_t=625)
    x = torch.randn(1, 96, 625)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_strict_loading_names_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = tiny().state_dict()
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        get_maest("maest-tiny", checkpoint=path, n_classes=10, input_t=625)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): blocks.7.attn.qkv.weight" in msg


def test_checkpoint_of_another_model_says_which_option_to_set(tmp_path):
    path = tmp_path / "30s.pt"
    torch.save(tiny(input_t=1875).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"(?s)time_new_pos_embed: checkpoint \(1, 64, 1, 187\), model \(1, 64, 1, 62\).*input_t in \[1870, 1879\] \(a 30 s model"):
        get_maest("maest-tiny", checkpoint=path, n_classes=10, input_t=625)
    torch.save(tiny(n_classes=519).state_dict(), path)
    with pytest.raises(CheckpointError, match="n_classes=519"):
        get_maest("maest-tiny", checkpoint=path, n_classes=10, input_t=625)


def test_unreadable_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "trunc.ckpt"
    torch.save(tiny().state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*trunc.ckpt"):
        get_maest("maest-tiny", checkpoint=path, n_classes=10, input_t=625)
    with pytest.raises(FileNotFoundError, match="does-not-exist.ckpt"):
        get_maest("maest-tiny", checkpoint=tmp_path / "does-not-exist.ckpt")


class _Opaque:  # a non-tensor object, as Lightning hyper-parameters may pickle
    def __init__(self):
        self.lr = 1e-3


def test_checkpoint_with_python_objects_loads_its_weights_without_unpickling_them(tmp_path, caplog):
    net = tiny()
    ckpt = lightning_ckpt(net, net)
    ckpt["hyper_parameters"] = {"opaque": _Opaque()}
    path = tmp_path / "objects.ckpt"
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING):
        model = get_maest("maest-tiny", checkpoint=path, n_classes=10, input_t=625)
    assert "were not unpickled, kept as inert data: " in caplog.text and "test_checkpoints._Opaque" in caplog.text
    assert torch.equal(model.cls_token, net.cls_token)


def test_resize_time_freq_embed_is_pure_and_bicubic():
    emb = torch.randn(1, 8, 12, 1)
    same = resize_time_freq_embed(emb, (12, 1))
    assert same is emb
    out = resize_time_freq_embed(emb, (9, 1))
    assert out.shape == (1, 8, 9, 1)
    assert torch.allclose(out, F.interpolate(emb, size=(9, 1), mode="bicubic", align_corners=False))
    ramp = torch.linspace(0, 1, 99).reshape(1, 1, 1, 99)
    up = resize_time_freq_embed(ramp, (1, 187))
    assert torch.all(up[..., 1:] >= up[..., :-1] - 1e-6)  # a ramp stays monotone
    assert emb.shape == (1, 8, 12, 1)  # input untouched


def passt_state_dict(width=64, depth=2, n_classes=527):
    """A PaSST AudioSet layout: 128 mels x 998 frames, F=12, T=99, 527 classes (SPEC §5.3)."""
    torch.manual_seed(3)
    sd = MAEST(MAESTConfig(embed_dim=width, depth=depth, num_heads=4, n_classes=10, input_t=625)).state_dict()
    sd["freq_new_pos_embed"] = torch.randn(1, width, 12, 1)
    sd["time_new_pos_embed"] = torch.randn(1, width, 1, 99)
    sd["head.1.weight"] = torch.randn(n_classes, width)
    sd["head.1.bias"] = torch.randn(n_classes)
    sd["head_dist.weight"] = torch.randn(n_classes, width)
    sd["head_dist.bias"] = torch.randn(n_classes)
    return sd


def test_passt_weights_are_resized_and_their_head_dropped(tmp_path):
    sd = passt_state_dict()
    path = tmp_path / "passt.pt"
    torch.save(sd, path)
    model = tiny(input_t=1875, n_classes=400)
    head_before = model.head[1].weight.clone()
    load_pretrained(model, path, kind="passt")
    assert torch.allclose(model.freq_new_pos_embed, F.interpolate(sd["freq_new_pos_embed"], size=(9, 1), mode="bicubic", align_corners=False))
    assert torch.allclose(model.time_new_pos_embed, F.interpolate(sd["time_new_pos_embed"], size=(1, 187), mode="bicubic", align_corners=False))
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.head[0].weight, sd["head.0.weight"])  # the head's LayerNorm fits and is kept
    assert torch.equal(model.head[1].weight, head_before)  # the 527-class classifier is dropped
    with torch.no_grad():
        emb = model.embeddings(torch.randn(1, 96, 1876), block=1)
    assert emb.shape == (1, 3, 64) and torch.isfinite(emb).all()


def test_passt_weights_keep_a_head_of_the_same_size(tmp_path):
    sd = passt_state_dict(n_classes=10)
    out = checkpoint_filter_fn(sd, tiny(), kind="passt")
    assert torch.equal(out["head.1.weight"], sd["head.1.weight"])


def deit_state_dict(width=64, depth=2):
    """timm DeiT-B distilled 384 layout (SPEC §5.4), under "model"."""
    torch.manual_seed(4)
    sd = MAEST(MAESTConfig(embed_dim=width, depth=depth, num_heads=4, n_classes=10)).state_dict()
    for k in ("new_pos_embed", "freq_new_pos_embed", "time_new_pos_embed", "head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"):
        sd.pop(k)
    sd["pos_embed"] = torch.randn(1, 2 + 24 * 24, width)
    sd["patch_embed.proj.weight"] = torch.randn(width, 3, 16, 16)
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, width), torch.randn(1000)
    sd["head_dist.weight"], sd["head_dist.bias"] = torch.randn(1000, width), torch.randn(1000)
    return {"model": sd}


def test_deit_weights_become_frequency_and_time_embeddings(tmp_path):
    ckpt = deit_state_dict()
    path = tmp_path / "deit.pth"
    torch.save(ckpt, path)
    model = tiny(input_t=625)
    load_pretrained(model, path, kind="deit")
    pos = ckpt["model"]["pos_embed"]
    grid = pos[0, 2:].reshape(1, 24, 24, 64).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(9, 62), mode="bicubic", align_corners=False)
    assert torch.allclose(model.new_pos_embed, pos[:, :2])
    assert torch.allclose(model.freq_new_pos_embed, grid.mean(dim=3, keepdim=True), atol=1e-6)
    assert torch.allclose(model.time_new_pos_embed, grid.mean(dim=2, keepdim=True), atol=1e-6)
    assert torch.allclose(model.patch_embed.proj.weight, ckpt["model"]["patch_embed.proj.weight"].sum(1, keepdim=True))
    with torch.no_grad():
        assert model(torch.randn(2, 96, 625)).shape == (2, 10)


def test_split_image_pos_embed_shapes():
    tok, freq, time = split_image_pos_embed(torch.randn(1, 2 + 576, 768), (9, 187))
    assert tok.shape == (1, 2, 768) and freq.shape == (1, 768, 9, 1) and time.shape == (1, 768, 1, 187)


def test_pretrained_weights_missing_file_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        get_maest("discogs-maest-30s-pw-129e", pretrained=True, weights_directory=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "discogs-maest-30s-pw-129e-swa.ckpt") in msg
    assert "https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/discogs-maest-30s-pw-129e-swa.ckpt" in msg
    with pytest.raises(FileNotFoundError, match="passt-s-f128-p16-s10-ap.476-swa.pt"):
        pretrained_path("passt_s_swa_p16_128_ap476", tmp_path)


def test_pretrained_from_weights_dir_via_env(tmp_path, monkeypatch):
    torch.save(passt_state_dict(), tmp_path / "passt-s-f128-p16-s10-ap.476-swa.pt")
    monkeypatch.setenv("MAEST_WEIGHTS_DIR", str(tmp_path))
    model = get_maest("passt_s_swa_p16_128_ap476", pretrained=True, embed_dim=64, depth=2, num_heads=4, input_t=625)
    assert model.time_new_pos_embed.shape == (1, 64, 1, 62)


def test_download_weights_is_atomic_and_skips_present_files(tmp_path):
    source = tmp_path / "remote.pt"
    torch.save(tiny().state_dict(), source)
    target = download_weights("discogs-maest-10s-pw-129e", tmp_path / "w", url=source.as_uri())
    assert target == tmp_path / "w" / "discogs-maest-10s-pw-129e-swa.ckpt"
    assert target.read_bytes() == source.read_bytes()
    assert not list((tmp_path / "w").glob("*.part"))
    source.unlink()  # a second call does not fetch again
    assert download_weights("discogs-maest-10s-pw-129e", tmp_path / "w", url=source.as_uri()) == target


def test_released_weights_carry_the_discogs_style_names(tmp_path):
    small = dict(embed_dim=64, depth=2, num_heads=4)
    saved = get_maest("discogs-maest-10s-pw-129e", **small)
    torch.save({"state_dict": {f"net_swa.{k}": v for k, v in saved.state_dict().items()}}, tmp_path / "discogs-maest-10s-pw-129e-swa.ckpt")
    model = get_maest("discogs-maest-10s-pw-129e", pretrained=True, weights_directory=tmp_path, **small)
    assert len(model.labels) == 400 and model.labels[0] == "Blues---Boogie Woogie"  # what export_hf writes as id2label
    assert get_maest("discogs-maest-10s-pw-129e", pretrained=True, weights_directory=tmp_path, n_classes=7, reinit_heads=True, **small).labels is None


def test_read_checkpoint_maps_a_zip_file_and_reads_a_legacy_one_alike(tmp_path):
    from models.checkpoints import read_checkpoint

    obj = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 2}
    torch.save(obj, tmp_path / "zip.ckpt")
    torch.save(obj, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)  # torch cannot map this format
    for name in ("zip.ckpt", "legacy.ckpt"):
        got = read_checkpoint(tmp_path / name, mmap=True)
        assert got["epoch"] == 2 and torch.equal(got["state_dict"]["w"], obj["state_dict"]["w"]), name
