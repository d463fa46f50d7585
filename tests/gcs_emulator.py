"""A Google Cloud Storage emulator on localhost that every library a run uses on `gs://` paths reaches.

    python tests/gcs_emulator.py --bucket=NAME --ready_file=PATH    (GCS_EMULATOR_LOG=1: print each request line)

Starts `gcp-storage-emulator` (in memory) and a TLS-terminating HTTP proxy in front of it, then writes to
--ready_file the environment a client process needs (JSON) and serves until killed. Per library:
- tensorstore (orbax's array storage): `TENSORSTORE_GCS_HTTP_URL` points at the emulator directly;
- google-cloud-storage (orbax asks it whether a bucket has a hierarchical namespace): `STORAGE_EMULATOR_HOST`;
- TensorFlow's gs:// file system (tf.io.gfile: etils.epath's backend with TensorFlow installed, tf.data readers,
  tfds, clu's TensorBoard writer) has https://www.googleapis.com built in and no endpoint setting. It does honour
  `https_proxy` and `CURL_CA_BUNDLE`, so the proxy answers its CONNECT with a certificate for the Google hosts,
  signed by a CA made here, and passes the decrypted requests on to the emulator;
- TensorFlow and tensorstore authenticate with `GOOGLE_AUTH_TOKEN_FOR_TESTING`, which skips the metadata server.

What the emulator (2026.7.19) does unlike GCS is mended here, in its process or in the proxy:
- a zero-byte media upload (the "folder" object tf.io.gfile.makedirs writes) crashes its handler;
- downloads lack the `x-goog-generation` header: tensorstore reads an object's generation from it, and orbax's
  OCDBT writes are conditional on it ("Malformed StorageGeneration" without it);
- `ifGenerationMatch` preconditions are ignored: they are checked here (GCS answers 412), which the workdir
  lock's atomic create relies on;
- a request with both `Transfer-Encoding: chunked` and `Content-Length` (libcurl sends both on resumable uploads)
  is read by the length, against RFC 9112 6.3: the proxy drops the length;
- it has no `storageLayout` of a bucket, which TensorFlow reads before it renames a folder: answered here (a flat
  namespace, as a bucket has by default);
- it never answers `Expect: 100-continue`, so libcurl waits a second before every upload body (8 s instead of
  0.5 s per orbax save): the proxy answers it.
"""
import argparse
import datetime
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from http import HTTPStatus
from urllib.parse import unquote

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificate(folder: str) -> tuple[str, str]:
    """(certificate, key) PEM files of a self-signed certificate for the Google storage hosts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clmae-jax test GCS")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]), False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .sign(key, hashes.SHA256()))
    cert_file, key_file = os.path.join(folder, "ca.pem"), os.path.join(folder, "key.pem")
    with open(cert_file, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_file, key_file


def read_head(sock) -> tuple[bytes | None, bytes]:
    """(request line and headers, bytes read past them) of the next request on `sock`; None at its end."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def origin_form(head: bytes) -> bytes:
    """The request with an absolute URL made a path, Content-Length dropped beside chunked encoding, and no
    `Expect: 100-continue` (the proxy answers it: the emulator never does, and libcurl waits a second for it)."""
    request_line, *headers = head.split(b"\r\n")
    headers = [h for h in headers if not h.lower().startswith(b"expect:")]
    method, target, version = request_line.split(b" ")
    if b"://" in target:  # A plain-HTTP proxy request: GET http://host/path.
        target = b"/" + target.split(b"://", 1)[1].partition(b"/")[2]
    if any(h.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for h in headers):
        headers = [h for h in headers if not h.lower().startswith(b"content-length:")]
    return b"\r\n".join([b" ".join((method, target, version)), *headers]) + b"\r\n\r\n"


def pump(source, sink):
    """Copies bytes from `source` to `sink` until `source` ends, then ends `sink`'s sending side."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve_client(client, tls: ssl.SSLContext, upstream: tuple):
    """One proxied request: a CONNECT tunnel (TLS ended here) or a plain-HTTP request, sent on to the emulator,
    which answers in HTTP/1.0 and closes the connection."""
    head, rest = read_head(client)
    if head is not None and head.startswith(b"CONNECT"):
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        client = tls.wrap_socket(client, server_side=True)
        head, rest = read_head(client)
    if head is None:
        client.close()
        return
    if os.environ.get("GCS_EMULATOR_LOG"):
        print(head.split(b"\r\n")[0], flush=True)
    if b"\r\nexpect: 100-continue" in head.lower():
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    emulator = socket.create_connection(upstream)
    emulator.sendall(origin_form(head) + rest)
    answer = threading.Thread(target=pump, args=(emulator, client), daemon=True)
    answer.start()
    pump(client, emulator)
    answer.join()
    client.close()
    emulator.close()


def serve_proxy(listener, tls: ssl.SSLContext, upstream: tuple):
    """Accepts proxy clients forever, one thread each."""
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve_client, args=(client, tls, upstream), daemon=True).start()


def object_of(request) -> tuple[str, str] | None:
    """(bucket, object) a JSON-API request writes or deletes, or None."""
    parts = request.path.split("/")
    if "b" not in parts or "o" not in parts:
        return None
    bucket = parts[parts.index("b") + 1]
    name = "/".join(parts[parts.index("o") + 1:])
    name = unquote(name) if name else (request.query.get("name") or [""])[0]
    return (bucket, name) if name else None


def storage_layout(request, response, storage, *args, **kwargs):
    """GET .../b/BUCKET/storageLayout: a flat namespace (TensorFlow asks before it renames a folder)."""
    del storage, args, kwargs
    bucket = request.params["bucket_name"]
    response.json({"kind": "storage#storageLayout", "bucket": bucket, "location": "US", "locationType": "multi-region",
                   "hierarchicalNamespace": {"enabled": False}})


def mend_emulator():
    """Zero-byte uploads and ifGenerationMatch preconditions, as GCS has them (see the module docstring)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    media_upload = objects._media_upload

    def media_upload_of_any_size(request, response, storage):
        if request.data is None:
            request._data = b""
        return media_upload(request, response, storage)

    objects._media_upload = media_upload_of_any_size
    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            stored = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = stored["generation"]
            response["x-goog-metageneration"] = stored["metageneration"]

    objects.download = download_with_generation  # Media GETs of the JSON API reach it through objects.get.
    server.HANDLERS = (
        (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$", {"GET": storage_layout}),
        *((pattern, {m: download_with_generation if h is download else h for m, h in handlers.items()})
          for pattern, handlers in server.HANDLERS))
    handle = server.Router.handle

    def handle_with_preconditions(self, method):
        request = server.Request(self._request_handler, method)
        expected, target = request.query.get("ifGenerationMatch"), object_of(request)
        if expected and target and method in ("POST", "PUT", "DELETE", "PATCH"):
            try:
                current = self._request_handler.storage.get_file_obj(*target)["generation"]
            except NotFound:
                current = "0"
            if str(current) != expected[0]:
                request.data  # Reads the body, so the client sees the answer rather than a reset.
                response = server.Response(self._request_handler)
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                response.close()
                return
        handle(self, method)

    server.Router.handle = handle_with_preconditions
    server.server.HTTPServer.request_queue_size = 256  # Orbax opens many connections at once.


def client_environment(emulator_port: int, proxy_port: int, ca_file: str) -> dict:
    """What a process needs in its environment to use the emulator for gs:// paths."""
    proxy = f"http://127.0.0.1:{proxy_port}"
    return {"TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{emulator_port}",
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{emulator_port}",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "CURL_CA_BUNDLE": ca_file,
            "https_proxy": proxy, "http_proxy": proxy, "no_proxy": "localhost,127.0.0.1",
            "NO_GCE_CHECK": "true", "GCS_RETRY_CONFIG_MAX_RETRIES": "2"}


def main():
    """Starts the emulator and the proxy, writes the client environment to --ready_file, serves forever."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--ready_file", required=True)
    args = parser.parse_args()
    from gcp_storage_emulator.server import create_server

    mend_emulator()
    emulator_port = free_port()
    create_server("127.0.0.1", emulator_port, in_memory=True, default_bucket=args.bucket).start()
    folder = tempfile.mkdtemp(prefix="gcs_emulator_")
    ca_file, key_file = make_certificate(folder)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(ca_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)
    threading.Thread(target=serve_proxy, args=(listener, tls, ("127.0.0.1", emulator_port)), daemon=True).start()
    env = client_environment(emulator_port, listener.getsockname()[1], ca_file)
    with open(args.ready_file + ".tmp", "w") as f:
        json.dump(env, f)
    os.replace(args.ready_file + ".tmp", args.ready_file)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
