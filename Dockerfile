# Images for the store service, the demo service and the filter (an OCI image usable by Istio's
# WasmPlugin). Build from the repository root, e.g. `docker build --target store -t idempotency-store .`
# (build the .wasm first with `make wasm` for the `wasm` target).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p idempotency-store -p demo-orders

FROM gcr.io/distroless/cc-debian12:nonroot AS store
COPY --from=build /src/target/release/idempotency-store /usr/local/bin/idempotency-store
# 8081: the API; 8082: the replay listener (--replay-listen).
EXPOSE 8081 8082
ENTRYPOINT ["/usr/local/bin/idempotency-store"]

FROM gcr.io/distroless/cc-debian12:nonroot AS demo
COPY --from=build /src/target/release/demo-orders /usr/local/bin/demo-orders
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/demo-orders"]

# Istio's Wasm OCI format: a single-layer image holding `plugin.wasm`.
FROM scratch AS wasm
COPY target/wasm32-wasip1/wasm-release/idempotency_filter.wasm /plugin.wasm
