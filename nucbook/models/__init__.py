"Layer 3: network architectures (HoVer-Net, diffusion UNets, CTransPath, ADM, SDM, the AdaIN generator with its VGG-19 encoder, the WAE-MMD cell autoencoder)."
from .adm import *
from .ctranspath import *
from .sdm import *
from .adain import *
from .wae import *
