"""The reward path of a training step, checked the same way for every backbone: LoRA transformer -> one-step clean
estimate -> the backbone's VAE decoder -> face network -> MIMR. Random weights decode no faces, so the decoded image
is a real photo plus the decoder's output (scaled down): detection finds the real face, and the only way the reward
depends on the LoRA is through the decoder and the face network."""

from __future__ import annotations

import torch
from PIL import Image

from umo_core.backbones.flow import clean_estimate
from umo_core.backbones.text_embedding import TextEmbedding


def check_reward_gradient_reaches_only_the_lora(backbone, transformer, vae, photos, pack_dir, text: TextEmbedding,
                                                 latent: torch.Tensor, references: list[torch.Tensor]) -> None:
    """One reward of Rob_Lowe_0002 against Rob_Lowe_0001 through `backbone`'s velocity and decoder; the gradient
    reaches every lora_B and nothing frozen (the transformer's base, the VAE)."""
    from umo_core import identity_reward, load_face_model

    face_model = load_face_model(pack_dir, provider="cpu", backend="torch")
    identities = face_model.identities([photos / "Rob_Lowe_0001.jpg"])
    photo = Image.open(photos / "Rob_Lowe_0002.jpg").convert("RGB").resize((256, 256))
    photo = torch.tensor(list(photo.getdata()), dtype=torch.float32).reshape(1, 256, 256, 3) / 255
    sigma = 0.3
    velocity = backbone.predict_velocity(transformer, latent, sigma, text, references, guidance=1.0)
    image = (photo + 0.05 * (backbone.decode_latents(vae, clean_estimate(latent, velocity, sigma)) - 0.5)).clamp(0, 1)
    reward = identity_reward(image, identities, face_model).values.sum()
    assert len(face_model.detect(image.detach())[0]) == 1
    reward.backward()
    lora_grads = [p.grad for n, p in transformer.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert sum(g.abs().sum() for g in lora_grads) > 0
    assert all(p.grad is None for n, p in transformer.named_parameters() if "lora" not in n)
    assert all(p.grad is None for p in vae.parameters())
