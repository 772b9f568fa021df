"""What a new user meets first: `launch_server --help` describes every flag with
its default, and a bad command line ends in one line that says what to do."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from radixserve import Engine
from radixserve.server_args import ServerArgs
from tests.server_utils import children_of, free_port

HUB_ID = "meta-llama/Llama-3.1-8B-Instruct"


def launch(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "radixserve.launch_server", *argv],
                          capture_output=True, text=True, timeout=120, env=env)


def help_blocks(text: str) -> dict:
    """{flag: its help text on one line} from argparse's --help output."""
    blocks, flag = {}, None
    for line in text.splitlines():
        match = re.match(r"  (--[a-z0-9-]+)", line)
        if match:
            flag = match.group(1)
            blocks[flag] = line[match.end():]
        elif flag and line.startswith("    "):
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return {f: " ".join(b.split()) for f, b in blocks.items()}


def test_help_describes_every_flag_and_its_default():
    out = launch("--help")
    assert out.returncode == 0, out.stderr
    blocks = help_blocks(out.stdout)
    fields = [f for f in dataclasses.fields(ServerArgs) if f.name != "extra"]
    assert set(blocks) == {"--" + f.name.replace("_", "-") for f in fields}
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        text = blocks[flag]
        assert text.endswith(f"(default: {f.default})"), (flag, text)
        description = text[: -len(f"(default: {f.default})")]
        assert len(re.findall(r"[a-z]{3,}", description)) >= 2, (flag, text)  # words, not just a metavar


@pytest.mark.parametrize("argv, says", [
    (["--model-path", "/no/such/checkpoint"], "download the checkpoint and pass its folder"),
    (["--model-path", HUB_ID], "Hugging Face Hub id"),
    (["--log-level", "loud"], "log_level must be one of debug|info|warning|error|critical"),
    (["--port", "eighty"], "argument --port: invalid int value"),
    (["--chat-template", "/no/such/template.jinja"], "chat_template '/no/such/template.jinja' is not a file"),
    # a chunk smaller than a page never admitted a long prompt: the scheduler spun forever
    (["--page-size", "16", "--chunked-prefill-size", "8"], "chunked_prefill_size (8) must be at least page_size (16)"),
])
def test_bad_command_line_ends_in_one_line(argv, says):
    out = launch(*argv)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], out.stderr


def test_engine_refuses_bad_model_path_before_starting_processes():
    before = set(children_of(os.getpid()))
    with pytest.raises(ValueError, match="model_path .*Hugging Face Hub id.*hf download"):
        Engine(model_path=HUB_ID)
    with pytest.raises(ValueError, match="model_path '/no/such/checkpoint' .*download the checkpoint"):
        Engine(model_path="/no/such/checkpoint")
    with pytest.raises(ValueError, match="log_level"):
        Engine(log_level="loud")
    # a value of the wrong type names its field (it failed later as a TypeError in a comparison)
    with pytest.raises(ValueError, match=r"page_size must be None or int, got '16' \(str\)"):
        Engine(page_size="16")
    with pytest.raises(ValueError, match=r"mem_fraction_static must be None or float, got 'half'"):
        Engine(mem_fraction_static="half")
    with pytest.raises(ValueError, match=r"disable_radix_cache must be bool, got 1 \(int\)"):
        Engine(disable_radix_cache=1)
    assert set(children_of(os.getpid())) <= before


def test_model_that_fails_to_load_ends_in_one_line(tiny_model_factory, tmp_path):
    """The scheduler logs its traceback; the launcher's last word is one line, exit code 1."""
    folder = tmp_path / "unknown-architecture"
    shutil.copytree(tiny_model_factory("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    out = launch("--model-path", str(folder), "--port", str(free_port()))
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m radixserve.launch_server: error: the model could not be loaded: ")
    assert "NoSuchModelForCausalLM" in last


def test_default_page_size_is_the_devices():
    """Pages of 16 on the CPU (a request's keys in runs its decode attention reads
    whole), never more than the prefill chunk; single slots on a GPU; a set value wins."""
    assert ServerArgs(device="cpu").resolved_page_size() == 16
    assert ServerArgs(device="cpu", chunked_prefill_size=8).resolved_page_size() == 8
    assert ServerArgs(device="cpu", chunked_prefill_size=-1).resolved_page_size() == 16
    assert ServerArgs(device="cuda").resolved_page_size() == 1
    assert ServerArgs(device="cpu", page_size=1).resolved_page_size() == 1
    assert ServerArgs(device="cuda", page_size=64).resolved_chunked_prefill_size() == 8192


def test_default_chunk_holds_at_least_a_page():
    """The default chunk (2,048 tokens on the CPU) grows to a page larger than it."""
    assert ServerArgs(device="cpu").resolved_chunked_prefill_size() == 2048
    assert ServerArgs(device="cpu", page_size=4096).resolved_chunked_prefill_size() == 4096
    assert ServerArgs(device="cpu", page_size=16, chunked_prefill_size=16).resolved_chunked_prefill_size() == 16
