"""The model: its shape (config.py, no torch), the Transformer, generation, the HF mapping.

Import from the modules themselves (`sheepop.model.transformer`); this package imports
nothing, so reading a ModelConfig never loads torch."""
