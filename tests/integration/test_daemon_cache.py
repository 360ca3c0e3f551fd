"""One fetch per source through the daemon: 8 clones of one image behind a real nginx,
created at once through the API, all complete; nginx's access log shows at most
1.1x the image sent, every clone equals the source plus its own writes, and /metrics
counts the cache's hits and misses."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon_kit import Daemon, qemu_io
from tests.integration.servers import Nginx

SIZE = 16 << 20
CLONES = 8


def test_eight_clones_of_one_http_image_fetch_it_once(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(SIZE)
    (www / "golden.img").write_bytes(data)
    nginx = Nginx(www, tmp_path / "nginx", access_log=True, limit_rate="8m").start()
    daemon = Daemon(tmp_path).start()
    try:
        url = nginx.url("golden.img")
        with concurrent.futures.ThreadPoolExecutor(CLONES) as pool:
            made = list(pool.map(lambda i: daemon.add(url, tmp_path / f"c{i}.img",
                                                      name=f"c{i}"), range(CLONES)))
        expected = []
        for i, c in enumerate(made):  # each clone's own write, while it copies
            qemu_io(c["nbd_uri"], f"write -P {i + 1} {i << 20} 4k", "flush")
            mine = bytearray(data)
            mine[i << 20:(i << 20) + 4096] = bytes([i + 1]) * 4096
            expected.append(bytes(mine))
        for i in range(CLONES):
            daemon.wait_phase(f"c{i}", "complete", 120)
        for i in range(CLONES):
            assert (tmp_path / f"c{i}.img").read_bytes() == expected[i], i
        code, text = daemon.curl("GET", "/metrics")
        metrics = {s.name: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}
        assert metrics["liveclone_cache_misses_total"] == 1
        assert metrics["liveclone_cache_hits_total"] == CLONES - 1
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
        nginx.stop()
    sent = nginx.bytes_sent()
    assert SIZE <= sent <= 1.1 * SIZE, sent
