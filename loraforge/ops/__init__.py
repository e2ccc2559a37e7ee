"""Pure operations on LoRA state dicts: read/write, inspect, resize, merge, extract.

Needs only torch and safetensors (``targets`` also uses loraforge.models' pure-string naming).
Import the submodules directly; this package imports nothing heavy by itself.
"""
