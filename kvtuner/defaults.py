"""Every default of the pipeline, in one place: the cache, calibration, pruning, search, evaluation.

The CLI options, `make run` (scripts/run_main.py), scripts/reproduce.py and the README all read
these, so a default is changed here and nowhere else. Why each value was chosen is in the README
("Defaults"), with the measurement behind it.
"""

from __future__ import annotations

import os
from pathlib import Path

# -- the cache ------------------------------------------------------------------------------------
SCHEME = "per-token"
# channels per scale/zero of per-token groups (per-token K and V; KIVI V), at most head_dim
PER_TOKEN_GROUP_SIZE = 64
KIVI_GROUP_SIZE = 32
KIVI_BLOCK_SIZE = 32  # KIVI: tokens per per-channel key block
KIVI_RESIDUAL_LENGTH = 32  # KIVI: newest tokens kept in full precision
SINK_TOKENS = 4  # first tokens of the sequence kept in full precision (attention sinks)
# per-token groups see channels divided by their prompt-time peak magnitude (KIVI's keys are
# per channel already, and on its values smoothing helped 4 bits and hurt 2)
PER_TOKEN_SMOOTH = True
KIVI_SMOOTH = False
QUANTIZE_PREFILL = False  # the prompt's own forward sees exact keys and values


class _SchemeDefault:
    """A layout field left to its scheme's default (group size, smoothing)."""

    def __repr__(self) -> str:
        return "<scheme default>"


SCHEME_DEFAULT = _SchemeDefault()


def group_size(scheme: str) -> int:
    """The default channels per per-token group under `scheme`."""
    return KIVI_GROUP_SIZE if scheme == "kivi" else PER_TOKEN_GROUP_SIZE


def smooth(scheme: str) -> bool:
    """Whether per-token groups are channel-smoothed by default under `scheme`."""
    return KIVI_SMOOTH if scheme == "kivi" else PER_TOKEN_SMOOTH


# -- calibration ----------------------------------------------------------------------------------
CALIBRATION_SAMPLES = 8
CALIBRATION_SEQ_LEN = 512
QUERY_TOKENS = 64
CANDIDATE_BITS = (2, 4, 8)
# single-layer KL: samples of calibration text, each `context` tokens then one scored chunk
LAYER_KL_SAMPLES = 8
LAYER_KL_CONTINUATION = 32
ADDITIVITY_CONFIGS = 12  # random configs whose joint KL checks that single-layer KLs add up

# -- pruning and clustering -----------------------------------------------------------------------
TOLERANCE = 0.0
MAX_SPACE_SIZE = 100_000  # `kvtuner prune`: the most layer groups whose space stays under this
MIN_SAMPLES = 2  # DBSCAN, when `--eps` asks for the paper's clustering

# -- budgets --------------------------------------------------------------------------------------
BUDGET = "effective"  # or "equivalent" (the paper's mean of (k + v) / 2)
BUDGET_CONTEXT = 4096  # tokens at which effective bits are counted (batch 1)
BUDGET_DTYPE_BITS = 16  # effective bits count scales and full-precision parts at 16 bits
CAPS = (3.5, 4.0, 4.5, 5.0, 6.0)  # on the budget's axis: effective bits by default
ENGINE_CAPS = (4.5, 5.0, 6.0, 8.0)  # --target: effective bits of engine storage (16 = model dtype)

# -- search ---------------------------------------------------------------------------------------
TRIALS = 150
POPULATION = 20
SEARCH_SAMPLES = 4  # calibration-side samples a trial is scored on
SEARCH_CONTINUATION = 64  # scored tokens per search sample (two chunks)
RESCORE_SAMPLES = 8  # more calibration-side samples for the best candidates of each cap
RESCORE_TOP = 4  # candidates per cap re-scored before export

# -- evaluation -----------------------------------------------------------------------------------
EVAL_SAMPLES = 8
EVAL_CONTEXT = 512  # at least; longer on models whose sliding windows it would not fill
EVAL_CONTINUATION = 128
EVAL_CHUNK = 32
# contexts above this are evaluated on the long held-out text (kvtuner.data.heldout_text(long=True))
LONG_CONTEXT = 2048


def eval_context(windows: tuple[int | None, ...] | list[int | None] = ()) -> int:
    """Context tokens of an evaluation: `EVAL_CONTEXT`, or twice the widest sliding window when
    that is longer, so sliding-window layers hold a full window as they do in long generations
    (Gemma 3, window 512: 1024)."""
    widest = max((w for w in windows if w is not None), default=0)
    return max(EVAL_CONTEXT, 2 * widest)


def cache_home() -> Path:
    """Where kvtuner keeps what it builds once per machine: `$KVTUNER_CACHE_DIR`, default
    `~/.cache/kvtuner` (converted models in `models/`, the CPU decode kernel in `native/`)."""
    root = os.environ.get("KVTUNER_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvtuner"
