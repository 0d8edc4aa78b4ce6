"""A local stand-in for Google Cloud Storage, and the `fake_gcs` pytest fixture.

lmtrain reaches `gs://` through three clients, all of which honour an endpoint override:

- etils.epath -> fsspec -> gcsfs (metrics, config.json, tokenizers, Orbax's own metadata files):
  `STORAGE_EMULATOR_HOST`; anonymous with fsspec's `gcs` config `token=anon` (env `FSSPEC_GCS_TOKEN`).
- tensorstore's `gcs` kvstore (Orbax's array data, OCDBT): `TENSORSTORE_GCS_HTTP_URL`; a fixed bearer
  token from `GOOGLE_AUTH_TOKEN_FOR_TESTING`, so it looks for no credentials file and probes no GCE
  metadata server.
- ArrayRecord's own GCS reader (shards on gs://): `CLOUD_STORAGE_EMULATOR_ENDPOINT` (google-cloud-cpp).
- google-cloud-storage (Orbax's `rmtree` asks whether the bucket has a hierarchical namespace):
  `STORAGE_EMULATOR_HOST`, with which it is anonymous by itself.

The server speaks the subset of the JSON API those clients use: object get (metadata or media,
with `Range`), simple/multipart/resumable uploads, list (prefix, delimiter, start/endOffset, pages),
delete, compose, rewrite/copy, move, patch, bucket get/create/list, and the generation preconditions
(`ifGenerationMatch`, `ifGenerationNotMatch`, `ifMetagenerationMatch`, `ifSourceGenerationMatch`) that
tensorstore's conditional writes depend on. Anything else is answered 501, so a client that needs
more fails loudly instead of silently writing elsewhere.

Objects live as plain files under `<root>/<bucket>/<object name>`, so a test can look at what really
went through the server. Real GCS allows both `a` and `a/b` as objects; a file tree cannot, and the
fake refuses that (409) rather than losing one. The server binds 127.0.0.1 only, caps object and
total sizes, and is shut down by the fixture.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest

try:  # gcsfs pulls in google-crc32c; the fake works without it (md5 only).
    import google_crc32c
except ImportError:  # pragma: no cover
    google_crc32c = None

BUCKET = "test-bucket"
MAX_OBJECT_BYTES = 256 << 20
MAX_TOTAL_BYTES = 2 << 30
MAX_UPLOAD_SESSIONS = 256


class GCSError(Exception):
    def __init__(self, status: int, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


@dataclasses.dataclass
class _Object:
    generation: int
    metageneration: int
    size: int
    content_type: str
    md5: str
    crc32c: str | None
    created: str
    updated: str
    metadata: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Upload:
    bucket: str
    name: str
    content_type: str
    metadata: dict
    params: dict
    data: bytearray = dataclasses.field(default_factory=bytearray)


def _now() -> str:
    # gcsfs parses the fractional seconds, so they must be present.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _hashes(data: bytes) -> tuple[str, str | None]:
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    crc = base64.b64encode(google_crc32c.Checksum(data).digest()).decode() if google_crc32c else None
    return md5, crc


def _int_param(params: dict, key: str) -> int | None:
    if key not in params:
        return None
    try:
        return int(params[key])
    except ValueError:
        raise GCSError(400, f"Invalid long value: '{params[key]}' for {key}.") from None


class FakeGCSServer:
    """A threaded HTTP server on 127.0.0.1 holding buckets as directories under `root`."""

    def __init__(self, root: str | os.PathLike, buckets: tuple[str, ...] = (BUCKET,),
                 max_object_bytes: int = MAX_OBJECT_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._staging = self.root / ".staging"
        self._staging.mkdir(exist_ok=True)
        self.max_object_bytes, self.max_total_bytes = max_object_bytes, max_total_bytes
        self._lock = threading.RLock()
        self._buckets: dict[str, dict[str, _Object]] = {}
        self._bucket_created: dict[str, str] = {}
        self._uploads: dict[str, _Upload] = {}
        self._next_generation = time.time_ns() // 1000
        self._total_bytes = 0
        self.requests: collections.deque[tuple[str, str]] = collections.deque(maxlen=100_000)
        self.failures: list[tuple[str, str, int, str]] = []  # 5xx answers: the fake lacks something a client needs
        for b in buckets:
            self.create_bucket(b)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.endpoint = ""

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> FakeGCSServer:
        fake = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False
            request_queue_size = 64

            def process_request(self, request, client_address):
                with fake._lock:
                    fake._connections.add(request)
                super().process_request(request, client_address)

            def handle_error(self, request, client_address):
                # gcsfs races an object GET against a listing and drops the loser's connection.
                import sys

                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

            def shutdown_request(self, request):
                with fake._lock:
                    fake._connections.discard(request)
                super().shutdown_request(request)

        self._httpd = Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-gcs", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:  # idle keep-alive connections would otherwise hold their threads
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        self._thread.join(timeout=10)
        self._httpd = None

    # ------------------------------------------------------------------ helpers
    def bucket_dir(self, bucket: str = BUCKET) -> pathlib.Path:
        return self.root / bucket

    def create_bucket(self, bucket: str) -> None:
        with self._lock:
            if bucket in self._buckets:
                raise GCSError(409, f"bucket {bucket} already exists", "conflict")
            if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]", bucket):
                raise GCSError(400, f"invalid bucket name {bucket!r}")
            self._buckets[bucket] = {}
            self._bucket_created[bucket] = _now()
            self.bucket_dir(bucket).mkdir(exist_ok=True)

    def reset(self) -> None:
        """Empty every bucket (between tests)."""
        with self._lock:
            for bucket, objects in self._buckets.items():
                objects.clear()
                shutil.rmtree(self.bucket_dir(bucket), ignore_errors=True)
                self.bucket_dir(bucket).mkdir()
            self._uploads.clear()
            self._total_bytes = 0
            self.requests.clear()
            self.failures.clear()

    def object_names(self, bucket: str = BUCKET) -> list[str]:
        with self._lock:
            return sorted(self._objects(bucket))

    def _objects(self, bucket: str) -> dict[str, _Object]:
        if bucket not in self._buckets:
            raise GCSError(404, f"The specified bucket does not exist: {bucket}", "notFound")
        return self._buckets[bucket]

    def _file(self, bucket: str, name: str) -> pathlib.Path:
        parts = name.rstrip("/").split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            # Real GCS accepts these; the file-tree mirror cannot, and lmtrain never should produce them.
            raise GCSError(400, f"fake GCS refuses object name {name!r} (empty, '.', '..' or '//' segment)")
        return self.bucket_dir(bucket).joinpath(*parts)

    def _get(self, bucket: str, name: str) -> _Object:
        obj = self._objects(bucket).get(name)
        if obj is None:
            raise GCSError(404, f"No such object: {bucket}/{name}", "notFound")
        return obj

    def _read(self, bucket: str, name: str) -> tuple[_Object, bytes]:
        with self._lock:
            obj = self._get(bucket, name)
            data = b"" if name.endswith("/") else self._file(bucket, name).read_bytes()
            return obj, data

    @staticmethod
    def _check_preconditions(obj: _Object | None, params: dict, prefix: str = "", *, read: bool = False) -> None:
        match = _int_param(params, f"if{prefix}GenerationMatch")
        if match is not None:
            if match == 0 and obj is not None or match != 0 and (obj is None or obj.generation != match):
                raise GCSError(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")
        not_match = _int_param(params, f"if{prefix}GenerationNotMatch")
        if not_match is not None and obj is not None and obj.generation == not_match:
            if read:
                raise GCSError(304, "Not modified", "notModified")
            raise GCSError(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")
        for key, equal in ((f"if{prefix}MetagenerationMatch", True), (f"if{prefix}MetagenerationNotMatch", False)):
            value = _int_param(params, key)
            if value is not None and (obj is None or (obj.metageneration == value) != equal):
                raise GCSError(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")

    def _put(self, bucket: str, name: str, data: bytes, content_type: str, metadata: dict, params: dict) -> _Object:
        if len(data) > self.max_object_bytes:
            raise GCSError(413, f"fake GCS: object of {len(data)} bytes exceeds the {self.max_object_bytes} cap")
        path = self._file(bucket, name)
        staged = self._staging / uuid.uuid4().hex
        if not name.endswith("/"):
            staged.write_bytes(data)
        try:
            with self._lock:
                objects = self._objects(bucket)
                old = objects.get(name)
                self._check_preconditions(old, params)
                if name.endswith("/"):
                    if data:
                        raise GCSError(409, f"fake GCS stores '{name}' as a folder marker; it must be empty", "conflict")
                    if path.is_file():
                        raise GCSError(409, f"fake GCS cannot hold both '{name.rstrip('/')}' and '{name}'", "conflict")
                else:
                    if path.is_dir():
                        raise GCSError(409, f"fake GCS cannot hold both '{name}' and objects under '{name}/'",
                                       "conflict")
                for parent in path.relative_to(self.bucket_dir(bucket)).parents:
                    if parent.parts and (self.bucket_dir(bucket) / parent).is_file():
                        raise GCSError(409, f"fake GCS cannot hold both '{parent.as_posix()}' and '{name}'", "conflict")
                grow = len(data) - (old.size if old else 0)
                if self._total_bytes + grow > self.max_total_bytes:
                    raise GCSError(403, f"fake GCS quota of {self.max_total_bytes} bytes exceeded", "quotaExceeded")
                path.parent.mkdir(parents=True, exist_ok=True)
                if name.endswith("/"):
                    path.mkdir(exist_ok=True)
                else:
                    os.replace(staged, path)
                self._total_bytes += grow
                self._next_generation += 1
                md5, crc = _hashes(data)
                now = _now()
                obj = _Object(self._next_generation, 1, len(data), content_type or "application/octet-stream", md5, crc,
                              now, now, dict(metadata or {}))
                objects[name] = obj
                return obj
        finally:
            staged.unlink(missing_ok=True)

    def _delete(self, bucket: str, name: str, params: dict) -> None:
        with self._lock:
            obj = self._get(bucket, name)
            self._check_preconditions(obj, params)
            path = self._file(bucket, name)
            del self._objects(bucket)[name]
            self._total_bytes -= obj.size
            if name.endswith("/"):
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink()
            self._prune(bucket, path.parent)

    def _prune(self, bucket: str, directory: pathlib.Path) -> None:
        """GCS has no empty directories: remove the ones a delete left, except folder markers."""
        top = self.bucket_dir(bucket)
        objects = self._objects(bucket)
        while directory != top and directory.is_dir() and not any(directory.iterdir()):
            if directory.relative_to(top).as_posix() + "/" in objects:
                break
            directory.rmdir()
            directory = directory.parent

    def resource(self, bucket: str, name: str, obj: _Object) -> dict:
        quoted = quote(name, safe="")
        out = {
            "kind": "storage#object",
            "id": f"{bucket}/{name}/{obj.generation}",
            "selfLink": f"{self.endpoint}/storage/v1/b/{bucket}/o/{quoted}",
            "mediaLink": f"{self.endpoint}/download/storage/v1/b/{bucket}/o/{quoted}?generation={obj.generation}&alt=media",
            "name": name,
            "bucket": bucket,
            "generation": str(obj.generation),
            "metageneration": str(obj.metageneration),
            "contentType": obj.content_type,
            "storageClass": "STANDARD",
            "size": str(obj.size),
            "md5Hash": obj.md5,
            "etag": obj.md5,
            "timeCreated": obj.created,
            "updated": obj.updated,
            "timeStorageClassUpdated": obj.created,
        }
        if obj.crc32c:
            out["crc32c"] = obj.crc32c
        if obj.metadata:
            out["metadata"] = obj.metadata
        return out

    def _bucket_resource(self, bucket: str) -> dict:
        created = self._bucket_created[bucket]
        return {"kind": "storage#bucket", "id": bucket, "name": bucket, "selfLink": f"{self.endpoint}/storage/v1/b/{bucket}",
                "projectNumber": "0", "metageneration": "1", "location": "US", "storageClass": "STANDARD",
                "locationType": "multi-region", "timeCreated": created, "updated": created, "etag": "CAE="}

    # ------------------------------------------------------------------ routes
    def handle(self, req: _Handler) -> None:
        split = urlsplit(req.path)
        params = dict(parse_qsl(split.query, keep_blank_values=True))
        path = split.path
        self.requests.append((req.command, req.path))
        try:
            body = req.read_body(self.max_object_bytes)
            for pattern, method, fn in _ROUTES:
                m = re.fullmatch(pattern, path)
                if m and req.command == method:
                    groups = {k: unquote(v) for k, v in m.groupdict().items()}
                    fn(self, req, params, body, **groups)
                    return
            raise GCSError(501, f"fake GCS does not implement {req.command} {path}", "notImplemented")
        except GCSError as e:
            if e.status >= 500:
                self.failures.append((req.command, req.path, e.status, e.message))
            if e.status == 304:
                req.reply(304, b"")
            else:
                error = {"code": e.status, "message": e.message,
                         "errors": [{"domain": "global", "reason": e.reason, "message": e.message}]}
                req.reply_json({"error": error}, e.status)
        except ConnectionError:
            raise  # the client went away (gcsfs cancels the loser of its GET-or-list race): nothing to answer
        except Exception as e:  # noqa: BLE001 - a fake server must answer, and the test must see why
            self.failures.append((req.command, req.path, 500, repr(e)))
            req.reply_json({"error": {"code": 500, "message": f"fake GCS crashed: {e!r}"}}, 500)

    def list_buckets(self, req, params, body):
        with self._lock:
            items = [self._bucket_resource(b) for b in sorted(self._buckets)]
        req.reply_json({"kind": "storage#buckets", "items": items})

    def insert_bucket(self, req, params, body):
        name = json.loads(body or b"{}").get("name", "")
        self.create_bucket(name)
        req.reply_json(self._bucket_resource(name))

    def get_bucket(self, req, params, body, bucket):
        with self._lock:
            self._objects(bucket)
            req.reply_json(self._bucket_resource(bucket))

    def delete_bucket(self, req, params, body, bucket):
        with self._lock:
            if self._objects(bucket):
                raise GCSError(409, f"The bucket you tried to delete is not empty: {bucket}", "conflict")
            del self._buckets[bucket]
            shutil.rmtree(self.bucket_dir(bucket), ignore_errors=True)
        req.reply(204, b"")

    def list_objects(self, req, params, body, bucket):
        unsupported = {"matchGlob", "softDeleted"} & params.keys()
        if unsupported:
            raise GCSError(501, f"fake GCS does not implement list parameters {sorted(unsupported)}", "notImplemented")
        prefix, delimiter = params.get("prefix", ""), params.get("delimiter", "")
        start, end = params.get("startOffset", ""), params.get("endOffset", "")
        trailing = params.get("includeTrailingDelimiter", "").lower() == "true"
        page_size = max(1, min(_int_param(params, "maxResults") or 1000, 5000))
        token = params.get("pageToken", "")
        with self._lock:
            objects = self._objects(bucket)
            entries: dict[str, tuple[str, dict | None]] = {}  # sort key -> (kind, resource)
            for name in sorted(objects):
                if not name.startswith(prefix) or name < start or (end and name >= end):
                    continue
                rest = name[len(prefix):]
                cut = rest.find(delimiter) if delimiter else -1
                if cut >= 0:
                    folder = prefix + rest[: cut + len(delimiter)]
                    entries.setdefault(folder, ("prefix", None))
                    if not (trailing and name == folder):
                        continue
                    entries[folder + "\0"] = ("item", self.resource(bucket, name, objects[name]))
                    continue
                entries[name] = ("item", self.resource(bucket, name, objects[name]))
        keys = [k for k in sorted(entries) if k > token]
        page, more = keys[:page_size], len(keys) > page_size
        out: dict = {"kind": "storage#objects",
                     "items": [entries[k][1] for k in page if entries[k][0] == "item"],
                     "prefixes": [k for k in page if entries[k][0] == "prefix"]}
        if more:
            out["nextPageToken"] = page[-1]
        req.reply_json(out)

    def get_object(self, req, params, body, bucket, name):
        with self._lock:
            obj = self._get(bucket, name)
            if "generation" in params and int(params["generation"]) != obj.generation:
                raise GCSError(404, f"No such object: {bucket}/{name}#{params['generation']}", "notFound")
            self._check_preconditions(obj, params, read=True)
            if params.get("alt", "json") != "media":
                req.reply_json(self.resource(bucket, name, obj))
                return
            obj, data = self._read(bucket, name)
        headers = {"x-goog-generation": str(obj.generation), "x-goog-metageneration": str(obj.metageneration),
                   "x-goog-stored-content-length": str(obj.size)}
        ranged = req.headers.get("Range")
        if ranged:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", ranged)
            if not m or (m.group(1) == "" and m.group(2) == ""):
                raise GCSError(400, f"fake GCS cannot parse Range {ranged!r}")
            if m.group(1) == "":
                first, last = max(0, obj.size - int(m.group(2))), obj.size - 1
            else:
                first = int(m.group(1))
                last = min(int(m.group(2)), obj.size - 1) if m.group(2) else obj.size - 1
            if first >= obj.size or last < first:
                req.reply(416, b"", {"Content-Range": f"bytes */{obj.size}", **headers})
                return
            headers["Content-Range"] = f"bytes {first}-{last}/{obj.size}"
            req.reply(206, data[first:last + 1], headers, obj.content_type)
            return
        headers["x-goog-hash"] = f"md5={obj.md5}" + (f",crc32c={obj.crc32c}" if obj.crc32c else "")
        req.reply(200, data, headers, obj.content_type)

    def delete_object(self, req, params, body, bucket, name):
        self._delete(bucket, name, params)
        req.reply(204, b"")

    def patch_object(self, req, params, body, bucket, name):
        update = json.loads(body or b"{}")
        with self._lock:
            obj = self._get(bucket, name)
            self._check_preconditions(obj, params)
            if "contentType" in update:
                obj.content_type = update["contentType"]
            if "metadata" in update:
                for k, v in (update["metadata"] or {}).items():
                    if v is None:
                        obj.metadata.pop(k, None)
                    else:
                        obj.metadata[k] = v
            obj.metageneration += 1
            obj.updated = _now()
            req.reply_json(self.resource(bucket, name, obj))

    def compose(self, req, params, body, bucket, name):
        spec = json.loads(body or b"{}")
        parts = []
        content_type = (spec.get("destination") or {}).get("contentType")
        for src in spec.get("sourceObjects", []):
            obj, data = self._read(bucket, src["name"])
            pre = src.get("objectPreconditions", {})
            if "ifGenerationMatch" in pre and int(pre["ifGenerationMatch"]) != obj.generation:
                raise GCSError(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")
            content_type = content_type or obj.content_type
            parts.append(data)
        metadata = (spec.get("destination") or {}).get("metadata") or {}
        obj = self._put(bucket, name, b"".join(parts), content_type, metadata, params)
        req.reply_json(self.resource(bucket, name, obj))

    def copy(self, req, params, body, bucket, name, op, dest_bucket, dest_name):
        src, data = self._read(bucket, name)
        self._check_preconditions(src, params, "Source")
        override = json.loads(body or b"{}")
        obj = self._put(dest_bucket, dest_name, data, override.get("contentType", src.content_type),
                        override.get("metadata", src.metadata), params)
        resource = self.resource(dest_bucket, dest_name, obj)
        if op == "copyTo":
            req.reply_json(resource)
        else:
            req.reply_json({"kind": "storage#rewriteResponse", "totalBytesRewritten": str(obj.size),
                            "objectSize": str(obj.size), "done": True, "resource": resource})

    def move(self, req, params, body, bucket, name, dest_name):
        """Objects: move (atomic rename within a bucket; gcsfs tries it first for `mv`)."""
        with self._lock:
            src, data = self._read(bucket, name)
            self._check_preconditions(src, params, "Source")
            obj = self._put(bucket, dest_name, data, src.content_type, src.metadata, params)
            self._delete(bucket, name, {})
        req.reply_json(self.resource(bucket, dest_name, obj))

    def upload(self, req, params, body, bucket):
        if "upload_id" in params:  # gcsfs sends resumable chunks with POST, others with PUT
            self.upload_chunk(req, params, body, bucket)
            return
        kind = params.get("uploadType", "")
        if kind == "media":
            self._upload_done(req, bucket, params.get("name", ""), body, req.headers.get("Content-Type", ""), {}, params)
        elif kind == "multipart":
            meta, data, content_type = _parse_multipart(req.headers.get("Content-Type", ""), body)
            name = params.get("name") or meta.get("name", "")
            self._upload_done(req, bucket, name, data, meta.get("contentType", content_type), meta.get("metadata"),
                              params)
        elif kind == "resumable":
            meta = json.loads(body) if body.strip() else {}
            name = params.get("name") or meta.get("name", "")
            with self._lock:
                self._objects(bucket)
                self._file(bucket, name)
                if len(self._uploads) >= MAX_UPLOAD_SESSIONS:
                    raise GCSError(429, "fake GCS: too many open resumable uploads", "rateLimitExceeded")
                upload_id = uuid.uuid4().hex
                content_type = meta.get("contentType") or req.headers.get("X-Upload-Content-Type", "")
                self._uploads[upload_id] = _Upload(bucket, name, content_type, meta.get("metadata") or {}, params)
            location = f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
            req.reply_json({}, 200, {"Location": location})
        else:
            raise GCSError(400, f"fake GCS: unsupported uploadType {kind!r}")

    def upload_chunk(self, req, params, body, bucket):
        upload_id = params.get("upload_id", "")
        with self._lock:
            up = self._uploads.get(upload_id)
        if up is None:
            raise GCSError(404, f"no resumable upload {upload_id}", "notFound")
        m = re.fullmatch(r"\s*bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", req.headers.get("Content-Range", "bytes */*"))
        if not m:
            raise GCSError(400, f"fake GCS cannot parse Content-Range {req.headers.get('Content-Range')!r}")
        if m.group(1) is not None:
            first, last = int(m.group(1)), int(m.group(2))
            if first != len(up.data) or last - first + 1 != len(body):
                raise GCSError(400, f"fake GCS: chunk {first}-{last} ({len(body)} bytes) does not continue at "
                                    f"{len(up.data)}")
            if len(up.data) + len(body) > self.max_object_bytes:
                raise GCSError(413, f"fake GCS: upload exceeds the {self.max_object_bytes} byte cap")
            up.data += body
        total = m.group(3)
        if total != "*" and int(total) == len(up.data):
            with self._lock:
                self._uploads.pop(upload_id, None)
            self._upload_done(req, up.bucket, up.name, bytes(up.data), up.content_type, up.metadata, up.params)
            return
        if total != "*" and int(total) < len(up.data):
            raise GCSError(400, f"fake GCS: upload of {len(up.data)} bytes exceeds its declared size {total}")
        headers = {"Range": f"bytes=0-{len(up.data) - 1}"} if up.data else {}
        req.reply(308, b"", headers)  # no Location header, or HTTP clients would follow it as a redirect

    def cancel_upload(self, req, params, body, bucket):
        with self._lock:
            if self._uploads.pop(params.get("upload_id", ""), None) is None:
                raise GCSError(404, "no such resumable upload", "notFound")
        req.reply(499, b"")

    def _upload_done(self, req, bucket, name, data, content_type, metadata, params):
        obj = self._put(bucket, name, data, content_type, metadata or {}, params)
        req.reply_json(self.resource(bucket, name, obj))


_B = r"(?P<bucket>[^/]+)"
_O = r"(?P<name>.+)"
_ROUTES = [
    (r"/storage/v1/b/?", "GET", FakeGCSServer.list_buckets),
    (r"/storage/v1/b/?", "POST", FakeGCSServer.insert_bucket),
    (rf"/storage/v1/b/{_B}/?", "GET", FakeGCSServer.get_bucket),
    (rf"/storage/v1/b/{_B}/?", "DELETE", FakeGCSServer.delete_bucket),
    (rf"/storage/v1/b/{_B}/o/?", "GET", FakeGCSServer.list_objects),
    (rf"/storage/v1/b/{_B}/o/{_O}/compose", "POST", FakeGCSServer.compose),
    (rf"/storage/v1/b/{_B}/o/{_O}/(?P<op>rewriteTo|copyTo)/b/(?P<dest_bucket>[^/]+)/o/(?P<dest_name>.+)", "POST",
     FakeGCSServer.copy),
    (rf"/storage/v1/b/{_B}/o/{_O}/moveTo/o/(?P<dest_name>.+)", "POST", FakeGCSServer.move),
    (rf"/(?:download/)?storage/v1/b/{_B}/o/{_O}", "GET", FakeGCSServer.get_object),
    (rf"/storage/v1/b/{_B}/o/{_O}", "DELETE", FakeGCSServer.delete_object),
    (rf"/storage/v1/b/{_B}/o/{_O}", "PATCH", FakeGCSServer.patch_object),
    (rf"/upload/storage/v1/b/{_B}/o/?", "POST", FakeGCSServer.upload),
    (rf"/upload/storage/v1/b/{_B}/o/?", "PUT", FakeGCSServer.upload_chunk),
    (rf"/upload/storage/v1/b/{_B}/o/?", "DELETE", FakeGCSServer.cancel_upload),
]


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict, bytes, str]:
    """multipart/related: a JSON metadata part, then the media part (gcsfs separates with LF, others CRLF)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise GCSError(400, f"multipart upload without a boundary: {content_type!r}")
    delim = b"--" + m.group(1).encode()
    end = body.rfind(delim + b"--")
    first = body.find(delim)
    second = body.find(delim, first + len(delim))
    if first < 0 or second < 0 or end <= second:
        raise GCSError(400, "fake GCS cannot parse the multipart body")

    def part(chunk: bytes) -> tuple[dict, bytes]:
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk[1:] if chunk.startswith(b"\n") else chunk
        sep = re.search(rb"\r?\n\r?\n", chunk)
        head, payload = chunk[: sep.start()], chunk[sep.end():]
        payload = payload[:-2] if payload.endswith(b"\r\n") else payload[:-1] if payload.endswith(b"\n") else payload
        headers = {}
        for line in head.decode("latin-1").splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return headers, payload

    _, meta = part(body[first + len(delim): second])
    media_headers, data = part(body[second + len(delim): end])
    return json.loads(meta or b"{}"), data, media_headers.get("content-type", "application/octet-stream")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered at once (libcurl waits 1 s otherwise)
    timeout = 120
    disable_nagle_algorithm = True  # headers and body go out in two writes; Nagle + delayed ACK costs 40 ms each

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def read_body(self, limit: int) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return bytes(out)
                if len(out) + size > limit:
                    self.close_connection = True
                    raise GCSError(413, f"fake GCS: request body exceeds {limit} bytes")
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self.close_connection = True
            raise GCSError(413, f"fake GCS: request body of {length} bytes exceeds {limit}")
        return self.rfile.read(length) if length else b""

    def reply(self, status: int, body: bytes, headers: dict | None = None, content_type: str | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if content_type:
            self.send_header("Content-Type", content_type)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(self, payload: dict, status: int = 200, headers: dict | None = None) -> None:
        self.reply(status, json.dumps(payload).encode(), headers, "application/json; charset=UTF-8")

    def _dispatch(self):
        self.server.fake.handle(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


@dataclasses.dataclass
class FakeGCS:
    """What the `fake_gcs` fixture yields."""

    url: str  # gs://test-bucket
    objects_dir: pathlib.Path  # the server's files for that bucket: what a test can check really went through it
    server: FakeGCSServer

    def object_names(self) -> list[str]:
        return self.server.object_names(self.url.removeprefix("gs://"))


def client_env(endpoint: str) -> dict[str, str]:
    """Environment pointing every gs:// client of lmtrain's stack at `endpoint` (also for subprocesses)."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs and google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": endpoint,  # tensorstore's gcs kvstore (Orbax array data)
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,  # google-cloud-cpp: ArrayRecord reading gs:// shards
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-token",  # tensorstore: no credential search, no GCE probe
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs in a subprocess (fsspec reads FSSPEC_<PROTOCOL>_<KWARG> at import)
        "NO_GCE_CHECK": "true",  # gcsfs/google-auth: never probe a GCE metadata server
        # gcsfs >= 2026 otherwise asks the gRPC Storage Control API for each bucket's layout (zonal or
        # hierarchical?), which a JSON-API fake cannot answer: every call then waits 60 s and falls back.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_CLOUD_PROJECT": "fake-gcs-project",
    }


def _forget_cached_clients() -> None:
    """gcsfs caches filesystem instances with their listings, and epath caches the instance."""
    import gcsfs.core
    from etils.epath import backend

    gcsfs.core.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="session")
def _fake_gcs_server(tmp_path_factory):
    server = FakeGCSServer(tmp_path_factory.mktemp("fake-gcs")).start()
    yield server
    server.stop()


@pytest.fixture
def fake_gcs(_fake_gcs_server, monkeypatch):
    """A local GCS holding an empty gs://test-bucket, with every client of the process pointed at it.

    One server serves the whole session (tensorstore keeps the endpoint of a bucket it has opened);
    each test starts with empty buckets.
    """
    import fsspec.config
    import gcsfs.core
    from fsspec.registry import _registry

    _fake_gcs_server.reset()
    for key, value in client_env(_fake_gcs_server.endpoint).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), "token": "anon"})
    # In this process gcsfs may already be imported with its experimental class (see client_env).
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(_registry, protocol, gcsfs.core.GCSFileSystem)
    _forget_cached_clients()
    yield FakeGCS(f"gs://{BUCKET}", _fake_gcs_server.bucket_dir(BUCKET), _fake_gcs_server)
    _forget_cached_clients()
    assert not _fake_gcs_server.failures, f"the fake GCS could not serve: {_fake_gcs_server.failures[:5]}"
