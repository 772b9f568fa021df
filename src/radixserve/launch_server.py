"""`python -m radixserve.launch_server`: the SGLang-compatible entry point."""

from radixserve.entrypoints.launch_server import main

if __name__ == "__main__":
    main()
