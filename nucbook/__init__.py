"""Reproducible notebooks for generative data augmentation in nuclei instance segmentation.

Layers (subpackages), each importing only from the ones before it:

- `nucbook.core`: device, seeding, atomic writes, run folders, profiles, checkpoint I/O, random state, autocast.
- `nucbook.data`: the `Sample` type and its validator, synthetic H&E, manifests and loaders (registered datasets and
  your own folders), fetch/verify, the crop / pad / window module.
- `nucbook.augment`: the augmentation interface, the composition canvas and instance bank every pasting method uses,
  the mix baselines, GradMix and standard augmentation.
- `nucbook.eval`: metrics with HoVer-Net semantics, FID/KID, figures.
- `nucbook.models`: HoVer-Net, diffusion UNets.
- `nucbook.engine`: the resumable loop, the segmenter trainer, inference, diffusion training, sampling, inpainting.
- `nucbook.methods`: one module per paper (`insmix`); a method never imports another method.
- `nucbook.bench`: splits, training and evaluating one row, summaries and paper tables.
- `nucbook.cli`: `nucbook run / batch / fetch / verify`.

Importing `nucbook` touches no GPU and no network."""

__version__ = "0.1.0"
