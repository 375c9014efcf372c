"""Prefetch Hugging Face Hub models into a local directory, so compute nodes load them without network.

    python -m pipeline.prep.weights --out-dir /data/weights --config configs/stage1_8b.yaml
    python -m pipeline.prep.weights --out-dir /data/weights --config configs/stage1_siglip2_qwen3_8b.yaml
    python -m pipeline.prep.weights --out-dir /data/weights --config configs/stage1_70b.yaml
    python -m pipeline.prep.weights --out-dir /data/weights openai/clip-vit-large-patch14 org/other-model

The recipes' models: openai/clip-vit-large-patch14 and meta-llama/Meta-Llama-3-8B-Instruct (configs/stage[12]_8b.yaml),
openai/clip-vit-large-patch14 and meta-llama/Meta-Llama-3-70B-Instruct (configs/stage1_70b.yaml; about 132 GiB of
safetensors in 30 shards), google/siglip2-so400m-patch14-384 and Qwen/Qwen3-8B (configs/stage*_siglip2_qwen3_8b.yaml);
any other Hub id of a supported family works the same way (README, "Supported backbones").

Each model lands in OUT_DIR/<org>/<name> (e.g. /data/weights/meta-llama/Meta-Llama-3-8B-Instruct) through
`huggingface_hub.snapshot_download`, which resumes interrupted files and checks their sizes; a prefetch.json there
records the repository, the commit and the endpoint. Only the weights transformers loads are fetched: when a repo
has safetensors, its duplicate .bin / TensorFlow / Flax / ONNX copies and Meta's original/ checkpoint are skipped
(--all-files fetches everything). Before any download, the sizes the Hub reports for exactly those files, less the
files already complete in the target directory (a resumed fetch), are compared with the free space of its filesystem:
a model that does not fit stops the command with a one-line error. The command prints the config overrides that point
a run at the local copies; training given local directories sets HF_HUB_OFFLINE=1 itself (`pipeline.prep.offline`).

Gated models (meta-llama/* and others; the SigLIP2 and Qwen3 models are not): the Hub serves their files only to an
account that has accepted the model's licence, and each model has its own page. Once per model: open
https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct (for configs/stage1_70b.yaml also
https://huggingface.co/meta-llama/Meta-Llama-3-70B-Instruct) while logged in, accept the Meta Llama 3 Community
License and wait for approval (shown on that page and by e-mail). Once: create a token with read access at
https://huggingface.co/settings/tokens; then `export HF_TOKEN=hf_...` or run `hf auth login` (which stores it in
~/.cache/huggingface/token). Without a token, with a rejected one, or without approval the command stops with a
one-line error that says which.

HF_ENDPOINT selects another Hub endpoint or a mirror (tests point it at a loopback server).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("pipeline.prep.weights")

DEFAULT_ENDPOINT = "https://huggingface.co"
# Organisations whose every model is gated; checked before any request so that a missing token fails at once.
GATED_ORGANISATIONS = ("meta-llama/",)
# Copies of the same weights in formats the pipeline never loads, and Meta's original consolidated checkpoint.
SKIPPED_FORMATS = ["original/*", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot", "*.tflite"]
CONFIG_KEYS = ("model.vision.model", "model.llm.model")
GIB = 1 << 30
# Kept free beyond the files' own bytes. The client adds a small .metadata and .lock file per file under
# .cache/huggingface and every file ends in a partly used block (kilobytes each), and a filesystem filled to its last
# byte fails whatever writes there next (the run's checkpoints and logs); 1 GiB covers both and is under 1 % of a 70B.
SPACE_MARGIN_BYTES = GIB


class WeightsError(RuntimeError):
    """Why a model could not be prefetched and what to do; one line."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def local_dir_for(out_dir: Path, repo_id: str) -> Path:
    return out_dir.joinpath(*repo_id.split("/"))


def token_source() -> str:
    return "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the token saved by `hf auth login`"


def ignore_patterns(files: list[str], all_files: bool) -> list[str] | None:
    """The files snapshot_download skips; the free-space check counts what these patterns leave, so both agree."""
    if all_files:
        return None
    ignore = list(SKIPPED_FORMATS)
    if any(name.endswith(".safetensors") for name in files):
        ignore.append("*.bin")
    return ignore


def free_bytes(directory: Path) -> int:
    """Free bytes on the filesystem that will hold `directory`, which need not exist yet."""
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    return shutil.disk_usage(existing).free


def check_free_space(repo_id: str, siblings: list, ignore: list[str] | None, target: Path) -> None:
    """Raise WeightsError when the files still to fetch into `target` do not fit on its filesystem."""
    from huggingface_hub.utils import filter_repo_objects

    # An LFS file's lfs.size is the size of its content by definition; other files have only size.
    sizes = {sibling.rfilename: sibling.lfs.size if sibling.lfs else sibling.size for sibling in siblings}
    wanted = list(filter_repo_objects(sizes, ignore_patterns=ignore))
    if any(sizes[name] is None for name in wanted):
        log.info("%s: the Hub reported no file sizes; skipping the free-space check", repo_id)
        return
    # A file already there at its full size is kept by the resumed download; a partly fetched one counts whole (the
    # safe side: the check may ask for up to one file per download worker more than is needed).
    missing = [
        name for name in wanted if not (target / name).is_file() or (target / name).stat().st_size != sizes[name]
    ]
    if not missing:
        return
    needed = sum(sizes[name] for name in missing)
    free = free_bytes(target)
    log.info(
        "%s: %d files, %.1f GiB to fetch; %.1f GiB free for %s", repo_id, len(missing), needed / GIB, free / GIB, target
    )
    if needed + SPACE_MARGIN_BYTES > free:
        raise WeightsError(
            f"{repo_id} needs {needed / GIB:.1f} GiB (+{SPACE_MARGIN_BYTES / GIB:.0f} GiB spare) for "
            f"{len(missing)} files in {target}, but its filesystem has {free / GIB:.1f} GiB free: free space there or "
            f"choose another --out-dir"
        )


def explain(err: Exception, repo_id: str, has_token: bool) -> str:
    """One actionable line for a failure of the Hub client."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = endpoint()
    licence = f"{hub}/{repo_id}"
    login = f"create a read token at {hub}/settings/tokens and export HF_TOKEN=hf_... (or run `hf auth login`)"
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401 and has_token and "invalid credentials" in str(err).lower():
        return f"{hub} rejected the token from {token_source()}: it is invalid or expired; {login}"
    if isinstance(err, GatedRepoError):
        if not has_token:
            return f"{repo_id} is gated and no Hugging Face token is set: accept its licence at {licence}, then {login}"
        return (
            f"{repo_id} is gated and the account of the token from {token_source()} has no access yet: accept "
            f"the licence at {licence} and wait for approval, then re-run"
        )
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} has no such revision at {hub}; check --revision"
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"{repo_id} was not found at {hub}: check the id; if it is private or gated, use a token whose "
            f"account has access ({login})"
        )
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or type(err).__name__ in (
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "TimeoutException",
    ):
        return (
            f"cannot reach {hub} to fetch {repo_id}: run this on a machine with internet access (a login node), "
            f"or set HF_ENDPOINT to a reachable mirror"
        )
    if isinstance(err, HfHubHTTPError):
        return f"{hub} refused {repo_id}: {' '.join(str(err).split())[:300]}; check the id and your access"
    return f"fetching {repo_id} from {hub} failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}"


def prefetch(repo_id: str, out_dir: Path, revision: str | None = None, all_files: bool = False) -> Path:
    """Download one model repository into OUT_DIR/<org>/<name>; returns that directory."""
    from huggingface_hub import HfApi, get_token, snapshot_download

    token = get_token()
    hub = endpoint()
    if token is None and repo_id.startswith(GATED_ORGANISATIONS):
        raise WeightsError(
            f"{repo_id} is gated and no Hugging Face token is set: accept its licence at "
            f"{hub}/{repo_id}, then create a read token at {hub}/settings/tokens and export "
            f"HF_TOKEN=hf_... (or run `hf auth login`)"
        )
    target = local_dir_for(out_dir, repo_id)
    try:
        info = HfApi(endpoint=hub, token=token).model_info(repo_id, revision=revision, files_metadata=True)
        if info.gated and token is None:
            raise WeightsError(
                f"{repo_id} is gated and no Hugging Face token is set: accept its licence at "
                f"{hub}/{repo_id}, then create a read token at {hub}/settings/tokens and export "
                f"HF_TOKEN=hf_... (or run `hf auth login`)"
            )
        siblings = info.siblings or []
        ignore = ignore_patterns([sibling.rfilename for sibling in siblings], all_files)
        check_free_space(repo_id, siblings, ignore, target)
        log.info("%s @ %s: fetching into %s", repo_id, info.sha, target)
        # Pinning the commit keeps every file of the snapshot from the same revision.
        snapshot_download(
            repo_id, revision=info.sha, local_dir=target, endpoint=hub, token=token, ignore_patterns=ignore
        )
    except WeightsError:
        raise
    except Exception as err:  # the Hub client raises many types; each becomes one line
        raise WeightsError(explain(err, repo_id, token is not None)) from err
    if not (target / "config.json").is_file():
        raise WeightsError(f"{repo_id} was fetched into {target} but has no config.json; is it a transformers model?")
    (target / "prefetch.json").write_text(
        json.dumps(
            {
                "repo_id": repo_id,
                "commit": info.sha,
                "endpoint": hub,
                "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
            indent=2,
        )
        + "\n"
    )
    return target


def ids_from_config(path: Path) -> dict[str, str]:
    """{config key: hub id} for the run config's models that are not local directories already."""
    from pipeline.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as err:
        raise WeightsError(str(err)) from None
    models = {"model.vision.model": config.model.vision.model, "model.llm.model": config.model.llm.model}
    return {key: model for key, model in models.items() if not Path(model).is_dir()}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2"):  # one line per HTTP request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(
        prog="data_prep/fetch_weights.sh",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "repo_ids", nargs="*", metavar="REPO_ID", help="Hub model ids, e.g. openai/clip-vit-large-patch14"
    )
    parser.add_argument("--config", type=Path, help="also fetch this run config's model.vision.model / model.llm.model")
    parser.add_argument("--out-dir", type=Path, required=True, help="models go to OUT_DIR/<org>/<name>")
    parser.add_argument("--revision", help="branch, tag or commit (default: the main branch)")
    parser.add_argument("--all-files", action="store_true", help="also fetch duplicate weight formats and original/")
    args = parser.parse_args(argv)
    if not args.repo_ids and not args.config:
        parser.error("give model ids, --config FILE, or both")
    offline = [
        name
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
    ]
    if offline:
        print(
            f"error: {offline[0]} is set, but prefetching needs the Hub: unset it for this command "
            f"(env -u {offline[0]} data_prep/fetch_weights.sh ...) on a machine with internet access",
            file=sys.stderr,
        )
        return 2
    try:
        keyed = ids_from_config(args.config) if args.config else {}
        wanted = list(dict.fromkeys([*keyed.values(), *args.repo_ids]))
        fetched = {repo_id: prefetch(repo_id, args.out_dir, args.revision, args.all_files) for repo_id in wanted}
    except WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for repo_id, path in fetched.items():
        print(f"{repo_id} -> {path}")
    if keyed:
        overrides = " ".join(f"{key}={fetched[repo_id]}" for key, repo_id in keyed.items())
        print(f"train offline with: python -m pipeline.train --config {args.config} {overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
