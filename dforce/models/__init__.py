"""The networks: block-causal attention and its KV cache, our causal video transformer, diffusers' Wan 2.1 /
SkyReels-V2 transformer driven as the same backbone, LoRA adapters, and the `Backbone` interface. A model
knows nothing of noise: it takes timesteps and returns a prediction."""
