"""Runs gcp-storage-emulator (``python tests/gcs_emulator.py start --port P ...``, its own arguments)
with one fix: the ``x-goog-generation`` header real Cloud Storage sends with every object
download. The emulator leaves it out; tensorstore (orbax's array writer) reads an object's
generation from it and refuses the read ("Malformed StorageGeneration") without it."""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (200, 206):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


# Before the server module is imported: its routing table holds the function objects.
objects.download = download

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
