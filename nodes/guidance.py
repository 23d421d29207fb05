"""Identity guidance node: patches a MODEL so the sampler nudges each clean estimate toward the references."""

from __future__ import annotations

import torch

from umo_core.errors import UMOError
from umo_core.faces.guidance import REDETECT_EVERY, FaceReuse, autograd_copy, guide
from umo_core.faces.matching import REWARDS

from .comfy_compat import (
    latent_for_vae,
    sampling_schedule,
    vae_autoencoder,
    vae_decoded_image,
    vae_dtype,
    without_layer_loading_state,
)
from .node_api import io
from .sockets import FaceModelSocket, IdentitiesSocket


def _plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An autograd copy of a ComfyUI module that runs torch's own forward on the copy's weights.

    The loading state stays with the original: through it the copy would read the original's weights (inference
    tensors, no gradient) from the original's allocation, which cannot be copied either.
    """
    with without_layer_loading_state(module):
        return autograd_copy(module)


def _decoder(vae, model):
    """Latent in the model's sampling space -> image [B,H,W,3] in 0..1, differentiable.

    ComfyUI's own VAE weights are inference tensors, so the decoder used for the gradient is a copy,
    made on the first guided step (no cost when guidance never triggers) on the latent's device. The
    autoencoder's own decode undoes FLUX.2's latent normalisation and 2x2 patching, as VAEDecode does.
    """
    copies: dict[torch.device, torch.nn.Module] = {}

    def decode(latent: torch.Tensor) -> torch.Tensor:
        if latent.device not in copies:
            copies[latent.device] = _plain_copy(vae_autoencoder(vae)).to(latent.device)
        samples = latent_for_vae(model, latent).to(latent.device, vae_dtype(vae))
        return vae_decoded_image(vae, copies[latent.device].decode(samples))

    return decode


class SamplingRun:
    """Tells the post-CFG calls of a new sampling run from those of the current one.

    ComfyUI calls the function once per model evaluation (each step, and some samplers' intermediate
    points) with the whole batch. A run is new when its schedule is another tensor (ComfyUI's sampler
    puts each run's `sample_sigmas` into the transformer options), when sigma rises (a sampler never
    goes back up within a run; the schedule may be missing for other callers), or when the latent's
    shape changes.
    """

    def __init__(self):
        self.schedule: torch.Tensor | None = None  # held, so that its id cannot pass to another run's tensor
        self.sigma = float("inf")
        self.shape: torch.Size | None = None

    def is_new(self, args: dict, sigma: float, shape: torch.Size) -> bool:
        schedule = sampling_schedule(args)
        new = schedule is not self.schedule or sigma > self.sigma or shape != self.shape
        self.schedule, self.sigma, self.shape = schedule, sigma, shape
        return new


class IdentityGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UMOIdentityGuidance",
            display_name="UMO Identity Guidance",
            category="UMO",
            description="During sampling, decodes the clean estimate, scores it with the MIMR reward against the "
                        "reference identities and nudges it up the reward's gradient (any KSampler/sampler).",
            inputs=[
                io.Model.Input("model"),
                io.Vae.Input("vae"),
                FaceModelSocket.Input("face_model"),
                IdentitiesSocket.Input("identities"),
                io.Float.Input("strength", default=0.05, min=0.0, max=10.0, step=0.005,
                               tooltip="step size in latent units (the gradient is RMS-normalised)"),
                io.Float.Input("start", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="fraction of the schedule where guidance starts (0 = first step)"),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("reward", options=list(REWARDS), default="mimr"),
                io.Int.Input("redetect_every", default=REDETECT_EVERY, min=1, max=100, optional=True,
                             tooltip="guided steps between two face detections (the faces found are reused in "
                                     "between, saving a full preview decode per step; a face whose similarity "
                                     "drops sharply is detected again at once); 1 = detect at every step"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, vae, face_model, identities, strength, start, end, reward,
                redetect_every=REDETECT_EVERY) -> io.NodeOutput:
        if start > end:
            raise UMOError(f"UMO Identity Guidance: start ({start}) is after end ({end}); guidance would never run. "
                           "Set start below end (default: start 0.6, end 1.0, the last 40% of the steps).")
        sampling = model.get_model_object("model_sampling")
        sigma_start, sigma_end = sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)
        decode = _decoder(vae, model)
        reuse = FaceReuse(redetect_every)
        run = SamplingRun()

        def post_cfg(args: dict) -> torch.Tensor:
            denoised = args["denoised"]
            sigma = float(args["sigma"].max())
            if run.is_new(args, sigma, denoised.shape):  # this model's faces belong to one sampling run
                reuse.reset()
            if strength == 0 or not sigma_end <= sigma <= sigma_start:
                return denoised
            # Sampling runs under inference mode: leave it for the gradient, on a copy of the estimate.
            with torch.inference_mode(False), torch.enable_grad():
                guided, _ = guide(denoised.clone(), decode, identities, face_model, strength, reward, reuse)
            return guided.to(denoised)

        patched = model.clone()  # the input MODEL stays untouched
        patched.set_model_sampler_post_cfg_function(post_cfg)
        return io.NodeOutput(patched)
