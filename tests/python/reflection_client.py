"""Drives an OpenInferencev2 router with real third-party clients: grpcio, through server
reflection (grpc_requests), with no generated code. Prints one JSON object of what it saw.

Usage: reflection_client.py HOST:PORT
"""

import json
import sys

import grpc
from grpc_requests import Client

addr = sys.argv[1]
client = Client.get_by_endpoint(addr)
out = {"services": sorted(client.service_names)}

inference = "openinfer.v1.Inference"
out["models"] = client.request(inference, "ListModels", {})
out["health"] = client.request("grpc.health.v1.Health", "Check", {"service": inference})

request = {"prompt": "Hello from Python", "max_new_tokens": 8, "ignore_eos": True}
out["unary"] = client.request(inference, "Generate", request)
out["stream"] = list(client.request(inference, "GenerateStream", request))
ids = client.request(
    inference,
    "Generate",
    {"prompt_ids": [1, 50, 60], "max_new_tokens": 4, "ignore_eos": True, "temperature": 0.7, "seed": 7},
)
out["ids_unary"] = ids

try:
    client.request(inference, "Generate", {"prompt": "x", "max_new_tokens": 8, "top_p": 1.5})
    out["invalid"] = None
except grpc.RpcError as e:
    out["invalid"] = {"code": e.code().name, "details": e.details()}

print(json.dumps(out))
