"""chorus: many BERT-like tasks on one backbone, served on Triton."""
__version__ = "0.1.0"
