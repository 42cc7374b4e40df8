"""Reproducible notebooks for generative data augmentation in nuclei instance segmentation

Modules:

- `nucbook.sample`: The one sample type every loader returns and every augmentation, model and metric takes: an RGB image, an instance map with contiguous ids, and optional nucleus types.
- `nucbook.synth`: Procedurally generated H&E-like tiles with exact instance and type labels: the embedded default data of every nucbook notebook, since real datasets cannot be shipped."""

__version__ = "0.1.0"
