"""Label conventions shared by the data that builds labels and the model that computes the loss from them."""

# A label the loss ignores: prompt, image and padding positions (the value PyTorch's cross entropy and HF use).
IGNORE_INDEX = -100
