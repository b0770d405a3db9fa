"""The physical floor for a Python/trio relay: copy bytes, plaintext in, TLS out.

    python -m bench.floor_relay --listen PORT --upstream PORT --ca-file CA --server-name HOST

Per device connection: one TLS connection to the upstream (the gateway's own
`gateway.net.tls_stream.TLSStream`, or with `--tls sslstream` trio.SSLStream;
chain and host name verified, as the gateway does), and two tasks copying
whatever arrives, one read then one write at a time, in each direction
(TLS records already received are taken together, as the gateway does). No
MQTT parsing, no metrics, no keep-alive, no logging: nothing a relay could
leave out. What it costs per message is the least any trio relay on this
machine pays; the gateway is measured against it by `bench.floor_compare`.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys

import trio

from gateway.net.plain_stream import PlainStream
from gateway.net.tls_stream import open_tls_stream

# As the gateway: plaintext reads as large as the device sends, TLS reads one record.
DEVICE_RECEIVE_SIZE = 262144
TLS_RECEIVE_SIZE = 16384


# Received TLS records are taken together before a write, as the gateway does:
# an upstream writes one record per MQTT packet, and a trio.SSLStream read
# returns one record. Without it (--one-record) every PUBACK costs a write.
BATCH_BYTES = 262144


def _tls_bytes_buffered(stream: trio.abc.ReceiveStream) -> bool:
    incoming = getattr(stream, "_incoming", None)  # trio.SSLStream's incoming BIO
    return isinstance(incoming, ssl.MemoryBIO) and incoming.pending > 0


async def _copy(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream,
                size: int, batch: bool) -> None:  # fmt: skip
    while True:
        data = await source.receive_some(size)
        if not data:
            return
        if batch and _tls_bytes_buffered(source):
            chunks, total = [data], len(data)
            while _tls_bytes_buffered(source) and total < BATCH_BYTES:
                more = await source.receive_some(size)
                if not more:
                    break
                chunks.append(more)
                total += len(more)
            data = b"".join(chunks)
        await sink.send_all(data)


async def relay(device: trio.abc.Stream, host: str, port: int, context: ssl.SSLContext,
                server_name: str, batch: bool = True, tls: str = "gateway") -> None:  # fmt: skip
    upstream: trio.abc.Stream
    try:
        tcp = await trio.open_tcp_stream(host, port)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        if tls == "sslstream":
            upstream = trio.SSLStream(tcp, context, server_hostname=server_name)
            await upstream.do_handshake()
        else:
            upstream = await open_tls_stream(tcp, context, server_name)
            batch = False  # its reads already return every record received
    except (OSError, trio.BrokenResourceError):
        await device.aclose()
        return
    try:
        async with trio.open_nursery() as nursery:

            async def one_way(source: trio.abc.Stream, sink: trio.abc.Stream, size: int,
                              batch: bool) -> None:  # fmt: skip
                try:
                    await _copy(source, sink, size, batch)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()  # either side gone: close both

            nursery.start_soon(one_way, device, upstream, DEVICE_RECEIVE_SIZE, False)
            size = TLS_RECEIVE_SIZE if tls == "sslstream" else BATCH_BYTES
            nursery.start_soon(one_way, upstream, device, size, batch)
    finally:
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(device)


async def serve(listen: int, upstream_port: int, ca_file: str, server_name: str,
                batch: bool = True, tls: str = "gateway") -> None:  # fmt: skip
    context = ssl.create_default_context(cafile=ca_file)

    async def handler(tcp: trio.SocketStream) -> None:
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        # The gateway's own plaintext stream with its TLS stream, trio's with trio's.
        device = tcp if tls == "sslstream" else PlainStream.from_trio(tcp)
        await relay(device, "127.0.0.1", upstream_port, context, server_name, batch, tls)

    await trio.serve_tcp(handler, listen, host="127.0.0.1", backlog=4096)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor_relay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--listen", type=int, required=True, help="plaintext port on 127.0.0.1")
    parser.add_argument("--upstream", type=int, required=True, help="TLS port on 127.0.0.1")
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--server-name", required=True)
    parser.add_argument(
        "--one-record",
        action="store_true",
        help="write each TLS record read as it comes (no batching)",
    )
    parser.add_argument(
        "--tls",
        choices=("gateway", "sslstream"),
        default="gateway",
        help="the upstream TLS stream: the gateway's TLSStream (default) or trio.SSLStream",
    )
    args = parser.parse_args(argv)  # fmt: skip
    try:
        trio.run(
            serve,
            args.listen,
            args.upstream,
            args.ca_file,
            args.server_name,
            not args.one_record,
            args.tls,
        )
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
