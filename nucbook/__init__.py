"""Reproducible notebooks for generative data augmentation in nuclei instance segmentation

Modules:

- `nucbook.cli`: `nucbook run` executes a notebook with parameters into a run folder; `nucbook batch` runs a parameter grid and gathers the results; `nucbook fetch` / `nucbook verify` get and check datasets.
- `nucbook.sample`: The one sample type every loader returns and every augmentation, model and metric takes: an RGB image, an instance map with contiguous ids, and optional nucleus types.
- `nucbook.synth`: Procedurally generated H&E-like tiles with exact instance and type labels: the embedded default data of every nucbook notebook, since real datasets cannot be shipped."""

__version__ = "0.1.0"
