"""Huge bodies against the real `memento serve` process (default settings, no keys): a declared
200 MB body and four 200 MB chunked uploads in parallel are refused with 413 while the server's
own RSS (read from /proc/<server pid>) stays flat, and the server keeps serving afterwards."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from tests.reliability.harness import ServerProcess

MB = 1 << 20


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_200mb_bodies_leave_the_server_rss_flat(tmp_path, tiny_model_dir):
    with ServerProcess(tmp_path, tiny_model_dir) as server:
        assert server.proc is not None
        pid = server.proc.pid
        base = rss_mb(pid)
        peak = base
        sampling = True

        def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, rss_mb(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 209715200\r\n\r\n")
            reply = s.recv(4096)
        declared_ms = (time.perf_counter() - t0) * 1000
        assert reply.startswith(b"HTTP/1.1 413"), reply[:120]

        results: list[tuple[int, float, int]] = []

        def upload() -> None:
            sent = 0

            def chunks():
                nonlocal sent
                block = b"a" * MB
                for _ in range(200):
                    sent += len(block)
                    yield block

            t = time.perf_counter()
            try:
                status = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(),
                                    headers={"Content-Type": "application/json"}, timeout=60).status_code
            except httpx.HTTPError:  # the server answered 413 and closed while we were still sending
                status = 413
            results.append((status, (time.perf_counter() - t) * 1000, sent))

        uploads = [threading.Thread(target=upload) for _ in range(4)]
        for u in uploads:
            u.start()
        for u in uploads:
            u.join()
        sampling = False
        sampler.join()
        grown = peak - base
        print(f"\nserver RSS {base:.0f} MB, peak {peak:.0f} MB (+{grown:.1f} MB); declared 200 MB: 413 in "
              f"{declared_ms:.1f} ms; 4 parallel chunked 200 MB: "
              + ", ".join(f"{st} after {ms:.0f} ms ({sent // MB} MB sent)" for st, ms, sent in results))
        assert [st for st, _, _ in results] == [413] * 4
        assert grown < 32, f"server RSS grew {grown:.1f} MB"
        assert server.proc.poll() is None
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
