"""loraforge: train LoRA-family adapters for Stable Diffusion from one YAML recipe."""

__version__ = "0.1.0"
