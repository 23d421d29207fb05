"""FLUX.1 (dev / schnell) with UNO's multi-reference tokens, in diffusers.

- keys: Black Forest Labs' weight names -> diffusers';
- loading: the transformer, the autoencoder and LoRAs from files, offline;
- runtime: latents, one velocity prediction, Euler sampling;
- generation: an image from a seed (the generate command and the trainer's evaluation);
- uno: UNO's token ids and FLUX's schedule;
- text_embedding: the prompt embedding and its file; text_encoders: CLIP-L and T5 from a local folder.
"""
