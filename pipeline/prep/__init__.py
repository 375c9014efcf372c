"""Getting the real inputs onto disk from a machine with internet (a login node), so training runs offline.

- `download`: resumable, verified HTTP downloads shared by the data commands below.
- `weights`: prefetch Hub models (CLIP ViT-L/14, LLaMA-3-8B-Instruct, or a run config's models) into a directory.
- `laion`: fetch LAION metadata parquets, filter them, hand the result to `data_prep/img2dataset.sh`.
- `llava_coco`: LLaVA-Instruct-150K, COCO train2017 / val2014, the Karpathy split and VQAv2 into one layout.
- `offline`: `enforce_offline`, which keeps a training job off the network when its models are local.

docs/real_data.md walks through them in order.
"""
