"Layer 3: network architectures (HoVer-Net, diffusion UNets)."
from .adm import *
from .ctranspath import *
from .sdm import *
