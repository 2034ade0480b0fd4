"""crucible-record: record every training step of a small LM into a compressed Zarr v3 store."""

__version__ = "0.1.0"

from .errors import CrucibleError, RecorderError  # noqa: E402
from .recorder import Recorder  # noqa: E402
from .trajectory import Trajectory, open  # noqa: E402,A004

__all__ = ["CrucibleError", "Recorder", "RecorderError", "Trajectory", "open", "__version__"]
