"""`llamaship profile --hub` up to the network boundary: the real qai-hub client (its uploads, input
datasets, job requests, polling, profile and output parsing) against a loopback stand-in for AI
Hub's REST layer (tests/hub_loopback.py), which runs the uploaded models here. The loopback's
profile timings are synthetic, so these tests check packing, parsing and arithmetic, never speed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from llamaship.cli import main
from llamaship.profiling import hub
from llamaship.runtime.qnn_session import in_child
from tests.hub_loopback import PEAK_BYTES, PROFILE_US, LoopbackHub

TOKEN = "qaihub-SECRET-0123456789abcdef"
S24, S23, PIXEL = "Samsung Galaxy S24 (Family)", "Samsung Galaxy S23 (Family)", "Google Pixel 8"


@pytest.fixture
def no_client_ini(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QAIHUB_CLIENT_INI", raising=False)
    monkeypatch.delenv(hub.TOKEN_ENV, raising=False)


def everything_under(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file())


def host_logits(bundle: Path, tokens: list[int]) -> np.ndarray:
    """The ONNX model's logits for the prompt, from onnxruntime here (what the loopback's 'device' ran)."""
    import onnxruntime as ort

    from llamaship.targets.onnx_runtime import OnnxModule

    feed = OnnxModule(bundle / "onnx").feeds(tokens, 0)
    session = ort.InferenceSession(str(bundle / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feed)[0][0]


def test_profile_hub_measures_every_device_and_keeps_the_others_when_one_fails(
        tiny_bundle, tiny_ckpt, tmp_path, monkeypatch, no_client_ini, capsys):
    monkeypatch.setenv(hub.TOKEN_ENV, TOKEN)
    out = tmp_path / "hub"
    loop = LoopbackHub(fail_devices=(S23,))
    with loop.installed():
        code = main(["profile", str(tiny_bundle), "--hub", "--device", S24, "--device", PIXEL,
                     "--device-attr", "chipset:qualcomm-snapdragon-8gen2", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 8, printed.err[-3000:]  # one device failed: scripts can tell
    assert loop.tokens_seen == {TOKEN}  # the env token is what the client sent

    # one upload of the ONNX model folder, only the files AI Hub accepts
    assert loop.uploads == [("MODEL_TYPE_ONNX", ["model.onnx", "model.onnx.data"])]
    # S24 and S23 got a prompt and a decode job each; the Pixel 8 lists no framework:onnx: no job
    jobs = {(j.device.name, j.name) for j in loop.jobs.values()}
    assert jobs == {(d, f"llamaship onnx {k}") for d in (S24, S23) for k in ("prompt", "decode")}
    assert all(j.is_profiling_on for j in loop.jobs.values())

    # the S24 report: speed from the profile, accuracy of the device's logits against the fp32 module
    report = json.loads((out / "Samsung-Galaxy-S24-Family" / "report.json").read_text())
    (art,) = report["artifacts"]
    sp = art["speed"]
    assert sp, art["hub_jobs"]
    assert sp["decode_tok_s"]["median"] == pytest.approx(1e6 / np.median(PROFILE_US["decode"]))
    # the tiny bundle has a 128-token context: a 127-token prompt leaves room for the decoded token
    assert sp["prefill_tok_s"]["median"] == pytest.approx(127 * 1e6 / np.median(PROFILE_US["prompt"]))
    assert sp["ttft_ms"]["median"] == pytest.approx(np.median(PROFILE_US["prompt"]) / 1e3)
    assert sp["peak_rss_mb"] == pytest.approx(PEAK_BYTES / 1e6) and sp["runs"] == 3
    from llamaship.targets import accuracy
    from llamaship.targets.onnx_runtime import OnnxModule

    window = next(accuracy.make_slice(tiny_ckpt.tokenizer, 512, 512).windows())
    ref, _ = hub.reference_logprobs(tiny_ckpt, window[:130])
    host = OnnxModule(tiny_bundle / "onnx")  # what the loopback's 'device' ran: the same graph, here
    rows = torch.cat([host.forward(window[:127], 0), host.forward(window[127:128], 127)])
    from llamaship.targets.accuracy import _Accumulator

    want = _Accumulator()
    want.add(rows, ref[[126, 127]], torch.tensor(window[127:129]))
    # the builder prunes the lm_head to the last position: the prompt's last and the decoded token
    assert art["accuracy"]["scored_tokens"] == 2
    assert art["accuracy"]["mean_kld"] == pytest.approx(want.kld / 2, rel=1e-5, abs=1e-7)
    assert art["accuracy"]["top1_agreement"] == want.agree / 2
    assert report["device"]["model"] == S24 and "AI Hub" in report["device"]["farm"]
    assert report["prediction"]["profile"] == "qualcomm"

    # the failed device is reported, with the service's reason; the others' results are kept
    failed = json.loads((out / "Samsung-Galaxy-S23-Family" / "report.json").read_text())
    assert failed["artifacts"][0]["speed"] is None
    assert {j["status"] for j in failed["artifacts"][0]["hub_jobs"]} == {"failed"}
    assert "simulated failure" in (out / "Samsung-Galaxy-S23-Family" / "report.md").read_text()
    assert (out / "Samsung-Galaxy-S23-Family" / "report.png").exists()

    # the raw results, in the client's own formats
    rec = out / "Samsung-Galaxy-S24-Family" / "onnx-prompt"
    profile = json.loads((rec / "profile.json").read_text())
    assert profile["execution_summary"]["all_inference_times"] == PROFILE_US["prompt"]
    from qai_hub.util.dataset_entries_converters import h5_to_dataset_entries

    with h5py.File(rec / "outputs.h5") as f:
        logits = h5_to_dataset_entries(f)["logits"][0]
    assert logits.shape == (1, 1, 320)  # the last position: the builder prunes the lm_head
    assert json.loads((rec / "job.json").read_text())["status"] == "done"

    # measured next to the prediction, per device; the network requirement is said
    assert re.search(rf"{re.escape(S24)}: onnx.*decode 100\.0 tok/s \(predicted ceiling", printed.out), printed.out
    assert "need network access and your API token" in printed.err
    # the token is nowhere: not in the bundle, the reports, the raw results or anything printed
    assert TOKEN.encode() not in everything_under(tiny_bundle, out)
    assert TOKEN not in printed.out + printed.err


def test_the_clients_own_config_file_supplies_the_token(tiny_bundle, tmp_path, monkeypatch, no_client_ini, capsys):
    ini = tmp_path / "client.ini"
    ini.write_text(f"[api]\napi_token = {TOKEN}\napi_url = https://workbench.aihub.qualcomm.com\n"
                   "web_url = https://workbench.aihub.qualcomm.com\nverbose = False\n")
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(ini))
    loop = LoopbackHub()
    with loop.installed():
        code = main(["profile", str(tiny_bundle), "--hub", "--device", S24, "--out", str(tmp_path / "o")])
    printed = capsys.readouterr()
    assert code == 0 and loop.tokens_seen == {TOKEN}
    assert TOKEN.encode() not in everything_under(tiny_bundle, tmp_path / "o")
    assert TOKEN not in printed.out + printed.err
    # an earlier output is replaced only with --force, and only if it is one
    with loop.installed():
        argv = ["profile", str(tiny_bundle), "--hub", "--device", S24, "--out", str(tmp_path / "o")]
        assert main(argv) == 3
        assert main([*argv, "--force"]) == 0
        assert main(["profile", str(tiny_bundle), "--hub", "--device", S24, "--out", str(tiny_bundle), "--force"]) == 3
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["Samsung-Galaxy-S24-Family"]


def test_no_token_is_a_clear_error_before_anything_is_uploaded(tiny_bundle, tmp_path, no_client_ini, capsys):
    loop = LoopbackHub()
    with loop.installed():
        code = main(["profile", str(tiny_bundle), "--hub", "--device", S24, "--out", str(tmp_path / "o")])
    assert code == 3
    assert "QAI_HUB_API_TOKEN" in capsys.readouterr().err
    assert not loop.uploads and not (tmp_path / "o").exists()


def test_a_server_error_that_echoes_the_token_is_scrubbed(tiny_bundle, tmp_path, monkeypatch, no_client_ini, capsys):
    monkeypatch.setenv(hub.TOKEN_ENV, TOKEN)
    loop = LoopbackHub(server_error_echo=True)
    with loop.installed():
        code = main(["profile", str(tiny_bundle), "--hub", "--device", S24, "--out", str(tmp_path / "o")])
    printed = capsys.readouterr()
    assert code == 8
    md = (tmp_path / "o" / "Samsung-Galaxy-S24-Family" / "report.md").read_text()
    assert "submit failed" in md and "<token>" in md
    assert TOKEN.encode() not in everything_under(tiny_bundle, tmp_path / "o")
    assert TOKEN not in printed.out + printed.err


def test_refusals_name_the_fix(tiny_bundle, tmp_path, monkeypatch, no_client_ini, capsys):
    monkeypatch.setenv(hub.TOKEN_ENV, TOKEN)
    loop = LoopbackHub()
    with loop.installed():
        assert main(["profile", str(tiny_bundle), "--hub", "--out", str(tmp_path / "a")]) == 3
        assert "--device NAME" in capsys.readouterr().err
        assert main(["profile", str(tiny_bundle), "--hub", "--hub-format", "qnn", "--device", S24]) == 3
        assert "--format qnn" in capsys.readouterr().err
        assert main(["profile", str(tiny_bundle), "--hub", "--device", "Nokia 3310", "--out", str(tmp_path / "b")]) == 3
        assert "qai-hub list-devices" in capsys.readouterr().err
        assert main(["profile", str(tiny_bundle), "--device", "SERIAL"]) == 3  # adb without --runner
        assert "--runner" in capsys.readouterr().err
    assert not loop.uploads


def test_a_job_that_does_not_finish_is_reported_and_the_rest_kept(tiny_bundle, tiny_ckpt, monkeypatch, no_client_ini):
    monkeypatch.setenv(hub.TOKEN_ENV, TOKEN)
    from llamaship.bundle import read_manifest
    from llamaship.targets import accuracy

    manifest = read_manifest(tiny_bundle)
    window = next(accuracy.make_slice(tiny_ckpt.tokenizer, 512, 512).windows())
    loop = LoopbackHub(hang_devices=(S23,))
    with loop.installed():
        client, redact = hub.make_client()
        devices = hub.resolve_devices(client, [S24, S23], [], redact)
        jobs = hub.plan_jobs(tiny_bundle, manifest, devices, ["onnx"], window)
        hub.submit(client, tiny_bundle, manifest, jobs, redact, lambda s: None)
        hub.collect(jobs, redact, lambda s: None, timeout_s=30)
    assert {(j.device.name, j.status) for j in jobs} == {(S24, "done"), (S23, "timeout")}, [j.message for j in jobs]


def run_on_htp(model: Path, feeds: dict) -> np.ndarray:
    from llamaship.runtime.qnn_session import htp_session

    return htp_session(model, "SM8650").run(["logits"], feeds)[0]


def test_npu_inputs_are_the_apps_calls_and_the_htp_runs_them(tiny_qnn_one_part, tiny_ckpt, tmp_path, monkeypatch,
                                                             no_client_ini):
    """The NPU artifact's jobs: its prefill graph on the first 128-token chunk from an empty cache,
    its decode graph on the next token with the cache the prefill graph wrote, inputs in each
    graph's order and dtypes, each graph uploaded with the weights file both read; the loopback
    runs them on the HTP simulator (asked for by --compute_unit npu), and the logits that come
    back are the ones our own NPU runtime computes."""
    import shutil

    from llamaship.targets.qnn_runtime import QnnModule

    monkeypatch.setenv(hub.TOKEN_ENV, TOKEN)
    folder, res = tiny_qnn_one_part
    bundle = tmp_path / "b"
    shutil.copytree(folder / "qnn", bundle / "qnn")
    art = {"format": "qnn", "path": "qnn/qnn_config.json", "folder": "qnn", "config": "qnn/qnn_config.json",
           "scheme": "w4a16"}  # as the NPU backend writes it
    manifest = {"artifacts": [art], "model": {"name": "tiny"}, "quant": {"name": "w4a16"}}
    tokens = list(range(3, 3 + 129))
    prompt, decode = hub.qnn_inputs(bundle, art, tokens)
    layers = [f"past_{kv}_{i}" for i in range(2) for kv in ("keys", "values")]
    assert list(prompt) == list(decode) == ["input_ids", "position_ids", "attention_mask", *layers]
    assert prompt["input_ids"][0].dtype == np.int32 and prompt["input_ids"][0].tolist() == [tokens[:128]]
    assert not prompt["past_keys_0"][0].any()  # an empty cache
    assert decode["input_ids"][0].tolist() == [[tokens[128]]] and decode["position_ids"][0].tolist() == [[128]]
    assert decode["past_keys_0"][0][:, :128].any() and not decode["past_keys_0"][0][:, 128:].any()
    loop = LoopbackHub()
    with loop.installed():
        client, redact = hub.make_client()
        devices = hub.resolve_devices(client, [S24], [], redact)
        jobs = hub.plan_jobs(bundle, manifest, devices, ["qnn"], tokens)
        hub.submit(client, bundle, manifest, jobs, redact, lambda s: None)
        hub.collect(jobs, redact, lambda s: None, timeout_s=60)
    assert loop.uploads == [("MODEL_TYPE_ONNX", ["part0.data", "part0_prefill.onnx"]),
                            ("MODEL_TYPE_ONNX", ["part0.data", "part0_decode.onnx"])]
    assert [(j.kind, j.status) for j in jobs] == [("prompt", "done"), ("decode", "done")], [j.message for j in jobs]
    with QnnModule(bundle, art) as module:
        want = module.forward(tokens[:128], 0)
    got = torch.from_numpy(np.asarray(jobs[0].outputs["logits"][0], dtype=np.float32)[0])
    assert torch.allclose(got, want, atol=1e-5)
    # the decode job's cache was computed here on the CPU EP: the HTP on the same inputs gives its logits
    source = bundle / "qnn" / res["config"]["parts"][0]["source"]["decode"]
    want = in_child(run_on_htp, source, {k: v[0] for k, v in decode.items()})
    got = np.asarray(jobs[1].outputs["logits"][0], dtype=np.float32)
    assert np.allclose(got, want, atol=1e-5)
    ref = torch.log_softmax(torch.randn(200, want.shape[-1]), -1)
    report = hub.device_reports(bundle, manifest, jobs, ref, tokens, "s", None)[S24]
    assert report["artifacts"][0]["accuracy"]["scored_tokens"] == 128  # every slot of the chunk
    sp = report["artifacts"][0]["speed"]
    # a decoded token costs a decode graph call (before the decode graph, it cost a prompt call)
    assert sp["decode_tok_s"]["median"] == pytest.approx(1e6 / np.median(PROFILE_US["decode"]))
