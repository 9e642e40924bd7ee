"""Garbage collection for `python -m pipeline` (freeze_gc): off while the libraries import, then on again.

The imports (Hydra, MLflow, TensorFlow, Keras) make millions of objects and no garbage. `python -m pipeline`
pauses the collector from its start; once TensorFlow is loaded, its objects are frozen out of the
collector's sight (the collection at exit over them took 3 s of every run) and collection resumes. Only the
command line pauses it: `train(cfg)` called from a notebook or another program leaves the collector alone.
"""

from __future__ import annotations

import gc


class Collection:
    def __init__(self) -> None:
        self.paused = False

    def pause(self) -> None:
        """No collection until `resume` (the command line, from its first line)."""
        gc.disable()
        self.paused = True

    def resume(self, freeze: bool) -> None:
        """Collection on again, if `pause` turned it off; `freeze`: what exists now is never collected."""
        if self.paused:
            if freeze:
                gc.freeze()
            gc.enable()
            self.paused = False


COLLECTION = Collection()
