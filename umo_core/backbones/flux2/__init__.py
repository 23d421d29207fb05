"""FLUX.2 ([klein] 4B and 9B, base and distilled; [dev]) in diffusers (Flux2Transformer2DModel, AutoencoderKLFlux2).

- loading: the transformer and the autoencoder from diffusers folders or single files, offline, and the variant
  (distilled or base, guidance-embedded dev) of a transformer;
- runtime: latents in and out of the autoencoder (patchified 2x2, normalised by its batch-norm statistics), the
  position ids (references by their first axis), one velocity prediction, the schedule;
- references: the pipelines' resize rule; lora: the LoRA layouts (peft and ComfyUI's);
- text_encoders: Qwen3 (klein) and Mistral-3 (dev) prompt embeddings from local files;
- backbone: the contract over these.
"""
