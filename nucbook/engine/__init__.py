"Layer 4: the resumable loop, the segmenter trainer, inference, diffusion training, sampling and inpainting."
