"""Keep a training job off the network when its models are already on disk.

Compute nodes on many clusters have no internet: a Hub lookup there hangs until a timeout or fails late. When
every model path of a run is a local directory (see `pipeline.prep.weights`), `enforce_offline` sets
HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 before any model loads, so huggingface_hub and transformers never
try the network and a missing file fails at once with a local-path error.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def enforce_offline(model_paths: list[str]) -> bool:
    """Switch the Hub client to offline mode if every path is a local directory; returns whether it did."""
    remote = [path for path in model_paths if not Path(path).is_dir()]
    if not model_paths:
        return False
    if remote:
        log.info(
            "not forcing offline mode: not local directories, so loaded from the Hub or its cache: %s; "
            "prefetch them with data_prep/fetch_weights.sh to run without network",
            ", ".join(remote),
        )
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # huggingface_hub reads the variable once, at import; a client imported earlier must be told directly.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    log.info(
        "all models are local directories (%s): HF_HUB_OFFLINE=1, the Hub will not be contacted", ", ".join(model_paths)
    )
    return True
