"""para_core: PaRa (Parameter Rank Reduction) in pure torch + safetensors, no ComfyUI import.

W = W0 - s·Q(QᵀW0) with Q an orthonormal basis of a learned B (out x r).
"""
__version__ = "0.1.0"

import warnings  # noqa: E402

# torch's CPU wheels do not install numpy, which para_core does not need; torch then warns on import
# ("Failed to initialize NumPy"), which would be a second line on every `para` error.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from .basis import orthonormal_basis, orthonormality_error, principal_angle_cosines, span_union  # noqa: E402
from .errors import ParaError, ParaFormatError, ParaRankError, ParaShapeError  # noqa: E402
from .format import MatchReport, ParaModel, match_modules  # noqa: E402
from .lora import combine_delta, combine_factors  # noqa: E402
from .merge import merge, merge_sequential, merge_union, subspace_overlap  # noqa: E402
from .projection import apply_stages_, project_out, project_out_, projection_delta  # noqa: E402

__all__ = [
    "ParaModel", "MatchReport", "match_modules", "ParaError", "ParaFormatError", "ParaRankError", "ParaShapeError",
    "orthonormal_basis", "orthonormality_error", "principal_angle_cosines", "span_union",
    "project_out", "project_out_", "projection_delta", "apply_stages_",
    "merge", "merge_sequential", "merge_union", "subspace_overlap", "combine_factors", "combine_delta",
]
