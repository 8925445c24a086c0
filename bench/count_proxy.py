"""A loopback TCP proxy that counts connections and bytes in each direction.

Usage: count_proxy.py LISTEN_PORT UPSTREAM_PORT STATS_FILE

It writes "connections=N bytes_down=N bytes_up=N" to STATS_FILE after every
connection closes, so a benchmark can read the figures while it runs.
"""

import asyncio
import sys

listen_port, upstream_port, stats_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
stats = {"connections": 0, "bytes_down": 0, "bytes_up": 0}


def save():
    with open(stats_file, "w") as handle:
        handle.write(" ".join(f"{key}={value}" for key, value in stats.items()) + "\n")


async def pipe(reader, writer, counter):
    try:
        while data := await reader.read(65536):
            stats[counter] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def handle(client_reader, client_writer):
    stats["connections"] += 1
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    await asyncio.gather(
        pipe(client_reader, upstream_writer, "bytes_up"),
        pipe(upstream_reader, client_writer, "bytes_down"),
    )
    save()


async def main():
    save()
    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
