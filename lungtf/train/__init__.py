"""Training: ``python -m lungtf.train`` fine-tunes, compares and picks the best backbone.

Modules:
    cli: the command line and ``main(argv)`` (config resolution, run directory, resume).
    prepare: find the data, check files, make or read the grouped split.
    fit: the two-phase recipe (frozen head, then all layers) of one backbone, resumable.
    lr_find: exponential learning-rate sweep with a plot and a suggestion.
    callbacks: resumable history, phase-aware backup, best checkpoint, throughput, curves.
    compare: comparison table, best-model rule, ``best/`` packaging and uncertainty threshold.
    runtime: GPU detection, preset choice, mixed precision, XLA and distribution strategy.
    multiworker: roles from TF_CONFIG, worker directories, agreement with the chief.
    isolate: each backbone in a child process of its own (XLA's compilation cache ends with it).
"""

from lungtf.train.cli import main

__all__ = ["main"]
