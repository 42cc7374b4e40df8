"Layer 6: splits, training and evaluating one row, summaries next to a paper's numbers, reports over the runs of a batch: what every paper notebook calls. The benchmark of every method (`nucbook.bench.benchmark`) is imported by its full name: it imports every method."
from .protocol import *
from .report import *
