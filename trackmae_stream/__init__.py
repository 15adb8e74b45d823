"""trackmae_stream: streaming TrackMAE pretraining (masked video modelling with point-track motion targets)."""
import os as _os

__version__ = "0.1.0"

# `kernels/` sits at the repository top level and pyproject.toml installs it as `trackmae_stream.kernels`. From a source
# tree without installing (PYTHONPATH=., as on a lent GPU machine), the same name must resolve to that folder: add the
# repository root to this package's search path, but only when the package has no `kernels` of its own and the folder
# beside it is this project's (it holds motion.py), never an unrelated `kernels` distribution in site-packages.
_here = _os.path.dirname(__file__)
_root = _os.path.dirname(_here)
_in_source_tree = _os.path.isfile(_os.path.join(_root, "kernels", "motion.py"))
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _in_source_tree:
    __path__.append(_root)  # noqa: F821 - the package's own __path__
