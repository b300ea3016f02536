"""defectscope: unsupervised visual inspection with SPADE, PaDiM and PatchCore."""

__version__ = "0.1.0"
