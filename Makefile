# Tollgate: the two commands a newcomer needs are `make up` and `make test`.
SHELL := /bin/bash
SERVICES := deploy/local/services.sh
GO ?= go
GOTEST_FLAGS ?= -count=1 -timeout 25m

.PHONY: up test services services-stop services-status build vet bench-edge bench-ingest bench-invoice

## up: start the services, run the whole pipeline with demo traffic, print where to look
up: services build
	@eval "$$($(SERVICES) env)" && ./bin/tollgate demo $(DEMO_FLAGS)

## test: run every test against the real local services (starting them first)
test: services
	$(GO) vet ./...
	@eval "$$($(SERVICES) env)" && $(GO) test $(GOTEST_FLAGS) ./...
	@# The race detector over the packages whose goroutines share the most
	@# state (rate-limit leases, the HTTP front, lazy deadlines). It needs a C
	@# compiler.
	@if command -v cc >/dev/null 2>&1; then \
		eval "$$($(SERVICES) env)" && CGO_ENABLED=1 $(GO) test -race $(GOTEST_FLAGS) ./edge/redis ./edge/fasthttp ./edge ./internal/deadline; \
	elif [ "$$CI" = true ]; then \
		echo "make test: no C compiler (cc) for the race detector's pass over ./edge/...; CI needs it: install gcc"; exit 1; \
	else \
		echo "make test: no C compiler (cc), so the race detector's pass over ./edge/... did not run; install gcc to run it"; \
	fi

## services / services-stop / services-status: the real backing services alone
services:
	@$(SERVICES) up

services-stop:
	@$(SERVICES) down

services-status:
	@$(SERVICES) status

build:
	$(GO) build -o bin/tollgate ./cmd/tollgate

vet:
	$(GO) vet ./...

## bench-*: bounded loopback benchmarks; each ends with one RESULT line
bench-edge: services
	@eval "$$($(SERVICES) env)" && $(GO) run ./bench/edge $(BENCH_FLAGS)

bench-ingest: services
	@eval "$$($(SERVICES) env)" && $(GO) run ./bench/ingest $(BENCH_FLAGS)

bench-invoice: services
	@eval "$$($(SERVICES) env)" && $(GO) run ./bench/invoice $(BENCH_FLAGS)
