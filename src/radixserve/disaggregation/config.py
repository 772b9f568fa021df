"""The disaggregation flags' checks (ServerArgs calls them; torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixserve.server_args import ServerArgs

MODES = ("null", "prefill", "decode")


def validate_disaggregation(args: "ServerArgs") -> None:
    """Checks the flags; a decode server without --disaggregation-decode-enable-radix-cache
    gets --disable-radix-cache (as in SGLang)."""
    if args.disaggregation_mode not in MODES:
        raise ValueError(f"disaggregation_mode must be one of {'|'.join(MODES)}, "
                         f"got {args.disaggregation_mode!r}")
    if args.disaggregation_transfer_backend not in ("mooncake", "nixl"):
        raise ValueError("disaggregation_transfer_backend must be mooncake|nixl, "
                         f"got {args.disaggregation_transfer_backend!r}")
    if not 0 < args.disaggregation_bootstrap_port < 65536:
        raise ValueError(f"disaggregation_bootstrap_port must be in [1, 65535], "
                         f"got {args.disaggregation_bootstrap_port}")
    if not args.disaggregation_transfer_timeout > 0:
        raise ValueError(f"disaggregation_transfer_timeout must be > 0 seconds, "
                         f"got {args.disaggregation_transfer_timeout}")
    if args.disaggregation_mode == "null":
        return
    if args.disaggregation_transfer_backend == "nixl":
        raise ValueError("disaggregation_transfer_backend nixl is not available yet; use mooncake")
    if args.dp_size > 1 or args.nnodes > 1:
        raise ValueError("a disaggregated server runs with dp_size 1 and nnodes 1; run more prefill or "
                         "decode servers behind the gateway instead")
    if args.enable_hierarchical_cache:
        raise ValueError("disaggregation_mode cannot be combined with enable_hierarchical_cache yet")
    if args.disaggregation_mode == "decode" and not args.disaggregation_decode_enable_radix_cache:
        # As in SGLang: a decode server keeps no radix cache unless asked to.
        args.disable_radix_cache = True
