"""A real, small training method for testing the job system: textual inversion (Gal et al. 2022)
of one token embedding on the embedded toy model, with a mask-weighted diffusion loss.

Test fixture, not production code: the job system's tests need a TrainingRun that trains for
real (the loss falls, the state resumes exactly) but costs milliseconds per step. It is served
under the "eqdiff" method name because that is the one method the contract has; it reads only
``steps`` and ``learning_rate`` from the EqDiff options.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from atelier.core.control import CallControl
from atelier.core.diffusion import sample
from atelier.core.errors import InvalidArgument
from atelier.personalization.methods import GenerateOptions, TrainingInputs
from atelier.personalization.training import Concept, StepReport


@dataclass(frozen=True)
class TIParams:
    class_word: str
    placeholder_token: str
    steps: int
    learning_rate: float


@contextlib.contextmanager
def injected(model, word_id: int, embedding: torch.Tensor):
    """Within the block, every occurrence of token ``word_id`` is embedded as ``embedding``."""

    def hook(_module, args, output):
        ids = args[0]
        return torch.where((ids == word_id)[..., None], embedding.to(output.dtype), output)

    handle = model.text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def word_id(model, word: str) -> int:
    return model.tokenizer.convert_tokens_to_ids(word.lower() + "</w>")


def encode(model, prompts: list[str]) -> torch.Tensor:
    ids = model.tokenizer(prompts, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(model.device)
    return model.text_encoder(ids)[0]


class TextualInversionRun:
    def __init__(self, model, inputs: TrainingInputs, params: TIParams, control: CallControl):
        self.model = model
        self.params = params
        self.total_steps = params.steps
        self.step_index = 0
        self.word = params.class_word.split()[-1]
        self.word_id = word_id(model, self.word)
        initial = model.text_encoder.get_input_embeddings().weight[self.word_id].detach().float().clone()
        self.embedding = torch.nn.Parameter(initial)
        self.optimizer = torch.optim.AdamW([self.embedding], lr=params.learning_rate, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(inputs.seed)
        with torch.no_grad():
            control.vae()
            self.latents = model.encode_image(inputs.images).float()
        size = self.latents.shape[2:]
        self.latent_masks = F.interpolate(inputs.masks.float(), size=size, mode="area").clamp(0, 1)
        self.scheduler = model.new_scheduler()
        self.prompt = f"a photo of a {self.word}"

    def step(self, control: CallControl) -> StepReport:
        index = int(torch.randint(0, self.latents.shape[0], (1,), generator=self.generator))
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=self.generator)
        noise = torch.randn(self.latents[index:index + 1].shape, generator=self.generator)
        noisy = self.scheduler.add_noise(self.latents[index:index + 1], noise, t)
        with injected(self.model, self.word_id, self.embedding):
            cond = encode(self.model, [self.prompt])
        control.unet(backward=True)
        eps = self.model.unet(noisy.to(self.model.dtype), t.to(self.model.device), encoder_hidden_states=cond,
                              return_dict=False)[0].float()
        mask = self.latent_masks[index:index + 1]
        loss = (((eps - noise) ** 2) * mask).sum() / (mask.sum() * eps.shape[1]).clamp_min(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_index += 1
        return StepReport(step=self.step_index, phase="train", losses={"loss": float(loss.detach())})

    def state_dict(self) -> dict:
        return {"embedding": self.embedding.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "rng": self.generator.get_state(), "step": self.step_index}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.embedding.copy_(state["embedding"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"])
        self.step_index = int(state["step"])

    def finish(self) -> Concept:
        assert self.step_index == self.total_steps
        return Concept(tensors={"embedding": self.embedding.detach().clone()},
                       metadata={"word": self.word})


class TextualInversionMethod:
    name = "eqdiff"

    def parse(self, options, class_word: str, placeholder_token: str, initializer_token: str) -> TIParams:
        steps = options.steps if options.HasField("steps") else 600
        if not 1 <= steps <= 20000:
            raise InvalidArgument("steps", f"must be an integer in [1, 20000], got {steps}")
        return TIParams(class_word=class_word, placeholder_token=placeholder_token or "<concept>", steps=steps,
                        learning_rate=options.learning_rate if options.HasField("learning_rate") else 5e-3)

    def total_steps(self, params: TIParams, class_images_given: bool) -> int:
        return params.steps

    def placeholder_token(self, params: TIParams) -> str:
        return params.placeholder_token

    def params_json(self, params: TIParams) -> str:
        return json.dumps(asdict(params), sort_keys=True)

    def create_run(self, model, inputs: TrainingInputs, params: TIParams, control) -> TextualInversionRun:
        return TextualInversionRun(model, inputs, params, control)

    @torch.no_grad()
    def generate(self, model, concept: Concept, options: GenerateOptions, control) -> torch.Tensor:
        word = concept.metadata["word"]
        prompt = options.prompt.replace(concept.metadata["placeholder_token"], word)
        with injected(model, word_id(model, word), concept.tensors["embedding"].to(model.device)):
            cond = encode(model, [prompt]).to(model.dtype)
        uncond = encode(model, [options.negative_prompt]).to(model.dtype)
        generator = torch.Generator().manual_seed(options.seed)
        size = model.unet.config.sample_size
        z_T = torch.randn((options.num_images, 4, size, size), generator=generator)
        latents = sample(model, z_T, cond, uncond, options.num_inference_steps, options.guidance_scale, control,
                         stage="generate")
        control.vae()
        return model.decode_latents(latents)
