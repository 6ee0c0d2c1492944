"""Experiment and benchmark commands of the ``ttspec`` CLI; each writes its results as JSON."""
