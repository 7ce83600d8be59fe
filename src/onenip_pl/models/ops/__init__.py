"""Faster ways to run the architecture in models/, each behind an explicit switch; the maths is the same."""

from onenip_pl.models.ops.cpu_training import KERNEL_SWITCH, CPUTrainingKernels, training_kernels

__all__ = ["KERNEL_SWITCH", "CPUTrainingKernels", "training_kernels"]
