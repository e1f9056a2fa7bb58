"""A real server on an FP8 checkpoint (as DeepSeek-V3/R1 ship): the default --quantization nf4
cannot apply, and the server says so in one line and exits; with --quantization none it serves
the checkpoint as stored and GetServerInfo reports `fp8 (checkpoint)`."""

from __future__ import annotations

import pytest
from quantized_checkpoints import fp8_checkpoint

from loraserve.devtools.server_process import running_server, start_server
from loraserve.devtools.synthetic_base import init_model
from loraserve.proto.v1 import inference_pb2 as ipb
from loraserve.proto.v1 import server_info_pb2 as spb


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return fp8_checkpoint(init_model(root / "base", "deepseek-llm", "tiny", seed=0), root / "fp8")


def test_the_default_nf4_on_fp8_exits_with_one_line_saying_what_to_use(fp8, tmp_path):
    srv = start_server(tmp_path, fp8, tmp_path / "store")
    assert srv.process.wait(timeout=180) != 0
    log = srv.log()
    assert "already quantized (fp8, in its config.json)" in log and "use --quantization none" in log
    assert "Traceback" not in log


def test_fp8_served_as_stored_reports_its_quantization(fp8, tmp_path):
    with running_server(tmp_path, fp8, tmp_path / "store", "--quantization", "none") as srv:
        assert srv.info.GetServerInfo(spb.GetServerInfoRequest()).quantization == "fp8 (checkpoint)"
        reply = srv.inference.Generate(ipb.GenerateRequest(input=ipb.GenerationInput(
            prompt="hello", sampling=ipb.SamplingParams(max_new_tokens=4))), timeout=60)
        assert reply.summary.usage.completion_tokens == 4
