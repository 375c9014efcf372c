"""The README's configuration examples work as written.

Every training command in a bash block of README.md and launch/README.md (launch scripts, sbatch lines, `python -m
pipeline.train*`), every inline `key=value` override and every YAML example resolve through `load_config` exactly as a
user would type them: the shell's quoting (shlex), then YAML values, then validation. Shards and models need not
exist for that, which is what lets these cluster commands be checked on any machine.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, gradient_accumulation_steps, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "launch" / "README.md"]
OVERRIDE = re.compile(r"^(stage|run_dir|model|data|optim|train|logging)(\.[A-Za-z_0-9\[\]]+)*=")
TRAINING = ("pipeline.train", "stage1_local.sh", "stage2_local.sh", "stage1.sbatch", "stage2.sbatch")


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def training_commands() -> list[tuple[str, str]]:
    """(where, command) of every command in a bash block that starts training with a config file."""
    commands = []
    for doc in DOCS:
        for block in fenced_blocks(doc.read_text(), "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                if any(name in token for token in tokens for name in TRAINING) and any(
                    token.endswith(".yaml") for token in tokens
                ):
                    commands.append((doc.name, line.strip()))
    return commands


def inline_overrides() -> list[tuple[str, str]]:
    """(where, override) of every inline code span that is a complete `key=value` override."""
    found = []
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", doc.read_text()):
            if "…" in span or "<" in span:
                continue  # a pattern with a placeholder, not an example to type
            tokens = shlex.split(span)
            if len(tokens) == 1 and OVERRIDE.match(tokens[0]):
                found.append((doc.name, tokens[0]))
    return found


def resolve(config: str, overrides: list[str]):
    return load_config(ROOT / config, overrides)


def test_the_docs_hold_examples_to_check():
    assert len(training_commands()) >= 5 and len(inline_overrides()) >= 5


def world_size(tokens: list[str]) -> int:
    """Ranks the command starts: GPUs per node (8 unless --gpus-per-node says) x nodes (sbatch's --nodes, else 1)."""
    options = {}
    for index, token in enumerate(tokens):
        if token.startswith("--") and "=" in token:
            name, value = token[2:].split("=", 1)
            options[name] = value
        elif token.startswith("--") and index + 1 < len(tokens):
            options[token[2:]] = tokens[index + 1]
    if any(token.startswith("pipeline.train") for token in tokens) and tokens[0].startswith("python"):
        return 1
    return int(options.get("nodes", 1)) * int(options.get("gpus-per-node", 8))


@pytest.mark.parametrize("where, command", training_commands())
def test_training_command_resolves(where, command):
    """The config and overrides resolve, and the global batch divides over the ranks the command starts."""
    tokens = shlex.split(command, comments=True)
    config_index = next(i for i, token in enumerate(tokens) if token.endswith(".yaml"))
    overrides = [token for token in tokens[config_index + 1 :] if "=" in token and not token.startswith("-")]
    gradient_accumulation_steps(resolve(tokens[config_index], overrides), world_size(tokens))


@pytest.mark.parametrize("where, override", inline_overrides())
def test_inline_override_resolves(where, override):
    """Each override is valid for at least one of the recipes (stage-2 keys for the stage-2 recipe)."""
    errors = []
    for config in ("configs/stage1_8b.yaml", "configs/stage2_8b.yaml"):
        try:
            resolve(config, [override])
            return
        except ConfigError as error:
            errors.append(str(error))
    pytest.fail(f"{where}: {override}: {errors}")


def test_yaml_examples_build(tmp_path):
    examples = [block for doc in DOCS for block in fenced_blocks(doc.read_text(), "yaml")]
    assert examples
    for example in examples:
        config = yaml.safe_load((ROOT / "configs/stage1_8b.yaml").read_text())
        for section, values in yaml.safe_load(example).items():
            config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
        path = tmp_path / "example.yaml"
        path.write_text(yaml.safe_dump(config))
        load_config(path)
