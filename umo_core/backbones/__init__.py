"""The generator side: one subpackage per backbone (model loading, key tables, run-time calls, text
encoders), plus what backbones share: LoRA file layouts and reference-image preparation."""
