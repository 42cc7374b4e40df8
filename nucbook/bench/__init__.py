"Layer 6: splits, training and evaluating one row, summaries next to a paper's numbers, reports over the runs of a batch: what every paper notebook calls."
from .protocol import *
from .report import *
