"""Reproducible notebooks for generative data augmentation in nuclei instance segmentation

Modules:

- `nucbook.augment.canvas`: The composition canvas every augmentation that pastes, mixes, erases or replaces nuclei works on: one occlusion rule, one provenance record, and the instance bank of paste templates.
- `nucbook.augment.mix`: One interface for every augmentation in nucbook, and the mix-based baselines (MixUp, CutOut, CutMix, CowOut, CowMix, Copy-Paste, GradMix) written for instance segmentation with nucleus types.
- `nucbook.bench.protocol`: What every paper notebook calls: the train / test split of a dataset (registered, synthetic or your own folder) with a record of how it was made, training and scoring the common segmenter once per row and seed (resumable), mean ± std over seeds with deltas over the baseline, and a paper's numbers beside ours only where the segmenter is the same.
- `nucbook.cli`: `nucbook run` executes a notebook with parameters into a run folder; `nucbook batch` runs a parameter grid and gathers the results; `nucbook fetch` / `nucbook verify` get and check datasets.
- `nucbook.data.crops`: Cheap crops of valid samples (a slice and an id lookup table), mirror padding that gives mirrored nuclei new ids, random training crops, and random or sliding-window patches on one window geometry.
- `nucbook.data.datasets`: Dataset manifests, class maps (with the merges the papers use) and loaders for every dataset's native format, all returning `Sample`s through one call: `load_dataset(name, split, root)`.
- `nucbook.data.fetch`: Download a dataset listed in `data_manifests/`, resume partial downloads, check sizes and sha256, unpack it and move it into place atomically; or register a copy you already have. `verify` re-checks a dataset on disk.
- `nucbook.data.sample`: The one sample type every loader returns and every augmentation, model and metric takes: an RGB image, an instance map with contiguous ids, and optional nucleus types.
- `nucbook.data.synth`: Procedurally generated H&E-like tiles with exact instance and type labels: the embedded default data of every nucbook notebook, since real datasets cannot be shipped.
- `nucbook.engine.diffusion`: Unconditional and label-conditioned (semantic) patch diffusion models, their training loop with EMA and resumable checkpoints, DDIM sampling from noise or from a noised real patch, and classifier-free guidance: the machinery that NucleiMix (inpainting, see `nucbook.engine.inpaint`) and DiffMix (semantic synthesis) compose.
- `nucbook.engine.infer`: Sliding-window prediction of whole tiles (e.g. 1000x1000) in batches of overlapping windows, HoVer-Net post-processing into instance and type maps, and evaluation of a model on a list of samples.
- `nucbook.engine.inpaint`: Fill a masked region of an H&E patch with an unconditional diffusion model: RePaint-style resampling and the manifold-constrained gradient (MCG) sampler of NucleiMix. Known pixels are never changed.
- `nucbook.engine.loop`: One loop for every model nucbook trains: named state, checked settings, atomic checkpoints by step count or by time, exact resume after a crash, and time-limited chunks.
- `nucbook.engine.train`: A resumable trainer for nucleus segmentation models: random crops with exact labels, standard and plug-in augmentation, Adam with cosine warm restarts, bf16 and channels-last on GPU, per-epoch logs and validation, and DistributedDataParallel under `torchrun`, on the checkpointed loop of `nucbook.engine.loop`.
- `nucbook.eval.fid`: Fréchet and kernel Inception distances through torchmetrics, fed by our own feature extractors: the standard FID Inception-v3 in plain torch (comparable with published values when its weights file is present), or an offline random-feature network for tests and smoke runs (not comparable).
- `nucbook.eval.metrics`: Instance (Dice, AJI, AJI+, DQ/SQ/PQ, object and pixel F1), classification (F1_d, Acc, F1_c) and per-class panoptic metrics (mPQ, bPQ, mPQ+) with HoVer-Net's exact semantics, computed from one contingency table.
- `nucbook.eval.viz`: Looking at data: instance contours coloured by type, a per-dataset summary with the nucleus-size distribution, and a browser for JupyterLab.
- `nucbook.methods.insmix`: Copy-Paste-Smooth augmentation for nuclei instance segmentation: morphology-constrained (SSD) copy-paste from an instance bank, background perturbation, and a smooth-GAN that re-renders pasted nuclei in their new context.
- `nucbook.models.hovernet`: A HoVer-Net-style nucleus segmentation and classification model (Graham et al. 2019): a pre-activation ResNet encoder, nuclear-pixel (NP), horizontal-vertical distance (HV) and optional type (TP) decoders, HoVer-Net's targets and losses, and its marker-controlled watershed post-processing.
- `nucbook.models.unet`: The noise-prediction networks of the diffusion-based papers: diffusers' unconditional `UNet2DModel` in named sizes, and an SDM-style label-conditioned UNet (SPADE in the decoder) for semantic synthesis."""

__version__ = "0.1.0"
