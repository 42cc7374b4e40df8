"Layer 2: the augmentation interface, the composition canvas every pasting method uses, the instance bank, mixes, and the standard augmentation."
from .canvas import *
from .standard import *
from .mix import *
