"""FTTE core: the training engine shared by hub and agent."""
from . import _kernels  # noqa: F401
