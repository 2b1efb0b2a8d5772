"""locust: gRPC users sending whole-volume ``segment_volume`` requests to Triton (tritonclient.grpc).

Run through ``python -m perf.load`` (it prepares the volumes and reads the CSVs back), or directly:

    DUPLUS_LOCUST_CASES=cases.npz locust -f perf/locustfile.py --headless -u 2 -r 1 -t 60s \
        --host 127.0.0.1:8001 --csv perf/results/cpu-2core/locust

Each request picks one of the prepared volumes and phrases its prompts the way users do: a T1
paraphrase of the volume's modality and region, and 1-3 of its targets under synonyms the model
was trained with ("primary tumour", "GTVp", "the liver", ...).
"""

import atexit
import os
import random
import sys
import time

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # grpc must cooperate with locust's gevent loop

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, between, events, task  # noqa: E402

CASES_ENV = "DUPLUS_LOCUST_CASES"


def load_cases(path: str) -> list[dict]:
    with np.load(path, allow_pickle=False) as z:
        n = int(z["count"])
        return [{"name": str(z[f"name_{i}"]), "volume": z[f"volume_{i}"], "affine": z[f"affine_{i}"],
                 "modality": str(z[f"modality_{i}"]), "t1": [str(t) for t in z[f"t1_{i}"]],
                 "targets": {str(k): [str(s) for s in z[f"syn_{i}_{j}"]] for j, k in enumerate(z[f"targets_{i}"])}}
                for i in range(n)]


@events.quit.add_listener
def _leave_without_grpc_finalizers(exit_code, **_kwargs):
    """Exit with locust's code once it has written its CSVs, skipping the interpreter's final GC.

    grpc's gevent integration can deadlock in a finalizer at interpreter exit: the run is over and
    its statistics are written, yet the process hangs in ``Py_FinalizeEx`` -> gc -> a grpc mutex
    (seen with grpcio 1.85 and locust 2.47, ``gdb`` backtrace in the commit). Locust fires ``quit``,
    closes its CSV files and calls ``sys.exit``; this atexit hook, registered last and so run first,
    then leaves before the collector reaches grpc's objects.
    """
    def leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)

    atexit.register(leave)


def _input(name, arr, dtype):
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


class SegmentVolumeUser(User):
    """One radiology workstation: a whole volume per request, a short think time between requests."""

    wait_time = between(0.2, 1.0)

    def on_start(self):
        path = os.environ.get(CASES_ENV)
        if not path:
            raise RuntimeError(f"set {CASES_ENV} to a cases .npz (python -m perf.load writes one)")
        self.cases = load_cases(path)
        limit = 1 << 30
        self.client = grpcclient.InferenceServerClient(
            self.host, channel_args=[("grpc.max_send_message_length", limit),
                                     ("grpc.max_receive_message_length", limit)])
        self.rng = random.Random(hash(self) & 0xFFFF)

    def on_stop(self):
        self.client.close()

    @task
    def segment_volume(self):
        case = self.rng.choice(self.cases)
        chosen = self.rng.sample(sorted(case["targets"]), k=self.rng.randint(1, len(case["targets"])))
        targets = [self.rng.choice(case["targets"][t]) for t in chosen]
        t1 = self.rng.choice(case["t1"])
        inputs = [_input("VOLUME", case["volume"], "FP32"), _input("AFFINE", case["affine"], "FP64"),
                  _input("MODALITY", np.array([case["modality"].encode()], dtype=np.object_), "BYTES"),
                  _input("T1", np.array([t1.encode()], dtype=np.object_), "BYTES"),
                  _input("TARGETS", np.array([t.encode() for t in targets], dtype=np.object_), "BYTES")]
        start = time.perf_counter()
        exception, length = None, 0
        try:
            result = self.client.infer("segment_volume", inputs,
                                       outputs=[grpcclient.InferRequestedOutput("LABELS")], client_timeout=600)
            labels = result.as_numpy("LABELS")
            if labels.shape != case["volume"].shape:
                raise AssertionError(f"labels {labels.shape} != volume {case['volume'].shape}")
            length = labels.nbytes
        except Exception as exc:  # noqa: BLE001 - every failure is counted by locust
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc", name=f"segment_volume {case['name']}", response_time=(time.perf_counter() - start)
            * 1000, response_length=length, exception=exception, context={"targets": targets, "t1": t1})
