"""`make toy-world` runs the VAE in two invocations (--stop-at-freeze, then again without it) so
the UNet can start on the frozen encoder; that must train exactly the VAE one run would."""
import pytest
import torch
from safetensors.torch import load_file

from atelier.toyworld import train_vae

TINY = ["--steps", "4", "--full-from", "0.5", "--freeze-encoder-at", "2", "--decoder-steps", "2",
        "--batch-size", "2"]


def _train(work, monkeypatch, *extra):
    monkeypatch.setattr(train_vae, "WORK_DIR", work)
    for name in ("PROGRESS_SCENES", "PSNR_SCENES", "LATENT_STD_SCENES"):  # measurements only
        monkeypatch.setattr(train_vae, name, 8)
    train_vae.main([*TINY, "--out", str(work / "vae"), *extra])


def _weights(folder):
    return load_file(folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise-equal runs need the same reduction order
    yield
    torch.set_num_threads(threads)


def test_stopping_at_the_encoder_freeze_and_resuming_trains_the_same_vae(tmp_path, monkeypatch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    _train(whole, monkeypatch)

    _train(split, monkeypatch, "--stop-at-freeze")
    assert (split / "vae-encoder" / "config.json").exists()
    assert not (split / "vae").exists()
    snapshot_mtime = (split / "vae-encoder" / "config.json").stat().st_mtime_ns
    _train(split, monkeypatch)

    # Resuming does not rewrite the snapshot: `make` would otherwise retrain the UNet.
    assert (split / "vae-encoder" / "config.json").stat().st_mtime_ns == snapshot_mtime
    for name in ("vae-encoder", "vae-phase1", "vae"):
        a, b = _weights(whole / name), _weights(split / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # The decoder went on training after the freeze; the encoder did not.
    encoder, final = _weights(split / "vae-encoder"), _weights(split / "vae")
    assert all(torch.equal(encoder[k], final[k]) for k in final if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(encoder[k], final[k]) for k in final if k.startswith("decoder."))
