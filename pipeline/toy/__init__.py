"""The toy world: synthetic captioned images, a loopback HTTP server to download them, and tiny models.

It lets the whole pipeline run end to end on a CPU with no weights and no internet: `world` draws the images
and captions, `http_server` serves them to img2dataset, and `models` builds a tiny CLIP vision tower and a tiny
pretrained Llama in Hugging Face format.
"""
