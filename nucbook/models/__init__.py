"Layer 3: network architectures (HoVer-Net, diffusion UNets)."
