"""Tiny models of the real architectures, for the tests: one builder per kind, small explicit configurations,
random weights from a fixed seed.

FLUX's transformer (diffusers FluxTransformer2DModel) and autoencoder (AutoencoderKL in FLUX's layout), peft LoRAs
on the transformer, LoRA files in UNO's and UMO_OmniGen2's layouts, and FLUX's two text encoders (CLIP-L, T5) with
real tokenizers. The text widths of the encoders, of the text embedding files and of the transformer agree, so the
models work together (TEXT_DIM, POOLED_DIM).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from peft import LoraConfig

from umo_core.backbones.flux1.lora import UNO_TARGET_MODULES

# The text embedding the tiny transformer takes: TEXT_LEN tokens of T5 width TEXT_DIM, CLIP's pooled POOLED_DIM.
TEXT_LEN, TEXT_DIM, POOLED_DIM = 4, 32, 16
HEADS, HEAD_DIM = 2, 16
HIDDEN = HEADS * HEAD_DIM  # the transformer's width
FLUX_HEAD_DIM = 128  # FLUX.1's own head size: the loaders read a file's head size from its rotary embedding
# head size -> the rotary embedding's axes (they add up to the head size)
ROPE_AXES = {HEAD_DIM: (4, 6, 6), FLUX_HEAD_DIM: (16, 56, 56)}
LORA_RANK = 4


def tiny_flux_transformer(layers: int = 1, single_layers: int = 1, guidance: bool = True,
                          head_dim: int = HEAD_DIM) -> FluxTransformer2DModel:
    """FLUX.1's transformer with `layers` double and `single_layers` single blocks, two heads of `head_dim`
    (HEAD_DIM, or FLUX_HEAD_DIM where a test needs FLUX's rotary embedding); `guidance`: FLUX.1-dev's guidance
    embedder (schnell has none). diffusers' own initialisation, seeded."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers,
                                  attention_head_dim=head_dim, num_attention_heads=HEADS,
                                  joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
                                  guidance_embeds=guidance, axes_dims_rope=ROPE_AXES[head_dim])


def tiny_vae(block_channels: tuple[int, ...] = (8, 8, 8, 8), latent_channels: int = 16,
             norm_groups: int = 4) -> AutoencoderKL:
    """FLUX's autoencoder architecture (no quant convolutions, FLUX's scale and shift) with one level per entry of
    `block_channels` (four levels: FLUX's 8x downsampling) and one resnet a level. diffusers' own initialisation,
    seeded."""
    torch.manual_seed(1)
    levels = len(block_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=block_channels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1,
                         norm_num_groups=norm_groups, shift_factor=0.1159, scaling_factor=0.3611,
                         use_quant_conv=False, use_post_quant_conv=False)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every parameter random, in eval mode (a fresh model's norm weights are all one, which would hide
    swapped norms)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def add_lora(model: torch.nn.Module, rank: int, alpha: float, target_modules=UNO_TARGET_MODULES,
             lora_b_std: float | None = None) -> torch.nn.Module:
    """`model` with a peft LoRA adapter ("default"); `lora_b_std`: lora_B drawn with that deviation (peft starts it at
    zero, which makes the LoRA's delta zero: comparisons of deltas would all pass)."""
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules))
    if lora_b_std is not None:
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=lora_b_std)
    return model


def uno_lora(hidden: int = HIDDEN, rank: int = LORA_RANK, prefix: str = "", blocks: tuple[int, int] = (1, 1),
             seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA in UNO's processor layout (UMO_UNO.safetensors) for FLUX blocks of width `hidden`;
    `blocks` = (double, single) block count."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"qkv_lora1": (hidden, 3 * hidden), "proj_lora1": (hidden, hidden), "qkv_lora2": (hidden, 3 * hidden),
              "proj_lora2": (hidden, hidden), "qkv_lora": (hidden, 3 * hidden), "proj_lora": (5 * hidden, hidden)}
    lora = {}
    for module, (inputs, outputs) in shapes.items():
        block, count = ("double_blocks", blocks[0]) if module.endswith(("1", "2")) else ("single_blocks", blocks[1])
        for index in range(count):
            name = f"{prefix}{block}.{index}.processor.{module}"
            lora[f"{name}.down.weight"] = torch.randn(rank, inputs, generator=generator)
            lora[f"{name}.up.weight"] = torch.randn(outputs, rank, generator=generator)
    return lora


def omnigen2_peft_lora(hidden: int = 48, kv: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA in UMO_OmniGen2's layout: peft keys with the adapter name, on two layers and the three refiners
    (k and v narrower: grouped-query attention)."""
    generator = torch.Generator().manual_seed(seed)
    outputs = {"to_q": hidden, "to_k": kv, "to_v": kv, "to_out.0": hidden}
    lora = {}
    for layer in ("layers.0", "layers.1", "noise_refiner.0", "ref_image_refiner.0", "context_refiner.0"):
        for module, width in outputs.items():
            lora[f"{layer}.attn.{module}.lora_A.default.weight"] = torch.randn(LORA_RANK, hidden, generator=generator)
            lora[f"{layer}.attn.{module}.lora_B.default.weight"] = torch.randn(width, LORA_RANK, generator=generator)
    return lora


def random_text_embedding(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A text embedding file's tensors for the tiny transformer (one prompt: [TEXT_LEN, TEXT_DIM], [POOLED_DIM])."""
    return {"prompt_embeds": torch.randn(TEXT_LEN, TEXT_DIM, generator=generator),
            "pooled_prompt_embeds": torch.randn(POOLED_DIM, generator=generator)}


def save_flux_folder(root: Path) -> Path:
    """The tiny transformer and autoencoder in a diffusers FLUX folder's transformer/ and vae/."""
    tiny_flux_transformer().save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    return root


def save_clip_text_encoder(folder: Path) -> None:
    """FLUX's tokenizer/ and text_encoder/: CLIP-L's tokenizer files as FLUX ships them (vocab.json, merges.txt:
    byte-level BPE with '</w>' word ends) over a small vocabulary, and a small CLIPTextModel of width POOLED_DIM with
    FLUX's token ids (eos 2: the pooled output is taken at the highest token id, the end of text)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel

    merges = [("t", "w"), ("tw", "o</w>"), ("a", "t</w>")]
    characters = sorted(ByteLevel.alphabet())
    tokens = characters + [c + "</w>" for c in characters] + ["tw", "two</w>", "at</w>"]
    vocab = {token: i for i, token in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    torch.manual_seed(2)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=POOLED_DIM, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")


def save_t5_text_encoder(folder: Path) -> None:
    """FLUX's tokenizer_2/ and text_encoder_2/: a unigram T5 tokenizer (tokenizer.json, as FLUX's) and a small
    T5 v1.1 encoder of width TEXT_DIM."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz,:0123456789"]
    pieces += [("▁" + word, -1.0) for word in ("two", "people", "a", "at", "the", "and", "table")]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder / "tokenizer_2")
    torch.manual_seed(3)
    config = T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu")
    T5EncoderModel(config).save_pretrained(folder / "text_encoder_2")


# FLUX.2: the text width the tiny Flux2Transformer2DModel takes (three stacked hidden states of a width-8 encoder,
# as klein stacks Qwen3's), that of the tiny [dev] text encoder (three of width 12, as dev stacks Mistral-3's: the
# widths differ, as the real ones do), and its size.
FLUX2_TEXT_DIM = 24
FLUX2_DEV_TEXT_DIM = 36
FLUX2_HEADS, FLUX2_HEAD_DIM = 2, 16


def tiny_flux2_transformer(guidance: bool = False, layers: int = 1, single_layers: int = 1,
                           text_dim: int = FLUX2_TEXT_DIM):
    """FLUX.2's transformer (klein without guidance embedding, dev with it) with 128 input channels (the real
    latent), `layers` double and `single_layers` single blocks of two heads of 16, taking text `text_dim` wide.
    diffusers' initialisation, then every weight random (its output layers start at zero, which would hide a wrong
    velocity)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(3)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=layers, num_single_layers=single_layers,
                                    attention_head_dim=FLUX2_HEAD_DIM, num_attention_heads=FLUX2_HEADS,
                                    joint_attention_dim=text_dim, timestep_guidance_channels=32,
                                    axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance)
    return randomized(model)


def tiny_flux2_vae():
    """FLUX.2's autoencoder (32 latent channels, 2x2 patches, batch-norm statistics) with four levels of 32 channels
    (8x downsampling) and one resnet a level; the statistics random, so the normalisation is not the identity."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(4)
    vae = AutoencoderKLFlux2(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=32)
    generator = torch.Generator().manual_seed(5)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.1)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) + 0.5)
    return vae.eval()


def flux2_text_embedding(generator: torch.Generator, tokens: int = TEXT_LEN) -> dict[str, torch.Tensor]:
    """A FLUX.2 [klein] text embedding file's tensors for the tiny transformer (one prompt: [tokens, FLUX2_TEXT_DIM],
    and the empty prompt's, which klein base's classifier-free guidance takes)."""
    return {"prompt_embeds": torch.randn(tokens, FLUX2_TEXT_DIM, generator=generator),
            "negative_prompt_embeds": torch.randn(tokens, FLUX2_TEXT_DIM, generator=generator)}


def save_flux2_folder(root: Path, guidance: bool = False) -> Path:
    """The tiny FLUX.2 transformer and autoencoder in a diffusers folder's transformer/ and vae/."""
    tiny_flux2_transformer(guidance).save_pretrained(root / "transformer")
    tiny_flux2_vae().save_pretrained(root / "vae")
    return root


# Qwen3's chat turns, with what its template adds for a generation prompt with thinking off (the empty think block).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def save_qwen3_text_encoder(folder: Path) -> None:
    """FLUX.2 [klein]'s tokenizer/ and text_encoder/: a byte-level BPE Qwen2 tokenizer with Qwen3's special tokens and
    a chat template, and a Qwen3 of width 8 with 27 layers (klein stacks layers 9, 18 and 27: 3 x 8 =
    FLUX2_TEXT_DIM)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    merges = [("t", "w"), ("tw", "o"), ("Ġ", "p")]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tokens = sorted(ByteLevel.alphabet()) + ["tw", "two", "Ġp"]
    model = models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(6)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=27,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=1024)
    Qwen3ForCausalLM(config).save_pretrained(folder / "text_encoder")


# Mistral Small 3's chat turns as its template writes them (a message's content is text or a list of text parts).
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.content is string %}{% set text = message.content %}"
    "{% else %}{% set text = message.content | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if message.role == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message.role == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}")


def save_mistral3_text_encoder(folder: Path) -> None:
    """FLUX.2 [dev]'s tokenizer/ and text_encoder/: a Pixtral processor (Pixtral's image processor, a byte-level BPE
    tokenizer with Mistral's special tokens, a chat template) and a Mistral3ForConditionalGeneration (a one-layer
    Pixtral vision tower, a Mistral language model of width 12 with 30 layers: dev stacks layers 10, 20 and 30,
    3 x 12 = FLUX2_DEV_TEXT_DIM), as a diffusers FLUX.2 [dev] download holds them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                "[IMG_BREAK]", "[IMG_END]"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["tw", "two", "Ġp"]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                                   merges=[("t", "w"), ("tw", "o"), ("Ġ", "p")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer, patch_size=16, spatial_merge_size=2,
                     chat_template=MISTRAL3_CHAT_TEMPLATE).save_pretrained(folder / "tokenizer")
    torch.manual_seed(7)
    config = Mistral3Config(
        text_config=MistralConfig(vocab_size=len(tokenizer), hidden_size=12, intermediate_size=16,
                                  num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                  max_position_embeddings=1024),
        vision_config=PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, head_dim=4, image_size=32, patch_size=16),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    Mistral3ForConditionalGeneration(config).save_pretrained(folder / "text_encoder")
