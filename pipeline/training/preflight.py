"""Everything about a run that can be checked before a model loads or a process group starts.

A wrong model path, an unwritable run directory, a DeepSpeed JSON that is missing, shards that are missing or
hold another kind of data, more loader readers than shards, `nccl` on a machine without GPUs, a feature layer
the tower does not have: each of these would otherwise surface after the model load (tens of seconds for an 8B
LLM), on every rank, as a traceback; so would features cached with another tower, layer or shape, and a backbone of a
family the pipeline does not load. Here each is one `ConfigError` or `DataError` line that names the key, the
file or the shard and what to do. The checks read small files only (model configs, the first record of a shard),
so they take well under a second, and they write nothing.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, gradient_accumulation_steps
from pipeline.data.shards import DataError, check_enough_shards, expand_shards, is_remote, iter_shard_records

# Keys in the DeepSpeed JSON that the trainer fills in from the run config; a JSON value other than "auto" for
# one of them would silently disagree with the config, so it is an error.
MANAGED_DS_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
)
# A Hugging Face hub id: "name" or "organisation/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class RankError(ConfigError):
    """A problem of this rank's own machine (its GPU, say), which the other ranks may not share."""


def preflight(config: RunConfig, world_size: int, local_rank: int = 0) -> None:
    """Raise `ConfigError` or `DataError` (one line each) for the first problem found; write nothing."""
    gradient_accumulation_steps(config, world_size)
    check_backend(config.train.distributed_backend, local_rank)
    check_run_dir(config.run_dir)
    read_deepspeed_json(config.train.deepspeed_config)
    images = config.data.input == "images"
    llm_dir = model_directory("model.llm.model", config.model.llm.model, _TOKENIZER_FILES)
    check_llm(llm_dir, config)
    # A run on cached features never loads the tower, but its config sizes the resampler and checks the cache.
    wanted = ("preprocessor_config.json",) if images else ("config.json",)
    vision_dir = model_directory("model.vision.model", config.model.vision.model, wanted)
    check_vision_family(vision_dir)
    check_feature_layer(vision_dir, config.model.vision.feature_layer)
    source = config.model.stage1_resampler
    if config.stage == 2 and source and not Path(source).exists():
        raise ConfigError(f"model.stage1_resampler '{source}' does not exist; point at a stage-1 run or its export/")
    check_shards(config, world_size)


def check_backend(backend: str, local_rank: int) -> None:
    if backend != "nccl":
        return
    import torch  # only here: gloo runs need no CUDA query

    if not torch.cuda.is_available():
        raise RankError(
            "train.distributed_backend=nccl needs GPUs, and this machine has none; on a CPU machine use "
            "train.distributed_backend=gloo"
        )
    if local_rank >= torch.cuda.device_count():
        raise RankError(
            f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at most that many "
            "processes per node (NPROC, or --gpus-per-node on Slurm)"
        )


def check_run_dir(run_dir: str) -> None:
    """The run directory exists as a directory or can be created, and files can be written there."""
    path = Path(run_dir).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run_dir '{run_dir}': '{existing}' is a file, not a directory; choose another run_dir")
    try:
        # A file that is gone as soon as it is closed: the only sure test of writability (root passes os.access).
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ConfigError(
            f"run_dir '{run_dir}' cannot be written: creating a file in '{existing}' failed ({error.strerror}); "
            "choose a writable run_dir"
        ) from None


def read_deepspeed_json(path_text: str) -> dict:
    """The DeepSpeed JSON of `train.deepspeed_config`, checked: it exists, parses, and leaves managed keys to us."""
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(
            f"train.deepspeed_config '{path}' does not exist; use ds_configs/zero2_stage1.json (stage 1) or "
            "ds_configs/zero2.json (stage 2), relative to the repository root"
        )
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed_config '{path}' is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config '{path}' must hold a JSON object, got {type(ds).__name__}")
    for key in MANAGED_DS_KEYS:
        if key in ds and ds[key] != "auto":
            raise ConfigError(
                f"train.deepspeed_config '{path}' sets '{key}'; batch sizes, optimizer, scheduler and clipping come "
                'from the run config, so set it to "auto" or remove it'
            )
    return ds


def model_directory(key: str, value: str, wanted: tuple[str, ...]) -> Path | None:
    """Where a model's files are on disk (a local directory or the Hub cache), or None when they will be downloaded.

    `value` is read as a local path when it exists, starts like a path or has more than one "/", else as a hub id.
    `wanted` are files of which the model needs at least one besides config.json (tokenizer or image processor).
    """
    path = Path(value).expanduser()
    if path.exists() or value.startswith(("/", "./", "../", "~")) or value.count("/") > 1:
        if not path.is_dir():
            raise ConfigError(
                f"{key} '{value}' was read as a local path, and there is no directory there; fix the path, or give "
                "a hub id such as meta-llama/Meta-Llama-3-8B-Instruct"
            )
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key} '{value}' (read as a local path) has no config.json; point at the directory that "
                "save_pretrained or data_prep/fetch_weights.sh wrote"
            )
        if not any((path / name).is_file() for name in wanted):
            raise ConfigError(f"{key} '{value}' (read as a local path) has none of {', '.join(wanted)}")
        return path
    if not _HUB_ID.match(value):
        raise ConfigError(
            f"{key} '{value}' is neither an existing directory nor a hub id of the form organisation/name; fix it"
        )
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(value, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{key} '{value}' was read as a hub id; it is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
            "forbids downloading it: give its local directory, or fetch it first (data_prep/fetch_weights.sh)"
        )
    return None


def check_feature_layer(vision_dir: Path | None, feature_layer: int) -> None:
    """model.vision.feature_layer indexes the tower's hidden states: the embeddings, then one per layer."""
    if vision_dir is None:
        return
    config = json.loads((vision_dir / "config.json").read_text())
    # A full CLIP/SigLIP config nests the tower's settings; a vision-only one has them at the top.
    layers = config.get("vision_config", config).get("num_hidden_layers")
    if not isinstance(layers, int):
        return
    if not -(layers + 1) <= feature_layer <= layers:
        raise ConfigError(
            f"model.vision.feature_layer={feature_layer} is out of range for the {layers}-layer tower "
            f"in {vision_dir}; use a value in [-{layers + 1}, {layers}] (-2 is the penultimate layer)"
        )


def check_vision_family(vision_dir: Path | None) -> None:
    """The tower is of a family `pipeline.model.vision.TOWERS` loads."""
    if vision_dir is None:
        return
    from pipeline.model.vision import UnsupportedTower, tower_family

    try:
        tower_family(json.loads((vision_dir / "config.json").read_text()).get("model_type", ""))
    except UnsupportedTower as error:
        raise ConfigError(f"{error} ({vision_dir})") from None


def check_llm(llm_dir: Path | None, config: RunConfig) -> None:
    """The LLM is of a family `pipeline.model.llm.LLM_FAMILIES` knows, and a sliding window, where it has one, holds
    the longest packed sample that varlen attention would attend to."""
    if llm_dir is None:
        return
    from transformers import AutoConfig

    from pipeline.model.attention import VARLEN, check_window
    from pipeline.model.llm import UnsupportedLLM, llm_family, sliding_window

    llm_config = AutoConfig.from_pretrained(llm_dir)
    try:
        llm_family(llm_config.model_type)
    except UnsupportedLLM as error:
        raise ConfigError(f"{error} ({llm_dir})") from None
    model = config.model
    if model.packing and model.llm.attn_implementation == VARLEN:
        stage1 = 1 + model.resampler.num_latents + model.max_caption_tokens
        try:
            check_window(sliding_window(llm_config), stage1 if config.stage == 1 else model.max_sequence_tokens)
        except ValueError as error:
            raise ConfigError(f"model.llm.model '{model.llm.model}': {error}") from None


def check_feature_cache(entry: dict, shard: str, where: str, config: RunConfig) -> None:
    """Cached features (the first sample's "feature_cache" entry) come from this run's tower, layer and shape.

    The tower is compared by family and architecture (`tower_signature`), so a cache made from the same checkpoint
    at another path is accepted; a cache that predates that record is compared by model path."""
    vision = config.model.vision
    vision_dir = model_directory("model.vision.model", vision.model, ("config.json",))
    if vision_dir is None:
        return
    from transformers import AutoConfig

    from pipeline.data.features import expected_feature_shape
    from pipeline.model.vision import hidden_state_index, tower_signature, vision_config_of

    tower_config = AutoConfig.from_pretrained(vision_dir)
    layers = vision_config_of(tower_config).num_hidden_layers
    ours = {
        "tower": tower_signature(tower_config) if "tower" in entry else vision.model,
        "hidden state": hidden_state_index(vision.feature_layer, layers),
        "shape": list(expected_feature_shape(str(vision_dir))),
    }
    cached = {
        "tower": entry.get("tower", entry.get("model")),
        "hidden state": entry.get("hidden_state_index"),
        "shape": entry.get("shape"),
    }
    differences = [name for name in ours if cached[name] != ours[name]]
    if differences:
        raise DataError(
            f"'{where}': {shard} holds features of {entry.get('model')} (feature_layer {entry.get('feature_layer')}, "
            f"shape {cached['shape']}), but this run's model.vision is {vision.model} (feature_layer "
            f"{vision.feature_layer}, shape {ours['shape']}); their {' and '.join(differences)} differ: recache with "
            "data_prep/cache_features.sh and this config, or set model.vision to the cache's tower"
        )


def check_shards(config: RunConfig, world_size: int) -> None:
    """Every shard spec matches files; each source has a shard per reader and holds the kind of data the run reads."""
    data = config.data
    readers_per_rank = max(1, data.num_workers)
    for i, source in enumerate(data.sources):
        where = f"data.sources[{i}].shards"
        shards = expand_shards(source.shards, where, data.allow_missing_shards)
        check_enough_shards(shards, world_size * readers_per_rank, where, world_size, readers_per_rank)
        check_shard_contents(shards[0], where, config)
    if data.val_shards:
        check_shard_contents(
            expand_shards(data.val_shards, "data.val_shards", data.allow_missing_shards)[0], "data.val_shards", config
        )
    if config.logging.sample_shards:
        expand_shards(config.logging.sample_shards, "logging.sample_shards", data.allow_missing_shards)


def _has_conversation(members: dict[str, bytes]) -> bool:
    """Whether KEY.json holds a LLaVA conversation (img2dataset's KEY.json holds download metadata instead)."""
    try:
        return "conversations" in json.loads(members.get("json", b"{}"))
    except (ValueError, TypeError):
        return False


def check_shard_contents(shard: str, where: str, config: RunConfig) -> None:
    """The first record of `shard` has the members this run decodes (remote or unreadable shards are left to the
    loader, which skips and counts what it cannot read)."""
    if is_remote(shard):
        return
    from pipeline.data.captions import IMAGE_MEMBERS
    from pipeline.data.features import FEATURES_MEMBER

    try:
        _, members = next(iter_shard_records(shard))
    except Exception:  # empty, unreadable or truncated: bad_tar is the loader's to count
        return
    found = sorted(members)
    has_image = any(name in members for name in IMAGE_MEMBERS)
    has_features = FEATURES_MEMBER in members
    if config.stage == 2:
        if not (has_image and _has_conversation(members)):
            kind = "caption shards of stage 1" if "txt" in members else "not conversation shards"
            raise DataError(
                f"'{where}': the first sample of {shard} has members {found}, {kind}; stage 2 reads an image and "
                "a LLaVA conversation (KEY.json) per sample: convert with data_prep/llava_to_shards.sh"
            )
        return
    if config.data.input == "features" and not has_features:
        hint = "set data.input=images or point" if has_image else "point"
        raise DataError(
            f"'{where}': the first sample of {shard} has members {found}, but data.input=features reads cached "
            f"features ({FEATURES_MEMBER}); {hint} at shards written by data_prep/cache_features.sh"
        )
    if config.data.input == "features":
        try:
            entry = json.loads(members.get("json", b"{}")).get("feature_cache")
        except (ValueError, AttributeError):
            entry = None
        if isinstance(entry, dict):
            check_feature_cache(entry, shard, where, config)
    if config.data.input == "images" and not has_image:
        hint = "set data.input=features or point" if has_features else "point"
        raise DataError(
            f"'{where}': the first sample of {shard} has members {found}, but data.input=images reads an image "
            f"({', '.join(IMAGE_MEMBERS)}); {hint} at image shards written by data_prep/img2dataset.sh"
        )
    if "txt" not in members:
        raise DataError(
            f"'{where}': the first sample of {shard} has members {found} and no caption (KEY.txt); stage 1 reads "
            "image-caption shards (conversation shards are for pipeline.train_stage2)"
        )
