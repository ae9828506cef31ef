"""slimnp: compact recurrent neural language models with slim embeddings.

The public pieces, importable from the package root::

    LanguageModel, ModelConfig      the model (flat parameter/gradient buffers)
    Vocabulary                      vocabulary, fast file encoding
    Trainer, TrainConfig            truncated-BPTT training with checkpoints
    evaluate_ids                    exact perplexity of a token stream
    load, LM                        a model file for scoring and generation
    io                              the HDF5 model file (save, load, describe)
    layers, kernels                 pure forward/backward pairs, kernels
"""

from ._version import __version__  # noqa: F401

import os as _os

# OpenBLAS's worker threads spin for 2^28 cycles (~0.1 s) after each GEMM
# before they sleep; every Numba kernel between two GEMMs then shares the
# cores with them (measured, config B: the slim output layer's gather-sum
# took 32 ms instead of 17).  2^20 cycles (~0.3 ms) still bridges the gaps
# inside the LSTM time loop.  Read when NumPy loads OpenBLAS, so this only
# acts if slimnp is imported first (always, for the ``slimnp`` command);
# a value the user set wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
# Numba's thread pool: "workqueue", not OpenMP, whose workers spin after each
# parallel kernel and take the cores from the next GEMM (see kernels/cpu.py,
# which also sets it if Numba was imported before slimnp).
_os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

from . import io, kernels, layers  # noqa: E402
from .inference import LM, load  # noqa: E402
from .backend import get_xp, make_rng  # noqa: E402
from .data import Vocabulary  # noqa: E402
from .evaluate import EvalResult, evaluate_ids  # noqa: E402
from .model import LanguageModel, ModelConfig  # noqa: E402
from .modelfile import load_model  # noqa: E402
from .trainer import TrainConfig, Trainer  # noqa: E402

__all__ = ["LanguageModel", "ModelConfig", "Vocabulary", "Trainer", "TrainConfig", "EvalResult",
           "evaluate_ids", "load_model", "load", "LM", "io", "kernels", "layers", "get_xp", "make_rng"]
