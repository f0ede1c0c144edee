"""Video shards -> latent shards through a diffusers VAE; the same as `dforce encode-latents`."""

import sys

from dforce.cli import main

if __name__ == "__main__":
    main(["encode-latents", *sys.argv[1:]])
