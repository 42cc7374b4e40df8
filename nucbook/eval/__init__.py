"Layer 2: metrics (Dice, AJI, PQ, classification), FID/KID, figures."
from .metrics import *
