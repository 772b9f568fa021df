"""radixserve: a fast serving framework for large language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import radixserve` stays cheap for tools that only need metadata.
    if name == "Engine":
        from radixserve.entrypoints.engine import Engine

        return Engine
    if name == "ServerArgs":
        from radixserve.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(name)
