"Layer 1: the sample type, synthetic H&E, dataset manifests and loaders, fetch/verify, crops and windows."
from .sample import *
from .synth import *
from .datasets import *
from .crops import *
