"""minialign: LoRA, SFT and DPO for small causal language models."""

__version__ = "0.1.0"
