"""Drives an OpenInferencev2 router over TLS with grpcio (through server reflection, no
generated code), and watches a certificate rotation from a client's side. Prints one JSON
object of what it saw.

Usage: tls_client.py TLS_ADDR MTLS_ADDR CA CLIENT_CERT CLIENT_KEY OTHER_CERT OTHER_KEY NEW_CA

TLS_ADDR serves TLS with a certificate signed by CA; MTLS_ADDR also requires a client
certificate signed by CA (CLIENT_*; OTHER_* is signed by another CA). Midway, the script
prints "ROTATE" and waits for a line on stdin: by then TLS_ADDR serves a certificate signed
by NEW_CA instead, and the stream it opened before must still run to its end.
"""

import json
import sys

import grpc
from grpc_requests import Client

tls_addr, mtls_addr, ca, cert, key, other_cert, other_key, new_ca = sys.argv[1:9]
inference = "openinfer.v1.Inference"
request = {"prompt": "Hello over TLS", "max_new_tokens": 8, "ignore_eos": True}


def read(path):
    with open(path, "rb") as f:
        return f.read()


def client(addr, root, chain=None, private=None):
    creds = {"root_certificates": read(root)}
    if chain:
        creds["certificate_chain"] = read(chain)
        creds["private_key"] = read(private)
    return Client(addr, ssl=True, credentials=creds, lazy=True)


def attempt(make):
    """The call's result, or the gRPC code it failed with."""
    try:
        return {"ok": make()}
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details()}
    except Exception as e:  # reflection fails before any call when the handshake does
        return {"code": "ERROR", "details": repr(e)}


out = {}
out["tls"] = attempt(lambda: client(tls_addr, ca).request(inference, "Generate", request))
out["plaintext"] = attempt(
    lambda: Client(tls_addr, lazy=True).request(inference, "Generate", request)
)
out["mtls"] = attempt(
    lambda: client(mtls_addr, ca, cert, key).request(inference, "Generate", request)
)
out["mtls_no_cert"] = attempt(
    lambda: client(mtls_addr, ca).request(inference, "Generate", request)
)
out["mtls_other_ca"] = attempt(
    lambda: client(mtls_addr, ca, other_cert, other_key).request(inference, "Generate", request)
)

# A long stream, opened before the rotation and read to its end after it.
long_request = {"prompt": "Rotate", "max_new_tokens": 150, "ignore_eos": True}
stream = client(tls_addr, ca).request(inference, "GenerateStream", long_request)
tokens = len(next(stream).get("token_ids", []))
print("ROTATE", flush=True)
sys.stdin.readline()
try:
    for message in stream:
        tokens += len(message.get("token_ids", []))
    out["stream_across_rotation"] = {"tokens": tokens}
except grpc.RpcError as e:
    out["stream_across_rotation"] = {"code": e.code().name, "details": e.details()}

out["new_ca"] = attempt(lambda: client(tls_addr, new_ca).request(inference, "Generate", request))
out["old_ca"] = attempt(lambda: client(tls_addr, ca).request(inference, "Generate", request))
print(json.dumps(out), flush=True)
