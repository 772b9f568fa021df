"""The bootstrap server and its client over real HTTP on loopback; the
disaggregation flags and request fields, refused by name when wrong."""

from __future__ import annotations

import pytest

from radixserve.disaggregation.bootstrap import BootstrapServer, RankRoute, RouteError, lookup_route, register_route
from radixserve.managers.generate_input import GenerateReqInput
from radixserve.managers.io_struct import BootstrapInfo
from radixserve.managers.validation import FieldError
from radixserve.server_args import ServerArgs
from tests.server_utils import free_port


def test_ranks_register_and_decode_ranks_find_theirs():
    port = free_port()
    server = BootstrapServer("127.0.0.1", port)
    try:
        server.register(RankRoute(0, 2, "127.0.0.1:100", "tcp://127.0.0.1:200"))
        register_route("127.0.0.1", port, RankRoute(1, 2, "127.0.0.1:101", "tcp://127.0.0.1:201"))
        assert lookup_route("127.0.0.1", port, 1, wait_s=1) == RankRoute(1, 2, "127.0.0.1:101", "tcp://127.0.0.1:201")
        with pytest.raises(RouteError, match="has no prefill rank 5"):
            lookup_route("127.0.0.1", port, 5, wait_s=0.3)
    finally:
        server.close()
    with pytest.raises(RouteError, match=f"cannot reach the prefill server's bootstrap server at 127.0.0.1:{port}"):
        lookup_route("127.0.0.1", port, 0, wait_s=5)


def test_disaggregation_flags():
    assert ServerArgs(disaggregation_mode="decode").disable_radix_cache  # as in SGLang
    assert not ServerArgs(disaggregation_mode="decode", disaggregation_decode_enable_radix_cache=True).disable_radix_cache
    assert not ServerArgs(disaggregation_mode="prefill").disable_radix_cache
    for kwargs, message in [({"disaggregation_mode": "both"}, "disaggregation_mode must be one of"),
                            ({"disaggregation_mode": "prefill", "disaggregation_transfer_backend": "nixl"},
                             "nixl is not available"),
                            ({"disaggregation_mode": "decode", "dp_size": 2}, "dp_size 1"),
                            ({"disaggregation_transfer_timeout": 0}, "disaggregation_transfer_timeout"),
                            ({"disaggregation_bootstrap_port": 0}, "disaggregation_bootstrap_port")]:
        with pytest.raises(ValueError, match=message):
            ServerArgs(**kwargs)


def test_bootstrap_fields_of_a_request():
    single = GenerateReqInput(prompt="hi", bootstrap_host="10.0.0.2", bootstrap_port=8998, bootstrap_room=12)
    assert single.split()[0].bootstrap == BootstrapInfo("10.0.0.2", 8998, 12)
    assert GenerateReqInput(prompt="hi").split()[0].bootstrap is None
    batch = GenerateReqInput(prompt=["a", "b"], bootstrap_host="h", bootstrap_port=1, bootstrap_room=[3, 4])
    assert [s.bootstrap.room for s in batch.split()] == [3, 4]
    for kwargs, field in [({"bootstrap_room": 1, "bootstrap_port": 1}, "bootstrap_host"),
                          ({"bootstrap_room": 1, "bootstrap_host": "h"}, "bootstrap_port"),
                          ({"bootstrap_room": "1", "bootstrap_host": "h", "bootstrap_port": 1}, "bootstrap_room"),
                          ({"bootstrap_room": 1, "bootstrap_host": "h", "bootstrap_port": 1,
                            "sampling_params": {"n": 2}}, "n")]:
        with pytest.raises(FieldError) as e:
            GenerateReqInput(prompt="hi", **kwargs).split()
        assert e.value.field == field
