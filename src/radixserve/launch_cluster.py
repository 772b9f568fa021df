"""`python -m radixserve.launch_cluster`: workers behind SGLang's Model Gateway."""

import sys

from radixserve.entrypoints.launch_cluster import main

if __name__ == "__main__":
    sys.exit(main())
