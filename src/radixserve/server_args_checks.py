"""ServerArgs' checks of one feature each (parallelism, LoRA, HiCache), kept
apart so that server_args.py stays a list of flags. Each raises ValueError
naming the flag; some fill in implied values (lora_paths turns enable_lora on)."""

from __future__ import annotations

from typing import Dict

# (server_args imports this module only inside its checks: no import cycle)
from radixserve.server_args import LOAD_BALANCE_METHODS, ServerArgs

# HiCache choices: SGLang 0.5.23's names. page_head and page_first_kv_split are
# accepted names that we refuse with a reason; kernel_ascend likewise.
HICACHE_CHOICES: Dict[str, tuple] = {
    "hicache_write_policy": ("write_through", "write_through_selective", "write_back"),
    "hicache_io_backend": ("kernel", "direct", "kernel_ascend"),
    "hicache_mem_layout": ("page_first", "page_first_direct", "layer_first", "page_first_kv_split", "page_head"),
    "hicache_storage_backend": (None, "file", "mooncake", "dynamic"),
    "hicache_storage_prefetch_policy": ("best_effort", "wait_complete", "timeout"),
}
HICACHE_UNSUPPORTED_LAYOUTS = {
    "page_head": "it serves heterogeneous tensor parallelism, which radixserve does not have",
    "page_first_kv_split": "use page_first (our K and V are already separate buffers within a page)",
}


def is_host_port(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def validate_parallelism(args: ServerArgs) -> None:
    """tp/ep/dp sizes, nodes and the data-parallel balancer."""
    if args.tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {args.tp_size}")
    if args.ep_size < 1 or args.tp_size % args.ep_size:
        raise ValueError(f"ep_size must divide tp_size ({args.tp_size}), got {args.ep_size}")
    if args.nnodes < 1 or args.tp_size % args.nnodes:
        raise ValueError(f"nnodes must divide tp_size ({args.tp_size}), got {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"node_rank must be in [0, nnodes), got {args.node_rank}")
    if args.nnodes > 1 and not args.dist_init_addr:
        raise ValueError("dist_init_addr (host:port of node 0) is required when nnodes > 1")
    if args.dist_init_addr is not None and not is_host_port(args.dist_init_addr):
        raise ValueError(f"dist_init_addr must be host:port, got {args.dist_init_addr!r}")
    if args.dist_timeout is not None and args.dist_timeout < 1:
        raise ValueError(f"dist_timeout must be >= 1 second, got {args.dist_timeout}")
    if args.base_gpu_id < 0:
        raise ValueError(f"base_gpu_id must be >= 0, got {args.base_gpu_id}")
    if args.dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {args.dp_size}")
    if args.dp_size > 1 and args.nnodes > 1:
        raise ValueError("dp_size > 1 runs every replica on this node (nnodes=1); across nodes, start one "
                         "server per node and put SGLang's gateway in front (docs/gateway.md)")
    if args.load_balance_method == "follow_bootstrap_room":
        raise ValueError("load_balance_method follow_bootstrap_room is not supported: prefill/decode "
                         "disaggregation runs with dp_size 1; use " + "|".join(LOAD_BALANCE_METHODS))
    if args.load_balance_method not in LOAD_BALANCE_METHODS:
        raise ValueError(f"load_balance_method must be one of {'|'.join(LOAD_BALANCE_METHODS)}, "
                         f"got {args.load_balance_method!r}")


def validate_lora(args: ServerArgs) -> None:
    """Adapter slots and paths; lora_paths implies enable_lora."""
    if args.lora_paths:
        args.enable_lora = True
    if args.max_loras_per_batch < 1:
        raise ValueError(f"max_loras_per_batch must be >= 1, got {args.max_loras_per_batch}")
    if args.max_lora_rank is not None and args.max_lora_rank < 1:
        raise ValueError(f"max_lora_rank must be >= 1, got {args.max_lora_rank}")
    if args.max_loaded_loras is not None and args.max_loaded_loras < args.max_loras_per_batch:
        raise ValueError(f"max_loaded_loras ({args.max_loaded_loras}) must be >= max_loras_per_batch "
                         f"({args.max_loras_per_batch})")
    if args.lora_backend not in ("triton", "torch"):
        raise ValueError(f"lora_backend must be triton|torch, got {args.lora_backend!r}")
    if args.lora_eviction_policy not in ("lru", "fifo"):
        raise ValueError(f"lora_eviction_policy must be lru|fifo, got {args.lora_eviction_policy!r}")
    from radixserve.lora.spec import normalize_targets, parse_lora_paths  # torch-free

    specs = parse_lora_paths(args.lora_paths)  # bad entries and repeated names fail here
    normalize_targets(args.lora_target_modules or ())
    if args.max_loaded_loras is not None and len(specs) > args.max_loaded_loras:
        raise ValueError(f"lora_paths has {len(specs)} adapters, more than max_loaded_loras "
                         f"({args.max_loaded_loras})")
    if not args.enable_lora:
        return
    if args.enable_deterministic_inference:
        # The adapters' matmuls run over each adapter's rows: their sums would change with the batch.
        raise ValueError("enable_lora cannot be combined with enable_deterministic_inference yet")
    if not args.lora_paths and (args.max_lora_rank is None or not args.lora_target_modules):
        raise ValueError("enable_lora without lora_paths needs max_lora_rank and lora_target_modules "
                         "(the device slots are sized from them)")


def validate_hicache(args: ServerArgs) -> None:
    """The hierarchical cache's SGLang choices and its storage backends."""
    for name, choices in HICACHE_CHOICES.items():
        value = getattr(args, name)
        if value not in choices:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be one of {'|'.join(map(str, choices))}, got {value!r}")
    if args.hicache_mem_layout in HICACHE_UNSUPPORTED_LAYOUTS:
        raise ValueError(f"--hicache-mem-layout {args.hicache_mem_layout} is not supported: "
                         f"{HICACHE_UNSUPPORTED_LAYOUTS[args.hicache_mem_layout]}")
    if args.hicache_io_backend == "kernel_ascend":
        raise ValueError("--hicache-io-backend kernel_ascend needs Ascend NPUs; use kernel or direct")
    if args.hicache_ratio <= 1 and args.hicache_size <= 0:
        raise ValueError(f"hicache_ratio must be > 1 (the host pool holds at least the device pool), "
                         f"got {args.hicache_ratio}")
    if args.hicache_size < 0:
        raise ValueError(f"hicache_size must be >= 0 GB, got {args.hicache_size}")
    if args.hicache_storage_backend_extra_config is not None:
        args.hicache_storage_extra_config()  # fails early on bad JSON
    if not args.enable_hierarchical_cache:
        return
    if args.disable_radix_cache:
        raise ValueError("enable_hierarchical_cache needs the radix cache; drop disable_radix_cache")
    if args.enable_lora:
        # The tiered tree has no per-adapter namespaces yet (a prefix must never cross adapters).
        raise ValueError("enable_hierarchical_cache cannot be combined with enable_lora yet")
    if args.hicache_storage_backend is not None and args.tp_size > 1:
        raise ValueError("a HiCache storage backend with tp_size > 1 is not supported yet (the ranks "
                         "would have to agree on prefetch progress); the host tier works with tp")
    if args.hicache_storage_backend == "mooncake" and not args.hicache_storage_extra_config().get(
            "master_server_address"):
        raise ValueError("--hicache-storage-backend mooncake needs master_server_address (host:port of "
                         "mooncake_master) in --hicache-storage-backend-extra-config")
    if args.hicache_storage_backend == "dynamic":
        extra = args.hicache_storage_extra_config()
        if not extra.get("module_path") or not extra.get("class_name"):
            raise ValueError("--hicache-storage-backend dynamic needs module_path and class_name in "
                             "--hicache-storage-backend-extra-config")
