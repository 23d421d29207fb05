"""One ReReFL step: the loss of one batch, L = lambda * L_diff - R (+ WithAnyone's optional ID terms).

- L_diff: the flow-matching loss on the batch's targets (guidance fixed at 1).
- R: the reward of a ReReFL rollout (the UMO paper, arXiv 2509.06818): sample without gradient
  from noise to a step drawn from the last `window` steps of the schedule, take one step with
  gradient, form the one-step clean estimate, decode it with gradient and score it with MIMR (or
  SIR) against the sample's references: the `identity_reward` the nodes use. R is the batch mean.
- The ID terms (WithAnyone's; README, "WithAnyone terms"): on the flow-matching branch's clean
  estimate, at the target photo's face keypoints; off where sigma > ID_LOSS_MAX_SIGMA.

The step is the same for every backbone (umo_core.backbones.contract): the backbone gives the velocity, the
schedule and the decoder. The trainer and bench/train_step.py both run `rerefl_step`, then `apply_gradients`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from umo_core.backbones.flow import clean_estimate, sample
from umo_core.faces.detection import Faces
from umo_core.faces.face_model import FaceModel
from umo_core.faces.reward import RewardResult, identity_reward
from umo_core.faces.withanyone import (
    CONTRASTIVE_TEMPERATURE,
    ID_LOSS_MAX_SIGMA,
    ReferenceBank,
    contrastive_id_loss,
    gt_aligned_embeddings,
    gt_aligned_id_loss,
    negatives_for,
    paired_with_references,
)

from .batches import Batch


@dataclass(frozen=True)
class StepSettings:
    """What shapes one step; the defaults are the trainer's."""

    sampling_steps: int = 25
    window: int = 10  # the gradient step is drawn from the last `window` sampling steps
    reward: str = "mimr"  # a name in umo_core.faces.matching.REWARDS
    diffusion_weight: float = 1.0  # lambda
    gt_id_weight: float = 0.0  # WithAnyone's GT-aligned ID loss (0: off)
    contrastive_weight: float = 0.0  # WithAnyone's contrastive ID loss (0: off)
    contrastive_temperature: float = CONTRASTIVE_TEMPERATURE

    def id_term_weights(self) -> dict[str, float]:
        """The weights of the ID terms that are on, by the name the log gives each term."""
        weights = {"gt_id_loss": self.gt_id_weight, "contrastive_loss": self.contrastive_weight}
        return {name: weight for name, weight in weights.items() if weight}


DEFAULT_SETTINGS = StepSettings()


@dataclass
class StepResult:
    loss: torch.Tensor  # the scalar to backpropagate
    diffusion_loss: torch.Tensor
    reward: torch.Tensor  # the batch mean of `rewards`
    reward_step: int  # the sampling step taken with gradient
    id_terms: dict[str, torch.Tensor]  # the ID terms that ran (none when every sample was too noisy)
    rewards: RewardResult  # per sample of the batch, of its decoded clean estimate


def withanyone_terms(backbone, settings: StepSettings, vae, face_model: FaceModel, batch: Batch, noisy: torch.Tensor,
                     velocity: torch.Tensor, t: torch.Tensor, bank: ReferenceBank | None) -> dict[str, torch.Tensor]:
    """WithAnyone's ID losses on the flow-matching branch's clean estimate.

    That estimate keeps the target photo's layout (it is denoised from the noised target), so the
    target's face keypoints locate its faces: nothing is detected on the estimate. Samples noisier
    than ID_LOSS_MAX_SIGMA take no part, as in WithAnyone.
    """
    kept = [i for i in range(len(t)) if t[i] <= ID_LOSS_MAX_SIGMA]
    if not kept:
        return {}
    images = backbone.decode_latents(vae, clean_estimate(noisy[kept], velocity[kept], t[kept]))
    truths = [batch.ground_truth[i] for i in kept]
    terms = {}
    if settings.gt_id_weight:
        terms["gt_id_loss"] = gt_aligned_id_loss(images, truths, face_model)
    if settings.contrastive_weight:
        losses = []
        for faces, i in zip(gt_aligned_embeddings(images, truths, face_model), kept):
            references = batch.identities[i].embeddings
            generated, positives = paired_with_references(faces, references)
            negatives = negatives_for(bank, references, batch.names[i])
            losses.append(contrastive_id_loss(generated, positives, negatives, settings.contrastive_temperature))
        terms["contrastive_loss"] = torch.stack(losses).mean()
    return terms


def batch_reward(backbone, vae, face_model: FaceModel, batch: Batch, estimate: torch.Tensor, kind: str,
                 faces: list[Faces] | None = None) -> tuple[torch.Tensor, RewardResult]:
    """R: the batch mean of each sample's reward (`kind`) of its decoded clean estimate against the sample's own
    references, and those rewards. Differentiable through the decoder and the face network; `faces` as in
    `rerefl_step`."""
    images = backbone.decode_latents(vae, estimate)
    rewards = identity_reward(images, batch.identities, face_model, kind=kind, faces=faces)
    return rewards.values.mean(), rewards


def rerefl_step(backbone, transformer, vae, face_model: FaceModel, batch: Batch, settings: StepSettings,
                generator: torch.Generator, rollout_transformer=None, bank: ReferenceBank | None = None,
                faces: list[Faces] | None = None) -> StepResult:
    """The loss of one batch; its random draws (t, noise, the reward step, the rollout's noise) come from
    `generator`, in that order.

    backbone: a umo_core.backbones.contract.Backbone. transformer: its transformer with the trainable LoRA, as
    wrapped for training (DDP under torchrun: its forward syncs the gradients). rollout_transformer: the same
    model unwrapped, for the rollout without gradient (default: `transformer`). bank: the negatives of the
    contrastive term (needed when it is on).
    faces: per sample, where the faces of its decoded estimate are. A bench-only seam: random weights
    decode no faces, so bench/train_step.py gives fixed boxes; the trainer detects them (None).
    """
    device, shape = batch.target.device, batch.target.shape
    # 1. The flow-matching loss on the batch (guidance fixed at 1), and the ID terms on its estimate.
    t = torch.rand((shape[0], 1, 1, 1), generator=generator).to(device)
    noise = torch.randn(shape, generator=generator).to(device)
    noisy = (1 - t) * batch.target + t * noise
    velocity = backbone.predict_velocity(transformer, noisy, t.flatten(), batch.text, batch.references, guidance=1.0)
    diffusion_loss = torch.nn.functional.mse_loss(velocity, noise - batch.target)
    id_terms = {}
    if settings.id_term_weights():
        id_terms = withanyone_terms(backbone, settings, vae, face_model, batch, noisy, velocity, t, bank)

    # 2. ReReFL: roll out without gradient to a step in the window, one step with gradient, its estimate.
    reward_step = int(torch.randint(settings.sampling_steps - settings.window, settings.sampling_steps, (),
                                    generator=generator))
    start = torch.randn(shape, generator=generator).to(device)
    rollout = transformer if rollout_transformer is None else rollout_transformer
    latent = sample(backbone, rollout, start, batch.text, batch.references, settings.sampling_steps, guidance=1.0,
                    stop_at=reward_step)
    sigma = backbone.sigmas(settings.sampling_steps, tuple(shape[2:]))[reward_step]
    velocity = backbone.predict_velocity(transformer, latent, sigma, batch.text, batch.references, guidance=1.0)
    estimate = clean_estimate(latent, velocity, sigma)
    reward, rewards = batch_reward(backbone, vae, face_model, batch, estimate, settings.reward, faces)

    loss = settings.diffusion_weight * diffusion_loss - reward
    for name, weight in settings.id_term_weights().items():
        if name in id_terms:
            loss = loss + weight * id_terms[name]
    return StepResult(loss, diffusion_loss, reward, reward_step, id_terms, rewards)


def apply_gradients(accelerator: Accelerator, loss: torch.Tensor, parameters: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    """Backward, the gradient norm clipped to `grad_clip`, one optimizer step."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad()
