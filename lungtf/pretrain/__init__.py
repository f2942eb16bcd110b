"""Self-supervised pretraining: ``python -m lungtf.pretrain`` (SimSiam) writes backbone weights
that ``python -m lungtf.train --weights PATH`` fine-tunes.

Modules:
    cli: the command line, ``main(argv)`` and ``pretrain`` (one backbone, resumable).
    simsiam: the SimSiam model, its loss (stop-gradient, symmetric) and the collapse monitor.
    views: two independently augmented views per tile on the project's ``tf.data`` pipeline.
"""

from lungtf.pretrain.cli import main

__all__ = ["main"]
