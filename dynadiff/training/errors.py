"""The one error of training: the run cannot go on as configured (a one-line message saying what to do)."""


class TrainingError(RuntimeError):
    """The training cannot run or resume as configured."""
