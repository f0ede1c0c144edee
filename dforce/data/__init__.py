"""Video in and out: decoding, sharded webdataset reading and writing, clips (pixels or VAE latents, with
their text), the training loader, synthetic bouncing balls, the VAE and the text encoder, and the commands
that turn video shards into latent or text shards. Imports nothing else of dforce."""
