"""The EcoServe contract: what the scheduler, the workers, the predictor and the SDK agree on.

Every service imports this package and itself, never another service. Modules:

- `pb`: generated protobuf / gRPC code of `proto/*.proto` (the source of truth; `make proto`);
- `wire`: the scheduler <-> worker ZeroMQ frame codec (plan / result columns <-> protobuf);
- `plan`: what one iteration runs (BatchPlan, DecodeBatch columns) and what comes back;
- `sampling`: the one definition of sampling parameters and their validation;
- `buckets`: response-length buckets (the predictor's bucket output and metrics);
- `cost`: the iteration-time model and its profile files (simulator and sim worker);
- `ids`: request ids and the clock convention;
- `grpc_server`: health checking + reflection every gRPC server carries.

This module imports nothing, so `import ecoserve_common.plan` stays free of grpc and protobuf
(the scheduler core imports `plan` and `sampling` and must stay pure).
"""
