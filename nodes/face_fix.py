"""Identity face fix node: re-samples each face with the reference person the identity match gave it."""

from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch
from comfy.utils import ProgressBar

from umo_core.backbones.references import MULTIPLE
from umo_core.errors import UMOError
from umo_core.faces.face_fix import FaceFix, fix_faces, fix_report, plan_fixes
from umo_core.images import float_image

from .backbone import BACKBONES, attach_references, check_long_side, check_vae
from .comfy_compat import model_family
from .guidance import IdentityGuidance
from .node_api import io, ui
from .sockets import FaceModelSocket, IdentitiesSocket

REFERENCE_KEYS = ("reference_latents", "reference_latents_method")
REFERENCE_FAMILIES = {family for family in BACKBONES.values() if family}  # those attach_references conditions
NODE = "UMO Identity Face Fix"


def without_references(conditioning: list) -> list:
    """A copy of the conditioning without reference latents (those of UMO Reference Conditioning or ReferenceLatent):
    each face is conditioned on its own person only."""
    return [[tensor, {k: v for k, v in options.items() if k not in REFERENCE_KEYS}] for tensor, options in conditioning]


class IdentityFaceFix(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UMOIdentityFaceFix",
            display_name="UMO Identity Face Fix",
            category="UMO",
            description="Re-samples each face toward the reference person the identity match assigned it to: the face "
                        "with context is cropped, sampled at guide_size conditioned on THAT person's reference photo "
                        "only (as UMO Reference Conditioning does it: FLUX.1, FLUX.2 or OmniGen2), and pasted back "
                        "with a feathered mask. "
                        "Connect positive/negative WITHOUT references (any reference latents on them are dropped; "
                        "the node attaches the matched person's). Unmatched faces and all pixels outside the masks "
                        "stay as they are.",
            inputs=[
                io.Image.Input("images"),
                io.Model.Input("model",
                               tooltip="FLUX.1 (with UMO_UNO), FLUX.2 [klein]/[dev], or OmniGen2 (with UMO_OmniGen2)"),
                io.Vae.Input("vae", tooltip="the model's own: FLUX.2's for FLUX.2, ae.safetensors otherwise"),
                io.Conditioning.Input("positive", tooltip="the prompt, best without references"),
                io.Conditioning.Input("negative"),
                FaceModelSocket.Input("face_model"),
                IdentitiesSocket.Input("identities", tooltip="from UMO Reference Identities (it keeps the photos)"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="1.0 for FLUX (its guidance is FluxGuidance on positive)"),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple"),
                io.Float.Input("denoise", default=0.4, min=0.01, max=1.0, step=0.01,
                               tooltip="how much of each face is re-drawn"),
                io.Int.Input("guide_size", default=768, min=64, max=2048, step=16,
                             tooltip="the crop's long side while sampling (768-1024 for FLUX)"),
                io.Float.Input("context", default=0.75, min=0.0, max=4.0, step=0.05,
                               tooltip="margin around the face on each side, in face sizes"),
                io.Int.Input("feather", default=16, min=0, max=512,
                             tooltip="pixels over which the pasted crop fades into the image"),
                io.Float.Input("only_below", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="fix only faces whose matched similarity is below this; 0 = every matched face"),
                io.Int.Input("long_side", default=0, min=0, max=2048, step=16, optional=True,
                             tooltip="FLUX.1 only: the reference's long side; 0 = UNO's rule for one reference "
                                     "(512). FLUX.2 and OmniGen2 need 0 (their own rules)"),
                io.Float.Input("guidance_strength", default=0.0, min=0.0, max=10.0, step=0.005, optional=True,
                               tooltip="UMO Identity Guidance toward the face's reference while sampling; 0 = off"),
            ],
            outputs=[io.Image.Output(display_name="images"), io.Mask.Output(display_name="masks"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, images, model, vae, positive, negative, face_model, identities, seed, steps, cfg, sampler_name,
                scheduler, denoise, guide_size, context, feather, only_below, long_side=0,
                guidance_strength=0.0) -> io.NodeOutput:
        family = model_family(model)
        if family not in REFERENCE_FAMILIES:
            raise UMOError(f"{NODE}: the model is {type(model.model).__name__}, which the face fix cannot condition "
                           "on a reference photo; connect FLUX.1 (UMO_UNO), FLUX.2 or OmniGen2 (UMO_OmniGen2)")
        check_vae(vae, family, NODE)
        check_long_side(long_side, family, NODE)
        positive, negative = without_references(positive), without_references(negative)
        plans = plan_fixes(face_model, identities, images, context, only_below)  # checks the photos, finds the faces
        bar = ProgressBar(max(1, sum(face.fixed for plan in plans for face in plan.faces)) * steps)
        faces_done = 0

        def resample(crop: torch.Tensor, face: FaceFix) -> torch.Tensor:
            nonlocal faces_done
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel between faces
            photo = float_image(identities.photos[face.reference])
            conditioned, _ = attach_references(positive, None, vae, [photo], family, long_side)
            sampler_model = model
            if guidance_strength > 0:
                sampler_model = IdentityGuidance.execute(model, vae, face_model, identities.person(face.reference),
                                                         guidance_strength, 0.0, 1.0, "mimr")[0]
            latent = comfy.sample.fix_empty_latent_channels(sampler_model, vae.encode(crop[None]))

            def on_step(index: int, x0: torch.Tensor, x: torch.Tensor, total: int) -> None:
                bar.update_absolute(faces_done * steps + index + 1)  # with ComfyUI's server: a Cancel point
                comfy.model_management.throw_exception_if_processing_interrupted()

            samples = comfy.sample.sample(sampler_model, comfy.sample.prepare_noise(latent, seed), steps, cfg,
                                          sampler_name, scheduler, conditioned, negative, latent, denoise=denoise,
                                          callback=on_step, disable_pbar=True, seed=seed)
            decoded = vae.decode(samples)[0].to(crop)
            faces_done += 1
            del latent, samples, conditioned
            comfy.model_management.soft_empty_cache()  # one crop's memory at a time
            return decoded

        fixed, masks = fix_faces(face_model, identities, images, plans, resample, guide_size, feather, MULTIPLE)
        report = fix_report(plans, only_below)
        return io.NodeOutput(fixed, masks, report, ui=ui.PreviewText(report))
