"""Video files and folders -> webdataset shards; the same as `dforce make-shards`."""

import sys

from dforce.cli import main

if __name__ == "__main__":
    main(["make-shards", *sys.argv[1:]])
