"""Launch-command rendering: the same `vlpt pretrain` under torchrun or the DeepSpeed launcher."""
from cluster.launch import render_command

__all__ = ["render_command"]
