"""Job rendering for `vlpt launch`: torchrun / DeepSpeed on this machine, Slurm sbatch, Kubeflow PyTorchJob."""
from cluster.launch import launch, render_job
from cluster.local import render_command

__all__ = ["launch", "render_command", "render_job"]
