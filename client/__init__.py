"""featurelens client: typed sync and asyncio access to featurelens.v1 over gRPC (needs only grpcio + protobuf).

    from featurelens.client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("What is the capital of France?", temperature=0).text)
"""

from featurelens.client._client import AsyncClient, Client, build_generate_request, structured_output
from featurelens.client.types import (
    AdapterInfo,
    GenerateResult,
    ModelInfo,
    Risk,
    RiskTerm,
    SampleResult,
    SteeringVector,
    StreamChunk,
    TokenInfo,
)
from featurelens.v1 import featurelens_pb2 as pb

__all__ = ["AdapterInfo", "AsyncClient", "Client", "GenerateResult", "ModelInfo", "Risk", "RiskTerm", "SampleResult", "SteeringVector", "StreamChunk",
           "TokenInfo", "build_generate_request", "pb", "structured_output"]
