"""The code files of an exported Hugging Face model directory (`python -m pipeline.export_hf`).

`configuration_anymal.py`, `modeling_anymal.py` and `processing_anymal.py` are copied as they are into the export,
where transformers loads them with `trust_remote_code=True`. They import only torch, transformers (and peft for an
unmerged adapter), never `pipeline`, so that the export works in a Python without this repository. They use only
transformers API present in every release that requirements.txt allows, the oldest included, so that an export made
with one release loads with another (tests/test_export_hf.py lists the transformers names they may import).
"""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent
TEMPLATE_FILES = ("configuration_anymal.py", "modeling_anymal.py", "processing_anymal.py")
