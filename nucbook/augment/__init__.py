"Layer 2: the augmentation interface, the composition canvas every pasting method uses, the instance bank, mixes."
from .canvas import *
from .mix import *
