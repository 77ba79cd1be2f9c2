"""DDIM sampling, CFG and DDIM inversion against diffusers' own pipeline and schedulers."""

import time

import numpy as np
import pytest
import torch

from atelier.core import diffusion
from atelier.core.control import CallControl
from atelier.core.errors import Cancelled, DeadlineExceeded
from atelier.inversion.inversion import invert

pytestmark = pytest.mark.timeout(120)
PROMPT = "a red circle on a striped background"


class UNetCallCounter:
    """Counts real UNet forward calls, independently of CallControl's bookkeeping."""

    def __init__(self, unet):
        self.calls = 0
        self._handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_step_formulas_match_diffusers_schedulers(model):
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 1, 4, 8, 8, generator=generator)
    for t in (int(scheduler.timesteps[0]), int(scheduler.timesteps[-1])):  # incl. the final_alpha_cumprod step
        alpha_t, alpha_prev = diffusion.step_alphas(scheduler, t)
        expected = scheduler.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(diffusion.ddim_step(x, eps, alpha_t, alpha_prev), expected, rtol=0, atol=1e-5)
        # The inversion step is the same map read backwards, and equals C1 z + C2 eps.
        z_t = diffusion.ddim_inversion_step(x, eps, alpha_prev, alpha_t)
        c1, c2 = diffusion.inversion_coefficients(alpha_prev, alpha_t)
        torch.testing.assert_close(z_t, c1 * x + c2 * eps, rtol=0, atol=1e-5)
        torch.testing.assert_close(diffusion.ddim_step(z_t, eps, alpha_t, alpha_prev), x, rtol=0, atol=1e-4)


def test_sampling_equals_stable_diffusion_pipeline(model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.new_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = pipe(PROMPT, num_inference_steps=6, guidance_scale=7.5, latents=z_T.clone(), output_type="latent").images
    expected_np = pipe(PROMPT, num_inference_steps=6, guidance_scale=7.5, latents=z_T.clone(), output_type="np").images

    control = CallControl()
    ours = diffusion.sample(model, z_T, model.encode_prompt([PROMPT]), model.encode_prompt([""]), 6, 7.5, control)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    ours_np = model.decode_latents(ours).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours_np, expected_np, rtol=0, atol=1e-4)
    assert control.forward_evaluations == 6  # uncond + cond batched: one evaluation per step
    assert control.backward_evaluations == 0


def test_guided_eps_batches_branches_in_one_call(model):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    cond = model.encode_prompt(["a red circle", "a blue square"])
    uncond = model.encode_prompt([""])
    control = CallControl()
    with UNetCallCounter(model.unet) as counter:
        batched = diffusion.guided_eps(model, x, 501, cond, uncond, 5.0, control)
    assert counter.calls == 1 and control.forward_evaluations == 1
    for branch in range(2):
        with torch.no_grad():
            eps_u = diffusion.unet_eps(model, x[branch:branch + 1], 501, uncond, control)
            eps_c = diffusion.unet_eps(model, x[branch:branch + 1], 501, cond[branch:branch + 1], control)
        # Batched and single GEMMs differ in the last float32 bits (~1e-6); guidance 5 multiplies
        # that by up to 11. A wrong combination would be off by O(1).
        torch.testing.assert_close(batched[branch:branch + 1], eps_u + 5.0 * (eps_c - eps_u), rtol=0, atol=5e-5)
    # guidance 1 is the conditional branch alone, one batch-B call
    with UNetCallCounter(model.unet) as counter:
        plain = diffusion.guided_eps(model, x, 501, cond, uncond, 1.0, control)
    assert counter.calls == 1
    torch.testing.assert_close(plain, diffusion.unet_eps(model, x, 501, cond, control), rtol=0, atol=1e-5)


@torch.no_grad()
def test_ddim_inversion_matches_diffusers_inverse_scheduler(model, image):
    """Drive diffusers' DDIMInverseScheduler by hand and compare the whole chain.

    Offset convention: in diffusers >= 0.20 DDIMInverseScheduler.step(eps, t, z) moves z from
    t - 1000/steps (alphas_cumprod[0] below zero, set_alpha_to_one=False) up to t, with eps
    evaluated at t on the lower-noise latent. That is exactly the reference ``next_step``
    (P2P/null-text/SPDInv), and its timesteps [1, 21, ...] are DDIMScheduler's reversed.
    Older releases stepped from t up to t + 1000/steps, one step shifted; the assertion on
    the timesteps below pins the convention this comparison relies on.
    """
    from diffusers import DDIMInverseScheduler

    steps = 6
    ours = invert(model, image, PROMPT, method="ddim", steps=steps, control=CallControl())
    inverse = DDIMInverseScheduler.from_config(model.scheduler_config)
    inverse.set_timesteps(steps)
    assert inverse.timesteps.tolist() == ours.timesteps
    forward = model.new_scheduler()
    forward.set_timesteps(steps)
    assert ours.timesteps == list(reversed(forward.timesteps.tolist()))

    cond = model.encode_prompt([PROMPT])
    latent = model.encode_image(image)
    chain = [latent]
    for t in inverse.timesteps:
        eps = model.unet(latent, t, encoder_hidden_states=cond).sample
        latent = inverse.step(eps, t, latent).prev_sample
        chain.append(latent)
    torch.testing.assert_close(ours.chain, torch.cat(chain), rtol=0, atol=1e-4)
    assert ours.chain.shape == (steps + 1, 4, 8, 8) and ours.chain.dtype == torch.float32
    assert ours.rounds == [0] * steps and len(ours.residuals) == steps
    # steps+1 UNet calls: each residual evaluation rides in the next step's batch
    assert ours.forward_evaluations == steps + 1 and ours.backward_evaluations == 0


@torch.no_grad()
def test_ddim_residuals_are_the_fixed_point_residuals(model, image):
    out = invert(model, image, PROMPT, method="ddim", steps=4, control=CallControl())
    cond = model.encode_prompt([PROMPT])
    schedule = diffusion.inversion_schedule(model, 4)
    for i, (t, alpha_prev, alpha_t) in enumerate(schedule):
        c1, c2 = diffusion.inversion_coefficients(alpha_prev, alpha_t)
        z_prev, z_t = out.chain[i:i + 1], out.chain[i + 1:i + 2]
        eps = model.unet(z_t, t, encoder_hidden_states=cond).sample
        expected = torch.mean((z_t - (c1 * z_prev + c2 * eps)) ** 2).item()
        assert out.residuals[i] == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_progress_event_per_step(model, image):
    events = []
    invert(model, image, PROMPT, method="ddim", steps=3, control=CallControl(on_progress=events.append))
    assert [(e.stage, e.step, e.total) for e in events] == [("invert", 1, 3), ("invert", 2, 3), ("invert", 3, 3)]


@pytest.mark.parametrize("limit", [1, 3])
def test_cancellation_stops_within_one_evaluation(model, image, limit):
    control = CallControl(is_cancelled=lambda: control.forward_evaluations + control.backward_evaluations >= limit)
    with UNetCallCounter(model.unet) as counter, pytest.raises(Cancelled):
        invert(model, image, PROMPT, method="ddim", steps=8, control=control)
    assert counter.calls == limit


def test_expired_deadline_runs_no_unet(model, image):
    control = CallControl(deadline=time.monotonic() - 1)
    with UNetCallCounter(model.unet) as counter, pytest.raises(DeadlineExceeded):
        diffusion.sample(model, torch.zeros(1, 4, 8, 8), model.encode_prompt([PROMPT]), None, 4, 1.0, control)
    assert counter.calls == 0


def test_invalid_arguments_name_the_field(model, image):
    from atelier.core.errors import InvalidArgument

    for kwargs, field in ((dict(method="edict"), "method"), (dict(steps=0), "num_inference_steps"), (dict(steps=1001), "num_inference_steps")):
        with pytest.raises(InvalidArgument) as error:
            invert(model, image, PROMPT, **kwargs)
        assert error.value.violations[0][0] == field
    with pytest.raises(InvalidArgument) as error:
        invert(model, image[:, :, :60], PROMPT, method="ddim", steps=2)
    assert error.value.violations[0][0] == "image"
