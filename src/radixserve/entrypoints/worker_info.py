"""What a worker tells SGLang's gateway and clients about itself: /get_load,
/model_info and /server_info (with SGLang's older names /get_model_info and
/get_server_info). The gateway reads the model's identity and tokenizer folder
when a worker registers, and the load records to balance by load."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List

from radixserve import __version__
from radixserve.server_args import ServerArgs

# Never reported back over HTTP.
_SECRET_ARGS = ("api_key", "admin_api_key")


@functools.lru_cache(maxsize=2)
def _model_identity(model_path: str, tokenizer_path: Any) -> Dict[str, Any]:
    """model_type, architectures and the tokenizer's folder, computed once."""
    from radixserve.model_loader.source import resolve_model_source
    from radixserve.utils.hf_utils import load_config, tokenizer_folder

    source = resolve_model_source(model_path)
    config = load_config(source)
    return {
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or []),
        "tokenizer_path": tokenizer_folder(source, tokenizer_path),
    }


def model_info(args: ServerArgs, served_model_name: str, context_len: int) -> Dict[str, Any]:
    """SGLang's get_model_info, with the fields its gateway and frontend read."""
    return {
        "model_path": args.model_path,
        "served_model_name": served_model_name,
        **_model_identity(args.model_path, args.tokenizer_path),
        "is_generation": True,
        "context_length": context_len,
        "has_image_understanding": False,
        "has_audio_understanding": False,
    }


def server_info(args: ServerArgs, served_model_name: str, scheduler_info: Dict[str, Any]) -> Dict[str, Any]:
    """SGLang's get_server_info: the server's arguments, the scheduler's live
    state (with --dp-size, the replicas' counters summed, and each replica's
    own under internal_states), and the fields the gateway reads to register
    a worker."""
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in _SECRET_ARGS}
    identity = _model_identity(args.model_path, args.tokenizer_path)
    return {
        **settings,
        **scheduler_info,
        "model_path": args.model_path,
        "served_model_name": served_model_name,
        "tokenizer_path": identity["tokenizer_path"],
        "disaggregation_mode": args.disaggregation_mode,
        "internal_states": scheduler_info["internal_states"],
        "version": __version__,
    }


def load_records(scheduler_info: Dict[str, Any]) -> List[Dict[str, Any]]:
    """SGLang's /get_load: one record per data-parallel rank. The numbers are
    the schedulers' own, read live through the control channel."""
    return [{
        "dp_rank": state["dp_rank"],
        "num_reqs": state["num_running_reqs"] + state["num_waiting_reqs"],
        "num_waiting_reqs": state["num_waiting_reqs"],
        "num_tokens": state["kv_cache"]["in_use_tokens"],
    } for state in scheduler_info["internal_states"]]
