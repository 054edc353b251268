"""A fault-injecting HTTP proxy for the storage tests (run as a script): forwards every request to an upstream S3
endpoint (moto's server), but answers every Nth request with `503 SlowDown` and cuts every Mth PUT off mid-body
(the connection closes with no reply), as a throttling or flaky object store does.

    python tests/faultproxy.py --upstream http://127.0.0.1:PORT --port P --every-503 4 --cut-put 7
"""
from __future__ import annotations

import argparse
import http.client
import http.server
import sys
import threading
import urllib.parse

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def serve(upstream: str, port: int, every_503: int, cut_put: int) -> None:
    target = urllib.parse.urlsplit(upstream)
    lock = threading.Lock()
    counts = {"requests": 0, "puts": 0, "503": 0, "cut": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self, limit: int | None = None) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size + 2)[:size]
                    out += chunk
                    if size == 0:
                        return out
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n if limit is None else min(n, limit))

        def _any(self) -> None:
            with lock:
                counts["requests"] += 1
                n = counts["requests"]
                put = self.command == "PUT"
                if put:
                    counts["puts"] += 1
                throttle = every_503 and n % every_503 == 0
                cut = put and not throttle and cut_put and counts["puts"] % cut_put == 0
            if cut:  # half the body arrives, then the connection drops with no answer
                self._body(limit=int(self.headers.get("Content-Length") or 0) // 2)
                counts["cut"] += 1
                self.close_connection = True
                self.connection.close()
                return
            body = self._body()
            if throttle:
                counts["503"] += 1
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOWDOWN)))
                self.end_headers()
                self.wfile.write(SLOWDOWN)
                return
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length or "0")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        def do_STATS(self) -> None:  # noqa: N802 - `curl -X STATS` reads what was injected
            text = repr(counts).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"proxy on {port} -> {upstream}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--every-503", type=int, default=4)
    ap.add_argument("--cut-put", type=int, default=7)
    a = ap.parse_args()
    serve(a.upstream, a.port, a.every_503, a.cut_put)
