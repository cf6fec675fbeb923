"""Training: data -> labels, collation, LoRA, the SFT loop, checkpoints, recipes."""
