"""Stage-2 training entry point: `python -m pipeline.train_stage2 --config configs/stage2_8b.yaml [key=value ...]`.

Instruction tuning on image conversations: the stage-1 resampler (`model.stage1_resampler`) and LoRA adapters on
the LLM train, the LLM's base weights stay frozen in bf16 or 4-bit (`model.llm.quantization: nf4`, QLoRA). It is
`pipeline.train`'s story with the stage-2 parts (`pipeline.training.stages.InstructStage`, conversation shards from
`data_prep/llava_to_shards.sh`): the same launchers, config system, token-normalised loss, checkpoints, exact resume,
stop signals, validation and logging. At the end, `<run_dir>/export/` holds the adapter (peft format), the resampler
and a manifest (see `pipeline.inference.export`); then `<run_dir>/FINISHED` is written.
"""

from __future__ import annotations

import sys

from pipeline.train import main as train_main


def main(argv=None) -> int:
    return train_main(argv, stage=2)


if __name__ == "__main__":
    sys.exit(main())
