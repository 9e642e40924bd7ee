"""The Keras IMDB movie-review tutorial as a tracked, swept and servable pipeline (pipeline/train.py tells one run)."""

import time

STARTED = time.time()  # when this process began its work: the start time of its first run, under python -m pipeline
COMMAND_LINE = False  # python -m pipeline sets it: the process is the command line's (its start, signals, console, gc)
