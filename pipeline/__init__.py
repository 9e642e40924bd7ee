"""The Keras IMDB movie-review tutorial as a tracked, swept and servable pipeline (pipeline/train.py tells one run)."""

import time

STARTED = time.time()  # when this process began its work: the start time of its first run in MLflow
