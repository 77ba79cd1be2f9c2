"""SPDInv's baselines as inversion methods: NPI, ProxNPI and DirectInv share DDIM's chain; null-text
inversion returns per-step embeddings that Edit uses; fixed-point iteration (AIDI-style)."""

import pytest
import torch

from atelier.core import diffusion
from atelier.core.control import CallControl
from atelier.core.errors import InvalidArgument
from atelier.inversion.editing import edit
from atelier.inversion.inversion import invert

pytestmark = pytest.mark.timeout(300)
PROMPT = "a red circle on a white background"
STEPS = 5


@pytest.fixture(scope="module")
def ddim(model, image):
    return invert(model, image, PROMPT, method="ddim", steps=STEPS)


@pytest.mark.parametrize("method", ["npi", "proxnpi", "directinv"])
def test_edit_time_baselines_invert_like_ddim(model, image, ddim, method):
    out = invert(model, image, PROMPT, method=method, steps=STEPS)
    torch.testing.assert_close(out.chain, ddim.chain, rtol=0, atol=0)
    assert out.method == method


def test_fixed_point_iteration_lowers_the_residual_with_forward_passes_only(model, image, ddim):
    control = CallControl()
    out = invert(model, image, PROMPT, method="fixed_point", steps=STEPS, control=control, max_rounds=6,
                 loss_threshold=5e-6)
    assert out.backward_evaluations == 0
    assert out.forward_evaluations == STEPS + sum(out.rounds) + STEPS  # estimate + one per round + the last check
    assert sum(out.residuals) < sum(ddim.residuals) / 2, (out.residuals, ddim.residuals)
    assert all(r <= 6 for r in out.rounds)
    for rounds, residual in zip(out.rounds, out.residuals):
        assert rounds == 6 or residual < 5e-6
    # The residuals are measured on the returned chain.
    cond = model.encode_prompt([PROMPT])
    with torch.no_grad():
        for i, (t, alpha_prev, alpha_t) in enumerate(diffusion.inversion_schedule(model, STEPS)):
            c1, c2 = diffusion.inversion_coefficients(alpha_prev, alpha_t)
            eps = model.unet(out.chain[i + 1:i + 2], t, encoder_hidden_states=cond).sample
            expected = torch.mean((out.chain[i + 1:i + 2] - c1 * out.chain[i:i + 1] - c2 * eps) ** 2).item()
            assert out.residuals[i] == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_anderson_acceleration_beats_plain_iteration(model, image):
    kwargs = dict(method="fixed_point", steps=STEPS, max_rounds=4, loss_threshold=0.0)
    anderson = invert(model, image, PROMPT, **kwargs)
    plain = invert(model, image, PROMPT, anderson_memory=0, **kwargs)
    assert sum(anderson.residuals) < sum(plain.residuals)


def test_null_text_inversion_reconstructs_better_than_ddim_under_guidance(model, image, ddim):
    nti = invert(model, image, PROMPT, method="nti", steps=STEPS, guidance_scale=7.5)
    embeddings = nti.extras["null_embeddings"]
    assert embeddings.shape == (STEPS, *model.encode_prompt([""]).shape[1:])
    torch.testing.assert_close(nti.chain, ddim.chain, rtol=0, atol=0)
    truth = model.decode_latents(ddim.chain[:1])
    with_nti = edit(model, nti.z_T, PROMPT, PROMPT, STEPS, guidance=7.5, method="nti", null_embeddings=embeddings)
    with_null = edit(model, ddim.z_T, PROMPT, PROMPT, STEPS, guidance=7.5, method="ddim")
    assert torch.mean((with_nti.source_image - truth) ** 2) < torch.mean((with_null.source_image - truth) ** 2)
    with pytest.raises(InvalidArgument) as error:
        edit(model, nti.z_T, PROMPT, PROMPT, STEPS, method="nti")
    assert [field for field, _ in error.value.violations] == ["source"]


def test_unknown_method_and_bad_options_are_invalid(model, image):
    with pytest.raises(InvalidArgument):
        invert(model, image, PROMPT, method="edict", steps=STEPS)
    with pytest.raises(InvalidArgument):
        invert(model, image, PROMPT, method="fixed_point", steps=STEPS, anderson_memory=-1)


@pytest.mark.parametrize("method", ["nti", "fixed_point"])
def test_cancellation_stops_the_baselines_within_one_evaluation(model, image, method):
    from atelier.core.errors import Cancelled

    calls = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    control = CallControl(is_cancelled=lambda: control.forward_evaluations + control.backward_evaluations >= 9)
    try:
        with pytest.raises(Cancelled):
            invert(model, image, PROMPT, method=method, steps=STEPS, control=control, loss_threshold=0.0)
    finally:
        handle.remove()
    assert len(calls) == 9
