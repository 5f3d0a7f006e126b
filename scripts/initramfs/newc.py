"""Writes kiln's initramfs: an uncompressed cpio "newc" archive holding INIT as /init, the
directories kiln-init mounts on, and /dev/console as a device node (the kernel opens it
for init's stdio before anything is mounted), written without root or mknod.

    python3 newc.py INIT OUT
"""

import stat
import sys

init_path, out_path = sys.argv[1], sys.argv[2]
ino = [300000]


def entry(out, name, mode, data=b"", rdev=(0, 0), nlink=1):
    ino[0] += 1
    fields = [ino[0], mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(header + name.encode() + b"\0")
    out.write(b"\0" * (-(len(header) + len(name) + 1) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


with open(init_path, "rb") as f:
    init = f.read()
with open(out_path, "wb") as out:
    for d in ["dev", "proc", "sys", "kiln", "newroot"]:
        entry(out, d, stat.S_IFDIR | 0o755, nlink=2)
    entry(out, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    entry(out, "init", stat.S_IFREG | 0o755, init)
    entry(out, "TRAILER!!!", 0)
