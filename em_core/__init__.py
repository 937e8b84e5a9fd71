"""em-lab core: the science and plumbing behind the MLflow entry points."""

__version__ = "0.1.0"
