"""OmniGen2, for the ComfyUI nodes only: its LoRA layout (UMO_OmniGen2's peft keys) and its reference rule. It is not
a trainable backbone (no loading or sampling here)."""
