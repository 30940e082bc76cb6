"""A local Cloud Storage JSON API for the tests and the loader benchmark: gcp-storage-emulator's
in-memory storage and request handlers, served with three changes that bring it closer to the
real service.

- Every object download carries the ``x-goog-generation`` header Cloud Storage sends. The emulator
  leaves it out; tensorstore (orbax's array writer) reads an object's generation from it and
  refuses the read ("Malformed StorageGeneration") without it.
- ``--threaded``: requests are served concurrently over kept-alive HTTP/1.1 connections, as Cloud
  Storage serves them, instead of one at a time.
- ``--delay-ms D``: every request waits D ms before it is answered. A ranged read from Cloud
  Storage takes tens of milliseconds to its first byte; a loader measured against a server that
  answers at once says nothing about how it copes with that.

``GET /_stats`` answers the number of requests served and the bytes of object data sent, so a
benchmark can count what a reader asked for. Run it as
``python -m benchmarks.gcs_emulator --port P --bucket B [--threaded] [--delay-ms D]``, or use
``Emulator`` from Python: it starts that process and sets the variables that point gcsfs
(``etils.epath``'s ``gs://`` backend), tensorstore and google-cloud-storage at it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http import server as http_server

STATS_PATH = "/_stats"


def serve(port: int, bucket: str, *, threaded: bool, delay_ms: float) -> None:
    from gcp_storage_emulator.handlers import buckets, objects
    from gcp_storage_emulator.storage import Storage

    counts = {"requests": 0, "bytes_sent": 0}
    lock = threading.Lock()
    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            with lock:
                counts["bytes_sent"] += len(response._content)

    # Before the server module is imported: its routing table holds the function objects.
    objects.download = download_with_generation
    from gcp_storage_emulator.server import RequestHandler

    class Handler(RequestHandler):
        protocol_version = "HTTP/1.1" if threaded else "HTTP/1.0"

        def setup(self):
            super().setup()
            # Headers and body leave in two writes: with Nagle's algorithm on a kept-alive
            # connection the second waits for the client's delayed ACK, 40 ms a request.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def handle_one_request(self):
            # Wait only once a request has arrived, not while a kept-alive connection is idle.
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if self.path == STATS_PATH:
                with lock:
                    body = json.dumps(counts).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            with lock:
                counts["requests"] += 1
            if delay_ms:
                time.sleep(delay_ms / 1000)
            method = getattr(self, f"do_{self.command}", None)
            if method is None:
                self.send_error(501, f"unsupported method {self.command!r}")
                return
            method()
            self.wfile.flush()

    storage = Storage(use_memory_fs=True)
    buckets.create_bucket(bucket, storage)
    class Server(http_server.ThreadingHTTPServer if threaded else http_server.HTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # a reader opens many connections at once; the default 5 drops some

    httpd = Server(("127.0.0.1", port), partial(Handler, storage))
    httpd.serve_forever()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(url: str | None = None) -> dict[str, int]:
    """Requests served and object bytes sent so far by the emulator at `url` (default: the one
    STORAGE_EMULATOR_HOST points at)."""
    with urllib.request.urlopen((url or os.environ["STORAGE_EMULATOR_HOST"]) + STATS_PATH, timeout=10) as response:
        return json.loads(response.read())


class Emulator:
    """The emulator in a process of its own, and the environment that points clients at it.

    ``with Emulator() as gs:`` yields ``"gs://<bucket>"``; on exit the process stops and the
    variables are restored.
    """

    def __init__(self, *, bucket: str = "sdxl-tpu-test", threaded: bool = False, delay_ms: float = 0.0):
        self.bucket, self.threaded, self.delay_ms = bucket, threaded, delay_ms
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GOOGLE_CLOUD_PROJECT": "test",
            # gcsfs's default file system first probes a bucket's type over gRPC, which this plain
            # HTTP server does not speak: each new bucket would cost a minute of retries.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def __enter__(self) -> str:
        command = [sys.executable, "-m", "benchmarks.gcs_emulator", "--port", str(self.port), "--bucket", self.bucket,
                   "--delay-ms", str(self.delay_ms)] + (["--threaded"] if self.threaded else [])
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.process = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                stats(self.url)
                break
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("the storage emulator exited at start") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("the storage emulator did not start within 60 s") from None
                time.sleep(0.2)
        self._saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        return f"gs://{self.bucket}"

    def __exit__(self, *exc) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", default="sdxl-tpu-test")
    parser.add_argument("--threaded", action="store_true", help="serve requests concurrently, kept alive")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wait this long before answering each request")
    args = parser.parse_args()
    serve(args.port, args.bucket, threaded=args.threaded, delay_ms=args.delay_ms)


if __name__ == "__main__":
    main()
