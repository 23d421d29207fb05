"""FLUX.1 (dev / schnell) with UNO's multi-reference tokens, in diffusers.

keys: Black Forest Labs' weight names -> diffusers'; loading: transformer, autoencoder and LoRAs from
files; runtime: latents, velocity, sampling; uno: UNO's token ids and FLUX's schedule; text_embedding:
the prompt embedding and its file; text_encoders: CLIP-L and T5 from a local diffusers folder.
"""
