"Layer 0: device choice, seeding, atomic writes, run folders, checkpoint I/O and random state. Imports nothing of nucbook."
from .base import *
