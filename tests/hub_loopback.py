"""A loopback stand-in for Qualcomm AI Hub's REST layer, so `profile --hub` is tested through the
real qai-hub client up to the network boundary (this machine cannot reach AI Hub).

The client (`qai_hub.client.Client`) calls its REST functions through the module it imports as
`api` (`qai_hub.public_rest_api`); `LoopbackHub.installed()` replaces those functions for the
duration of a test. Everything else is the client's own: it zips and uploads the model folder,
writes the input dataset .h5, builds the job request protos, polls, converts the profile proto to
its dict and reads the output .h5.

What the loopback answers with:
- devices: a small catalog in AI Hub's device format (names and attributes as AI Hub lists them);
- inference jobs: the uploaded model run HERE on the uploaded inputs (onnxruntime on the CPU for an
  ONNX model; the QNN HTP simulator for an EPContext model), so the outputs are this host's;
- profiles: SYNTHETIC ProfileDetail protos with fixed made-up times (PROFILE_US). They exist to test
  parsing and arithmetic and are no measurement of any device.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

DEVICES = [  # as AI Hub lists them (`qai-hub list-devices`); attributes abridged
    ("Samsung Galaxy S24 (Family)", "14", ["chipset:qualcomm-snapdragon-8gen3", "framework:qnn", "framework:onnx",
                                          "framework:tflite", "os:android", "vendor:samsung"]),
    ("Snapdragon 8 Elite QRD", "15", ["chipset:qualcomm-snapdragon-8-elite", "framework:qnn", "framework:onnx",
                                     "os:android", "vendor:qualcomm"]),
    ("Samsung Galaxy S23 (Family)", "13", ["chipset:qualcomm-snapdragon-8gen2", "framework:qnn", "framework:onnx",
                                          "os:android", "vendor:samsung"]),
    ("Google Pixel 8", "14", ["chipset:google-tensor-g3", "framework:tflite", "os:android", "vendor:google"]),
]
PROFILE_US = {"prompt": [52_000.0, 50_000.0, 51_000.0], "decode": [9_000.0, 10_000.0, 11_000.0]}  # SYNTHETIC
PEAK_BYTES = 321_000_000  # SYNTHETIC


class LoopbackHub:
    def __init__(self, fail_devices: tuple[str, ...] = (), hang_devices: tuple[str, ...] = (),
                 server_error_echo: bool = False) -> None:
        import qai_hub.public_api_pb2 as api_pb

        self.pb = api_pb
        self.tmp = Path()
        self.fail_devices, self.hang_devices = fail_devices, hang_devices
        self.server_error_echo = server_error_echo
        self.tokens_seen: set[str] = set()
        self.models: dict[str, Path] = {}
        self.datasets: dict[str, Path] = {}
        self.jobs: dict[str, Any] = {}  # id -> the InferenceJob request proto the client built
        self.outputs: dict[str, Path] = {}
        self.uploads: list[tuple[str, list[str]]] = []  # (model type, files) as uploaded

    # ----- the REST functions the client calls (same signatures as qai_hub.public_rest_api) -----

    def _device(self, name: str) -> Any:
        for n, os_, attrs in DEVICES:
            if n == name:
                return self.pb.Device(name=n, os=os_, attributes=attrs)
        raise KeyError(name)

    def get_device_list(self, config: Any, name: str = "", os: str = "", attributes: list[str] | None = None,
                        select: bool = False) -> Any:
        self.tokens_seen.add(config.api_token)
        found = [self._device(n) for n, _, attrs in DEVICES
                 if (not name or n == name) and all(a in attrs for a in (attributes or []))]
        return self.pb.DeviceList(devices=found, total_query_count=len(found))

    def create_and_upload_model(self, config: Any, path: str, model_type: Any, name: str | None = None,
                                project_id: str | None = None, verbose: bool | None = None,
                                is_directory: bool = False, **_: Any) -> Any:
        self.tokens_seen.add(config.api_token)
        mid = f"m{len(self.models) + 1}"
        folder = self.tmp / mid
        folder.mkdir()
        if is_directory:
            with zipfile.ZipFile(path) as z:
                z.extractall(folder)
        else:
            shutil.copy(path, folder)
        self.models[mid] = folder
        self.uploads.append((self.pb.ModelType.Name(model_type), sorted(p.name for p in folder.rglob("*")
                                                                         if p.is_file())))
        return self.pb.CreateUpdateResponse(id=mid)

    def create_and_upload_dataset(self, config: Any, path: str, name: str, permanent: bool = False, **_: Any) -> Any:
        did = f"d{len(self.datasets) + 1}"
        self.datasets[did] = Path(shutil.copy(path, self.tmp / f"{did}.h5"))
        return self.pb.CreateUpdateResponse(id=did)

    def create_inference_job(self, config: Any, inference_job_pb: Any, project_id: str | None = None) -> Any:
        jid = f"j{len(self.jobs) + 1}"
        req = self.pb.InferenceJob()
        req.CopyFrom(inference_job_pb)
        self.jobs[jid] = req
        if self.server_error_echo:  # a server that echoes the request's Authorization header in its error
            from qai_hub.client import APIException

            raise APIException(f"bad request (Authorization: token {config.api_token})")
        return self.pb.CreateUpdateResponse(id=jid)

    def _state(self, jid: str) -> Any:
        device = self.jobs[jid].device.name
        if device in self.fail_devices:
            return self.pb.JobState.JOB_STATE_FAILED
        if device in self.hang_devices:
            return self.pb.JobState.JOB_STATE_MEASURING_PERFORMANCE
        return self.pb.JobState.JOB_STATE_DONE

    def get_job(self, config: Any, job_id: str) -> Any:
        req = self.jobs[job_id]
        job = self.pb.InferenceJob()
        job.CopyFrom(req)
        job.inference_job_id = job_id
        job.job_state = self._state(job_id)
        job.device.CopyFrom(self._device(req.device.name))
        if job.job_state == self.pb.JobState.JOB_STATE_FAILED:
            job.failure_reason = "Loopback: the device ran out of memory (simulated failure)"
        return self.pb.Job(inference_job=job)

    def get_job_results(self, config: Any, job_id: str) -> Any:
        req = self.jobs[job_id]
        kind = "decode" if "decode" in req.name else "prompt"
        detail = self.pb.ProfileDetail(major_version=1, minor_version=2,
                                       execution_time=int(PROFILE_US[kind][0]),
                                       after_execution_peak_memory=PEAK_BYTES,
                                       cold_load_time=400_000, warm_load_time=90_000)
        detail.all_execution_times.extend(int(t) for t in PROFILE_US[kind])
        out_id = f"o{job_id}"
        self.outputs[out_id] = self._run(req)
        result = self.pb.InferenceJobResult(detail=detail, output_dataset_id=out_id)
        return self.pb.JobResult(inference_job_result=result)

    def get_dataset(self, config: Any, dataset_id: str) -> Any:
        return self.pb.Dataset(dataset_id=dataset_id, name=dataset_id)

    def download_dataset(self, config: Any, dataset_id: str, file_path: str, **_: Any) -> str:
        shutil.copy(self.outputs[dataset_id], file_path)
        return file_path

    # ----- running an uploaded model here -----

    def _run(self, req: Any) -> Path:
        import h5py
        from qai_hub.util.dataset_entries_converters import dataset_entries_to_h5, h5_to_dataset_entries

        folder = self.models[req.model.model_id]
        with h5py.File(self.datasets[req.dataset.dataset_id]) as f:
            inputs = h5_to_dataset_entries(f)
        model = next(folder.rglob("*.onnx"))
        feed = {name: values[0] for name, values in inputs.items()}
        if "--compute_unit npu" in req.options:  # the NPU: the QNN HTP simulator, in a child
            from llamaship.runtime.qnn_session import in_child

            names, outs = in_child(_run_htp, str(model), feed)
        else:
            names, outs = _run_cpu(str(model), feed)
        path = self.tmp / f"out-{req.model.model_id}-{req.dataset.dataset_id}.h5"
        with h5py.File(path, "w") as f:
            dataset_entries_to_h5({n: [o] for n, o in zip(names, outs, strict=True)}, f)
        return path

    @contextmanager
    def installed(self) -> Iterator[LoopbackHub]:
        fns = ("get_device_list", "create_and_upload_model", "create_and_upload_dataset", "create_inference_job",
               "get_job", "get_job_results", "get_dataset", "download_dataset")
        self.tmp = Path(tempfile.mkdtemp(prefix="hub-loopback-"))
        try:
            with mock.patch.multiple("qai_hub.client.api", **{f: getattr(self, f) for f in fns}), \
                    mock.patch("qai_hub.client.time.sleep", lambda s: None):  # the client polls every 10 s
                yield self
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _run_cpu(model: str, feed: dict[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return names, session.run(names, feed)


def _run_htp(model: str, feed: dict[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    import json

    from llamaship.runtime.qnn_session import htp_session

    soc = json.loads((Path(model).parent / "qnn_config.json").read_text())["soc_model"] \
        if (Path(model).parent / "qnn_config.json").exists() else "SM8650"
    session = htp_session(Path(model), soc)
    names = [o.name for o in session.get_outputs()]
    return names, session.run(names, feed)
