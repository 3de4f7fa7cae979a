"""Many small files on object storage: one request at a time (what the code did before) vs now.

- reading: a loop of ``read_bytes`` vs ``storage.read_many`` (16 GETs in flight). The evaluation
  reads every distilled and test image (ImageNet-1K at IPC 50: 50,000 + 50,000 small PNGs), and
  encode every train image of an ImageFolder.
- writing: a loop of ``write_bytes`` vs ``storage.write_many``, as sampling writes a class's
  images (IPC of them, plus its Parquet copy and grid).
- listing an ImageFolder: a ``find`` per class folder vs the one recursive listing that
  ``datasets.index_split`` makes (ImageNet-1K has 1000 class folders).
On object storage each request costs a round trip, so every baseline is latency-bound.

The S3 server is moto on loopback behind a relay that delays every request by ``--latency-ms``
(default 20 ms, a same-region S3 GET of a small object is 10-30 ms), so the figure stands for a
cloud bucket, not for loopback. Both ways read the same objects in the same run, alternating.

    python benchmarks/storage.py            # 1000 objects of 2 kB, 3 repeats
    python benchmarks/storage.py --quick    # 200 objects, 1 repeat
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets the environment before anything imports Ray)


class DelayingRelay:
    """A loopback TCP relay that holds every chunk the client sends for ``delay`` seconds."""

    def __init__(self, upstream_port: int, delay: float):
        self.upstream, self.delay = upstream_port, delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, self.delay), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(65536):
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def main() -> None:
    """Write the objects, read them both ways (alternating), print and record the ratio."""
    args = common.parse_args(__doc__, "storage", extra=lambda p: p.add_argument(
        "--latency-ms", type=float, default=20.0, help="delay added to every request (default 20)"))
    n, repeats = (200, 1) if args.quick else (1000, 3)
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    relay = DelayingRelay(port, args.latency_ms / 1000)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    facts = common.machine_facts()
    import s3fs

    from mmdist import datasets, storage
    from mmdist.config import DataConfig

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    payload = os.urandom(2048)
    uris = [f"s3://bench/images/{i // 10:04d}/{i:05d}.png" for i in range(n)]
    fs.pipe({u.removeprefix("s3://"): payload for u in uris})  # concurrent PUTs
    folder = DataConfig(source="imagefolder", train="s3://bench/images", classes=None, max_per_class=None)
    walls: dict[str, list[float]] = {k: [] for k in ("read_one_at_a_time", "read_many", "write_one_at_a_time",
                                                      "write_many", "list_per_class", "list_once")}
    for r in range(repeats):
        with common.Stopwatch() as sw:
            sequential = [storage.read_bytes(u) for u in uris]
        walls["read_one_at_a_time"].append(sw.seconds)
        with common.Stopwatch() as sw:
            concurrent = storage.read_many(uris)
        walls["read_many"].append(sw.seconds)
        assert sequential == concurrent, "read_many returned other bytes"
        with common.Stopwatch() as sw:
            for u in uris:
                storage.write_bytes(u.replace("/images/", f"/out-{r}-a/"), payload)
        walls["write_one_at_a_time"].append(sw.seconds)
        with common.Stopwatch() as sw:
            storage.write_many({u.replace("/images/", f"/out-{r}-b/"): payload for u in uris})
        walls["write_many"].append(sw.seconds)
        assert len(fs.find(f"bench/out-{r}-b")) == n, "write_many lost files"
        fs.invalidate_cache()
        with common.Stopwatch() as sw:
            per_class = {d: fs.find(d) for d in fs.ls("bench/images")}
        walls["list_per_class"].append(sw.seconds)
        fs.invalidate_cache()
        with common.Stopwatch() as sw:
            index = datasets.index_split(folder, "train")
        walls["list_once"].append(sw.seconds)
        assert len(index.items) == sum(map(len, per_class.values())) == n, "the listings disagree"
        fs.invalidate_cache()
    server.stop()
    best = {k: min(v) for k, v in walls.items()}
    speedup = {what: common.ratio(best[base], best[new]) for what, base, new in (
        ("read", "read_one_at_a_time", "read_many"), ("write", "write_one_at_a_time", "write_many"),
        ("list", "list_per_class", "list_once"))}
    print(f"{n} objects of 2 kB in {n // 10} folders, {args.latency_ms:g} ms added per request:")
    print(f"  read:  one at a time {best['read_one_at_a_time']:.2f} s, read_many {best['read_many']:.2f} s "
          f"({speedup['read']:.1f}x)")
    print(f"  write: one at a time {best['write_one_at_a_time']:.2f} s, write_many {best['write_many']:.2f} s "
          f"({speedup['write']:.1f}x)")
    print(f"  list:  a find per folder {best['list_per_class']:.2f} s, one listing {best['list_once']:.2f} s "
          f"({speedup['list']:.1f}x)")
    common.write_json(args.out, common.rnd({
        "benchmark": "storage", "objects": n, "folders": n // 10, "object_bytes": len(payload),
        "latency_ms": args.latency_ms, "repeats": repeats, "walls": walls, "best": best, "speedup": speedup,
        "machine": common.finish_facts(facts)}))

if __name__ == "__main__":
    main()
