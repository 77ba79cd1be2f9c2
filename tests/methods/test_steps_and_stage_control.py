"""The longest legal schedule (steps == num_train_timesteps) and the control hooks around
every heavy stage (UNet and VAE)."""
import pytest
import torch

from atelier.core.control import CallControl
from atelier.core.diffusion import inversion_schedule, set_timesteps
from atelier.core.errors import Cancelled, DeadlineExceeded
from atelier.inversion.editing import edit
from atelier.inversion.inversion import invert


class StopAfter(CallControl):
    """Cancels once ``evaluations`` UNet evaluations have run (a client cancel mid-run)."""

    def __init__(self, evaluations):
        super().__init__()
        self.limit = evaluations

    def is_cancelled(self):
        return self.forward_evaluations + self.backward_evaluations >= self.limit


class DeadlineDuringLastUNet(CallControl):
    """The deadline passes while the last UNet evaluation (of ``evaluations``) runs."""

    def __init__(self, evaluations):
        super().__init__()
        self.limit = evaluations

    def expired(self):
        return self.forward_evaluations >= self.limit


def test_a_schedule_of_all_training_timesteps_stays_inside_the_alphas_table(model):
    train_steps = model.scheduler_config["num_train_timesteps"]
    assert model.scheduler_config.get("steps_offset", 0) >= 1  # the case that overflowed
    scheduler = model.new_scheduler()
    timesteps = set_timesteps(scheduler, train_steps).tolist()
    assert timesteps == list(range(train_steps - 1, -1, -1))
    schedule = inversion_schedule(model, train_steps)
    assert [t for t, _, _ in schedule] == list(range(train_steps))
    # Other counts keep diffusers' own timesteps (the offset applies as before).
    for steps in (1, 50, 999):
        reference = model.new_scheduler()
        reference.set_timesteps(steps)
        assert set_timesteps(model.new_scheduler(), steps).tolist() == reference.timesteps.tolist()


def test_invert_and_edit_accept_all_training_timesteps(model, image):
    steps = model.scheduler_config["num_train_timesteps"]
    # Stopped after a few evaluations: the run is 1000 steps long, the point is that it starts
    # and steps (t = 1000 raised IndexError before its first/last step).
    with pytest.raises(Cancelled):
        invert(model, image, "a red circle", method="ddim", steps=steps, control=StopAfter(3))
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    control = StopAfter(3)
    with pytest.raises(Cancelled):
        edit(model, z_T, "a red circle", "a blue circle", steps, engine="p2p", control=control)
    assert control.forward_evaluations == 3


def test_a_deadline_that_passes_during_the_last_unet_call_skips_the_vae_decode(model, monkeypatch):
    decodes = []
    real_decode = model.decode_latents
    monkeypatch.setattr(model, "decode_latents", lambda latents: decodes.append(1) or real_decode(latents))
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    control = DeadlineDuringLastUNet(3)
    with pytest.raises(DeadlineExceeded):
        edit(model, z_T, "a red circle", "a blue circle", 3, engine="p2p", control=control)
    assert decodes == [] and control.forward_evaluations == 3


def test_vae_work_is_checked_and_counted(model, image, monkeypatch):
    encodes = []
    real_encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x: encodes.append(1) or real_encode(x))
    control = CallControl()
    out = invert(model, image, "a red circle", method="ddim", steps=2, control=control)
    edit(model, out.chain[-1:], "a red circle", "a blue circle", 2, engine="p2p", control=control)
    assert control.vae_evaluations == 2 and encodes == [1]
    cancelled = CallControl(is_cancelled=lambda: True)
    with pytest.raises(Cancelled):
        invert(model, image, "a red circle", method="ddim", steps=2, control=cancelled)
    assert encodes == [1], "the VAE encoded an image for a call already cancelled"


class DeadlineDuringVaeEncode(CallControl):
    """The deadline passes while the VAE encodes the image."""

    def expired(self):
        return self.vae_evaluations >= 1


def test_a_deadline_that_passes_during_the_vae_encode_runs_no_unet(model, image):
    control = DeadlineDuringVaeEncode()
    with pytest.raises(DeadlineExceeded):
        invert(model, image, "a red circle", method="spdinv", steps=3, control=control)
    assert control.vae_evaluations == 1 and control.forward_evaluations == control.backward_evaluations == 0
