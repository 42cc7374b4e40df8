"Layer 1: the sample type, synthetic H&E, dataset manifests and loaders, fetch/verify, crops and windows, the field's formats (PanNuke, CoNIC, Lizard; CoNIC and HoVer-Net writers)."
from .sample import *
from .synth import *
from .datasets import *
from .crops import *
from .formats import *
