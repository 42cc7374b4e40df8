"Layer 2: the augmentation interface, the composition canvas every pasting method uses, the instance bank, mixes, the standard augmentation, Gong et al.'s pre-synthesis and the cell collections and operations of semantic-aware augmentation (`nucbook.augment.cells`, imported by its full name: its `collections` would shadow the standard module)."
from .canvas import *
from .standard import *
from .mix import *
from .presynth import *
