"""A gateway-style client of `kiln serve`, written with gRPC's Python package and its
default channel options, as a Python gateway would be.

Usage: driver_client.py [--authority VALUE] STUBS_DIR SOCKET SCENARIO [IMAGE]

STUBS_DIR holds driver_pb2.py and driver_pb2_grpc.py generated from kiln's .proto at test
time. SCENARIO is `errors` (List, NOT_FOUND, INVALID_ARGUMENT: needs no VM) or
`lifecycle` (Create, Start, Exec with stdin, Watch events, Stop, Delete: boots IMAGE).
Each step prints one `STEP ...` line; any failure raises, so the exit status is non-zero.

--authority sets the channel's `:authority` as other gRPC releases choose it by
themselves: grpcio from 1.6x on sends the percent-encoded socket path, grpc-java the
literal path. Without it the channel keeps every default option of the installed grpcio.
"""

import argparse
import sys
import threading

import grpc


def load_stubs(stubs_dir):
    sys.path.insert(0, stubs_dir)
    import driver_pb2  # noqa: E402  (generated at test time)
    import driver_pb2_grpc  # noqa: E402

    return driver_pb2, driver_pb2_grpc


def expect_code(call, code):
    try:
        call()
    except grpc.RpcError as err:
        if err.code() != code:
            raise AssertionError(f"expected {code}, got {err.code()}: {err.details()}")
        return err.details()
    raise AssertionError(f"expected {code}, the call succeeded")


def errors(pb, stub):
    listed = stub.List(pb.ListRequest())
    print(f"STEP list {len(listed.sandboxes)}")
    details = expect_code(
        lambda: stub.Get(pb.GetRequest(sandbox="0123456789ab")), grpc.StatusCode.NOT_FOUND
    )
    print(f"STEP not_found {details}")
    details = expect_code(
        lambda: stub.Create(pb.CreateRequest(image="demo", cpus=1000)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    print(f"STEP invalid_argument {details}")


def exec_with_stdin(pb, stub, sandbox):
    def inputs():
        yield pb.ExecInput(start=pb.ExecStart(sandbox=sandbox, argv=["sh", "-c", "cat; exit 7"]))
        yield pb.ExecInput(stdin=b"hello from python\n")
        yield pb.ExecInput(stdin_eof=pb.StdinEof())

    stdout = b""
    exit_code = None
    for output in stub.Exec(inputs()):
        kind = output.WhichOneof("kind")
        if kind == "stdout":
            stdout += output.stdout
        elif kind == "exit":
            exit_code = output.exit.exit_code
    return stdout, exit_code


def lifecycle(pb, stub, image):
    events = []
    watch = stub.Watch(pb.WatchRequest())

    def collect():
        try:
            for event in watch:
                events.append(event.WhichOneof("kind"))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise

    watcher = threading.Thread(target=collect)
    watcher.start()

    created = stub.Create(
        pb.CreateRequest(image=image, command=["sleep", "600"], network=pb.NETWORK_NONE)
    )
    print(f"STEP create {created.id}")
    started = stub.Start(pb.StartRequest(sandbox=created.id))
    print(f"STEP start {pb.Status.Name(started.status)}")
    stdout, exit_code = exec_with_stdin(pb, stub, created.id)
    print(f"STEP exec {stdout.decode().strip()!r} {exit_code}")
    stopped = stub.Stop(pb.StopRequest(sandbox=created.id, grace_seconds=1))
    print(f"STEP stop {pb.Status.Name(stopped.status)}")
    stub.Delete(pb.DeleteRequest(sandbox=created.id))
    print("STEP delete")
    expect_code(lambda: stub.Get(pb.GetRequest(sandbox=created.id)), grpc.StatusCode.NOT_FOUND)

    watch.cancel()
    watcher.join(timeout=30)
    print(f"STEP watch {' '.join(events)}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--authority")
    parser.add_argument("stubs_dir")
    parser.add_argument("socket")
    parser.add_argument("scenario", choices=["errors", "lifecycle"])
    parser.add_argument("image", nargs="?")
    args = parser.parse_args()
    pb, pb_grpc = load_stubs(args.stubs_dir)
    options = [] if args.authority is None else [("grpc.default_authority", args.authority)]
    with grpc.insecure_channel(f"unix://{args.socket}", options=options) as channel:
        stub = pb_grpc.DriverStub(channel)
        if args.scenario == "errors":
            errors(pb, stub)
        else:
            lifecycle(pb, stub, args.image)


if __name__ == "__main__":
    main()
