"Layer 6: splits, training and evaluating one row, summaries next to a paper's numbers: what every paper notebook calls."
from .protocol import *
