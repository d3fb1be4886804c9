"""skinray: train, tune and serve skin-disease image classifiers at cluster scale on Ray.

Importing the package is cheap: TensorFlow and Ray load only in the modules that need them, so the
data workers that decode and augment images never pay for TensorFlow.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """An error whose message tells the user what went wrong and what to do; shown without a
    traceback by the command line. Each stage subclasses it (ConfigError, ArchiveError, ...)."""
